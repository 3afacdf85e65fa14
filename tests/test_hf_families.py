"""Every Hugging Face family through hf:PATH and as a raw transformers object, and back to a Hugging Face
folder: small configs with random weights, built here (no download)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from keiryo import artifacts  # noqa: E402
from keiryo.errors import ArtifactError, ModelError, TrustError  # noqa: E402
from keiryo.export import ExportError, export  # noqa: E402
from keiryo.hf import HFModel  # noqa: E402
from keiryo.hf_text import text_example, write_text_data  # noqa: E402
from keiryo.models import build_model, spec_of  # noqa: E402

T = transformers
TEXT = dict(vocab_size=64, max_position_embeddings=32)
LLM = dict(**TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
DECODERS = {
    "gpt2": lambda: T.GPT2LMHeadModel(
        T.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    ),
    "llama": lambda: T.LlamaForCausalLM(
        T.LlamaConfig(**LLM, num_key_value_heads=2, tie_word_embeddings=True)
    ),
    "qwen2": lambda: T.Qwen2ForCausalLM(
        T.Qwen2Config(**LLM, num_key_value_heads=2, tie_word_embeddings=True)
    ),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**LLM, num_key_value_heads=2)),
}
VISION = {
    "resnet": lambda: T.ResNetForImageClassification(
        T.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    ),
    "convnext": lambda: T.ConvNextForImageClassification(
        T.ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    ),
    "vit": lambda: T.ViTForImageClassification(
        T.ViTConfig(
            image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=64, num_labels=3,
        )
    ),
}  # fmt: skip
BERT = lambda: T.BertModel(  # noqa: E731
    T.BertConfig(**TEXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
)


def _make(factory):
    torch.manual_seed(0)
    return factory().eval()


def _example(name: str):
    if name in VISION:
        return {"pixel_values": torch.randn(2, 3, 16, 16)}
    ids = torch.randint(0, 64, (2, 6))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _main(model, example):
    with torch.no_grad():
        out = model(**example)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("name", [*DECODERS, *VISION])
def test_hf_path_loads_every_family_and_round_trips_through_a_keiryo_file(tmp_path, name):
    original = _make({**DECODERS, **VISION}[name])
    original.save_pretrained(tmp_path / name)
    model = build_model(f"hf:{tmp_path / name}")
    assert type(model) is type(original)  # transformers' own model, taking its usual inputs
    example = _example(name)
    torch.testing.assert_close(_main(model, example), _main(original, example))
    loaded = artifacts.load(artifacts.save(model, tmp_path / "m.pt"))
    torch.testing.assert_close(_main(loaded, example), _main(model, example))
    if name in DECODERS:
        ids = example["input_ids"]
        out = loaded.generate(
            ids, attention_mask=example["attention_mask"], max_new_tokens=3, do_sample=False
        )
        assert out.shape == (2, ids.shape[1] + 3)


@pytest.mark.parametrize("name", ["llama", "gpt2", "resnet", "vit", "bert"])
def test_a_raw_transformers_object_is_saved_and_rebuilt_from_its_config(tmp_path, name):
    model = _make({**DECODERS, **VISION, "bert": BERT}[name])
    assert spec_of(model)["factory"] == "hf-config"
    path = artifacts.save(model, tmp_path / "raw.pt")
    loaded = artifacts.load(path)  # rebuilt from the config by transformers' own class: no trust needed
    assert type(loaded) is type(model)
    example = _example(name)
    torch.testing.assert_close(_main(loaded, example), _main(model, example))
    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight


def _rewrite_spec(path, **changes):
    payload = torch.load(path, weights_only=True)
    payload["spec"]["kwargs"].update(changes)
    torch.save(payload, path)


def test_a_saved_raw_model_asking_for_code_or_naming_no_transformers_class_is_refused(tmp_path):
    model = _make(DECODERS["llama"])
    path = artifacts.save(model, tmp_path / "raw.pt")
    config = artifacts.read(path)["spec"]["kwargs"]["config"]
    _rewrite_spec(path, config={**config, "auto_map": {"AutoModel": "evil.Model"}})
    with pytest.raises(TrustError, match="auto_map") as info:
        artifacts.load(path, trust_code=True)
    assert "\n" not in str(info.value)
    _rewrite_spec(path, config=config, architecture="os.system")
    with pytest.raises(ArtifactError, match="not a model class that transformers ships"):
        artifacts.load(path)


def _hf_config(folder):
    return json.loads((folder / "config.json").read_text())


def test_a_float_and_a_bf16_decoder_are_written_as_folders_transformers_loads_alone(tmp_path):
    model = _make(DECODERS["llama"])
    example = _example("llama")
    result = export(model, example, tmp_path / "llama", "hf")
    assert result.format == "hf" and result.output == "logits" and result.max_error <= 1e-5
    assert {"config.json", "model.safetensors"} <= {p.name for p in result.path.iterdir()}
    loaded = T.AutoModelForCausalLM.from_pretrained(result.path)
    torch.testing.assert_close(_main(loaded, example), _main(model, example))
    half = model.to(torch.bfloat16)
    export(half, example, tmp_path / "bf16", "hf")
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert again.model.embed_tokens.weight.dtype == torch.bfloat16
    torch.testing.assert_close(_main(again, example), _main(half, example))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16", "llama"]  # no staging folder left


@torch.no_grad()
def _narrow_llama(model, ffn: int, kv_heads: int) -> None:
    """Prune as an LLM pruner does: FFN width, and whole key/value groups with their query heads."""
    config = model.config
    head_dim, group = config.hidden_size // config.num_attention_heads, config.num_attention_heads // 2
    kv = torch.arange(kv_heads * head_dim)
    q = torch.arange(kv_heads * group * head_dim)
    for layer in model.model.layers:
        mlp, attn = layer.mlp, layer.self_attn
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            setattr(mlp, name, nn.Linear(old.in_features, ffn, bias=False))
            getattr(mlp, name).weight.copy_(old.weight[:ffn])
        down = mlp.down_proj
        mlp.down_proj = nn.Linear(ffn, down.out_features, bias=False)
        mlp.down_proj.weight.copy_(down.weight[:, :ffn])
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            old = getattr(attn, name)
            setattr(attn, name, nn.Linear(old.in_features, len(rows), bias=False))
            getattr(attn, name).weight.copy_(old.weight[rows])
        o = attn.o_proj
        attn.o_proj = nn.Linear(len(q), o.out_features, bias=False)
        attn.o_proj.weight.copy_(o.weight[:, q])
        attn.num_key_value_groups = group
    model.config.num_attention_heads, model.config.num_key_value_heads = kv_heads * group, kv_heads


def test_a_pruned_decoder_is_written_with_the_config_of_its_weights(tmp_path):
    model = _make(DECODERS["llama"])
    _narrow_llama(model, ffn=40, kv_heads=1)
    model.config.intermediate_size = 64  # a pruner that forgot the config: the weights tell the truth
    example = _example("llama")
    export(model, example, tmp_path / "pruned", "hf")
    config = _hf_config(tmp_path / "pruned")
    assert (config["intermediate_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (
        40,
        2,
        1,
    )
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    torch.testing.assert_close(_main(loaded, example), _main(model, example))
    ids = example["input_ids"]
    assert loaded.generate(ids, max_new_tokens=2, do_sample=False).shape == (2, ids.shape[1] + 2)


def _bert_folder(path):
    path.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"the a cat dog sat on mat".split()]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    T.BertTokenizer(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    T.BertModel(
        T.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32)
    ).save_pretrained(path)  # fmt: skip
    return path


def test_an_encoder_student_goes_back_with_its_tokenizer_and_narrower_config(tmp_path):
    folder = _bert_folder(tmp_path / "bert")
    student = build_model(f"hf:{folder}", intermediate_size=48)  # fused attention inside, FFN narrowed
    assert isinstance(student, HFModel)
    tokens = student.tokenize(["the cat sat", "a dog sat on the mat"])
    result = export(student, tokens, tmp_path / "student", "hf")
    assert result.max_error <= 1e-4
    assert _hf_config(result.path)["intermediate_size"] == 48
    assert (result.path / "vocab.txt").is_file() and (result.path / "tokenizer_config.json").is_file()
    loaded = T.AutoModel.from_pretrained(result.path)  # transformers alone: query/key/value layers again
    tokenizer = T.AutoTokenizer.from_pretrained(result.path)
    assert tokenizer("the cat")["input_ids"] == student.tokenize(["the cat"])[0, 0].tolist()
    with torch.no_grad():
        hidden = loaded(input_ids=tokens[:, 0], attention_mask=tokens[:, 1]).last_hidden_state
        mask = tokens[:, 1].unsqueeze(-1).float()
        torch.testing.assert_close(
            (hidden * mask).sum(1) / mask.sum(1), student(tokens), atol=1e-5, rtol=1e-4
        )


def test_what_a_transformers_config_cannot_hold_is_refused_in_one_line(tmp_path):
    folder = _bert_folder(tmp_path / "bert")
    encoder = build_model(f"hf:{folder}")
    attention = encoder.model.encoder.layer[0].attention.self
    attention.qkv = nn.Linear(32, 3 * 24)  # 3 heads of 8 in a hidden of 32: BertConfig derives 32 / heads
    attention.num_heads = 3
    tokens = encoder.tokenize(["the cat sat"])
    with pytest.raises(ExportError, match="keiryo .pt file") as info:
        export(encoder, tokens, tmp_path / "out", "hf")
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match="a transformers model"):
        export(build_model("mlp", hidden=[8]), torch.randn(2, 64), tmp_path / "out", "hf")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export(encoder, tokens, tmp_path / "file", "hf")


def test_int8_models_say_what_loads_them(tmp_path):
    model = _make(DECODERS["llama"])
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(ExportError, match="keiryo.load") as info:
        export(quantized, _example("llama"), tmp_path / "q", "hf")
    assert "\n" not in str(info.value) and not (tmp_path / "q").exists()


def test_texts_become_example_inputs_for_any_text_model_from_a_folder(tmp_path):
    folder = _bert_folder(tmp_path / "bert")
    texts = ["the cat sat", "a dog sat on the mat"]
    encoder = build_model(f"hf:{folder}")
    assert torch.equal(text_example(encoder, texts), encoder.tokenize(texts))
    raw = build_model(f"hf:{folder}", task="base")  # transformers' own BertModel, keyword inputs
    example = text_example(raw, texts)
    assert set(example) == {"input_ids", "attention_mask"}
    assert torch.equal(example["input_ids"], encoder.tokenize(texts)[:, 0])
    assert raw(**example).last_hidden_state.shape[:2] == example["input_ids"].shape
    with pytest.raises(ModelError, match="text data file") as info:
        write_text_data(raw, texts, tmp_path / "t.pt")
    assert "\n" not in str(info.value)
    with pytest.raises(ModelError, match="example inputs"):
        text_example(_make(VISION["vit"]), texts)


@torch.no_grad()
def test_gpt2_with_a_narrower_feed_forward_goes_back_with_n_inner(tmp_path):
    """GPT-2's Conv1D layers store (in, out): the width is read from the weights into config.n_inner."""
    from transformers.pytorch_utils import Conv1D

    model = _make(DECODERS["gpt2"])
    for block in model.transformer.h:
        fc, proj = block.mlp.c_fc, block.mlp.c_proj
        block.mlp.c_fc, block.mlp.c_proj = Conv1D(48, 32), Conv1D(32, 48)
        block.mlp.c_fc.weight.copy_(fc.weight[:, :48])
        block.mlp.c_fc.bias.copy_(fc.bias[:48])
        block.mlp.c_proj.weight.copy_(proj.weight[:48])
        block.mlp.c_proj.bias.copy_(proj.bias)
    example = _example("gpt2")
    result = export(model, example, tmp_path / "gpt2", "hf")
    assert _hf_config(result.path)["n_inner"] == 48 and result.max_error <= 1e-5
    loaded = T.AutoModelForCausalLM.from_pretrained(result.path)
    torch.testing.assert_close(_main(loaded, example), _main(model, example))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # tied again
