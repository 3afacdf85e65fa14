"""Users' own Hugging Face models through the public API (issue 14, "Done when"): nine transformers families
built from small configs (random weights, no download), passed raw with inputs as PyTorch passes them — a
tuple (ids, mask), a dict of keyword arguments, or pixel values — each pruned (≤ 0.6× the parameters, same
output shape, decoders still generate), int8-quantized (cosine ≥ 0.99 against float, or "kept float" said),
and saved and reloaded (keiryo.save/load, and a Hugging Face folder that transformers loads alone where the
compression allows it). Tiny sizes keep each family to seconds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import keiryo  # noqa: E402
from keiryo import inputs  # noqa: E402
from keiryo.compress.quantize import report_of  # noqa: E402
from keiryo.errors import KeiryoError  # noqa: E402
from keiryo.export import export  # noqa: E402
from keiryo.metrics import count_parameters, has_quantized_kernels  # noqa: E402

T = transformers
VOCAB, SEQ, BATCH, IMAGE = 64, 8, 2, 16
TEXT = dict(vocab_size=VOCAB, max_position_embeddings=16, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=128)  # fmt: skip
LLM = dict(**TEXT, num_key_value_heads=2)
FAMILIES = {
    "bert": lambda: T.BertModel(T.BertConfig(**TEXT)),
    "distilbert": lambda: T.DistilBertModel(
        T.DistilBertConfig(vocab_size=VOCAB, max_position_embeddings=16, dim=32, n_layers=2, n_heads=4,
                           hidden_dim=128)
    ),
    "gpt2": lambda: T.GPT2LMHeadModel(
        T.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=4, n_inner=128,
                     bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    ),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**LLM, tie_word_embeddings=True)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**LLM, tie_word_embeddings=True)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**LLM)),
    "vit": lambda: T.ViTForImageClassification(
        T.ViTConfig(image_size=IMAGE, patch_size=4, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=128, num_labels=3)
    ),
    "resnet": lambda: T.ResNetForImageClassification(
        T.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3)
    ),
    "convnext": lambda: T.ConvNextForImageClassification(
        T.ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3)
    ),
}  # fmt: skip
DECODERS = ("gpt2", "llama", "qwen2", "mistral")
VISION = ("vit", "resnet", "convnext")
TUPLE_INPUTS = ("bert", "qwen2")  # the others: a dict (GPT-2's second argument is the cache)
# What a Hugging Face config can say: Llama-style decoders and ViT state head_dim apart from the width, so
# their pruned heads fit a config; BERT, DistilBERT and GPT-2 derive head size from the kept width (no
# fewer heads), and torch-pruning narrows each CNN stage on its own: keiryo.save keeps those.
HF_FOLDER = ("llama", "qwen2", "mistral", "vit")
QUERY_LAYERS = ("attention.self.query", "attention.q_lin", "attn.c_attn")  # BERT, DistilBERT, GPT-2
QUICK = keiryo.Policy(runs=3, time_limit=1.0)  # timing effort for auto: tiny models, seconds


def _family(name: str):
    torch.manual_seed(0)
    return FAMILIES[name]().eval()


def _example(name: str) -> inputs.Example:
    gen = torch.Generator().manual_seed(1)
    if name in VISION:
        pixels = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen)
        return pixels if name == "resnet" else {"pixel_values": pixels}
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # a padded sample: the mask matters
    return (ids, mask) if name in TUPLE_INPUTS else {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def _main(model, example) -> torch.Tensor:
    return inputs.main_output(inputs.call(model, example))


def _params(model) -> int:
    return count_parameters(model)[0]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.reshape(len(a), -1), b.reshape(len(b), -1), dim=1).mean())


def _generates(model, example, tokens: int = 3) -> None:
    ids, mask = example if isinstance(example, tuple) else (example["input_ids"], example["attention_mask"])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
            pad_token_id=0,
        )  # fmt: skip
    assert out.shape == (BATCH, SEQ + tokens)
    assert torch.equal(out[:, :SEQ], ids)
    assert int(out.max()) < model.config.vocab_size


def _reloads(model, example, tmp_path, atol: float = 1e-5):
    """keiryo.save then keiryo.load: the same class, the same outputs."""
    path = keiryo.save(model, tmp_path / "model.pt")
    loaded = keiryo.load(path)
    assert type(loaded) is type(model)
    torch.testing.assert_close(_main(loaded, example), _main(model, example), atol=atol, rtol=1e-4)
    return loaded


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_raw_family_is_pruned_and_saved_and_reloaded(tmp_path, name):
    model, example = _family(name), _example(name)
    before = _main(model, example)
    pruned = keiryo.prune(model, keiryo.Structured(ratio=0.5), example_inputs=example)
    assert _params(pruned) <= 0.6 * _params(model), (_params(pruned), _params(model))
    assert _main(pruned, example).shape == before.shape
    torch.testing.assert_close(_main(model, example), before)  # the user's model is left as it was
    assert pruned._keiryo_metadata["pruning"]["kind"] == "structured"
    if name in DECODERS:
        _generates(pruned, example)
    loaded = _reloads(pruned, example, tmp_path)
    if name in DECODERS:
        _generates(loaded, example)
        if model.config.tie_word_embeddings:
            assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    if name in HF_FOLDER:  # back to the ecosystem: a folder transformers loads without keiryo
        result = export(pruned, example, tmp_path / "hf", "hf")
        assert result.max_error <= 1e-4
        alone = type(model).from_pretrained(result.path)
        assert _params(alone) == _params(pruned)
        torch.testing.assert_close(_main(alone, example), _main(pruned, example), atol=1e-5, rtol=1e-4)
        if name in DECODERS:
            _generates(alone, example)
    else:  # one line saying why, and what keeps the model
        with pytest.raises(KeiryoError, match="keiryo") as info:
            export(pruned, example, tmp_path / "hf", "hf")
        assert "\n" not in str(info.value)
        assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())
    if name in ("bert", "distilbert", "gpt2"):  # the message's way out: heads kept, feed-forward pruned
        queries = tuple(n for n, _ in model.named_modules() if n.endswith(QUERY_LAYERS))
        ffn_only = keiryo.prune(model, keiryo.Structured(ratio=0.5, protect=queries), example_inputs=example)
        assert _params(pruned) < _params(ffn_only) < _params(model)
        alone = type(model).from_pretrained(export(ffn_only, example, tmp_path / "ffn", "hf").path)
        torch.testing.assert_close(_main(alone, example), _main(ffn_only, example), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_raw_family_is_int8_quantized_and_saved_and_reloaded(tmp_path, name):
    model, example = _family(name), _example(name)
    reference = _main(model, example)
    # auto: the fastest kernel within tolerance, or float kept and said so (tiny models rarely gain)
    chosen = keiryo.quantize(model, keiryo.Int8Dynamic(), example_inputs=example, policy=QUICK)
    report = report_of(chosen)
    assert report is not None and report.output == inputs.output_name(inputs.call(model, example))
    if report.kept_float:
        assert report.message.startswith("kept float") and not has_quantized_kernels(chosen)
    else:
        assert _cosine(_main(chosen, example), reference) >= 0.99, report.message
    # int8 kernels asked for by name: they are built whatever their speed here, and must stay close to float
    int8 = keiryo.quantize(
        model, keiryo.Int8Dynamic(), example_inputs=example, policy=keiryo.Policy(backend="fbgemm", runs=1)
    )
    assert has_quantized_kernels(int8) and not report_of(int8).kept_float
    assert _cosine(_main(int8, example), reference) >= 0.99
    assert report_of(int8).output == report.output
    loaded = _reloads(int8, example, tmp_path)
    assert has_quantized_kernels(loaded)
    if name in DECODERS:
        _generates(loaded, example)
    with pytest.raises(KeiryoError, match="keiryo.load") as info:  # int8 has no folder transformers reads
        export(int8, example, tmp_path / "hf", "hf")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_pruned_family_is_then_int8_quantized_and_reloaded(tmp_path, name):
    """The user's whole path: prune, then quantize the pruned model, then save and load the result."""
    model, example = _family(name), _example(name)
    pruned = keiryo.prune(model, 0.5, example_inputs=example)
    int8 = keiryo.quantize(
        pruned, "int8-dynamic", example_inputs=example, policy=keiryo.Policy(backend="fbgemm", runs=1)
    )
    assert _cosine(_main(int8, example), _main(pruned, example)) >= 0.99
    loaded = _reloads(int8, example, tmp_path)
    assert has_quantized_kernels(loaded) and _params(loaded) <= 0.6 * _params(model)
    assert loaded._keiryo_metadata["pruning"]["ratio"] == 0.5
    if name in DECODERS:
        _generates(loaded, example)
