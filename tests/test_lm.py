"""Language models (keiryo.lm) on tiny Llama / Qwen2 / GPT-2 configs with random weights, built here."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from keiryo.errors import ArtifactError, ConfigError, ModelError, TrustError  # noqa: E402
from keiryo.lm import (  # noqa: E402
    SmoothQuant,
    Sparsify,
    WeightQuant,
    calibration_windows,
    compress,
    generation_speed,
    load_causal_lm,
    load_compressed,
    perplexity,
    save_compressed,
    split_documents,
    tokenize,
)
from keiryo.lm.calibrate import block_linears, each_block, linearize  # noqa: E402
from keiryo.lm.kernels import KERNEL_MAX_ROWS, Int4Linear, Int8Linear, W8A8Linear  # noqa: E402
from keiryo.lm.load import decoder_layers  # noqa: E402
from keiryo.lm.quant import gptq_quantize, int4_rtn  # noqa: E402
from keiryo.lm.smooth import smooth_block  # noqa: E402
from keiryo.lm.sparsity import keep_mask, sparsity_of, wanda_score  # noqa: E402
from keiryo.lm.text import plain_text  # noqa: E402

VOCAB = 256


def _config(arch: str):
    if arch == "llama":
        return transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=True,
        )  # fmt: skip
    if arch == "qwen2":  # biases on q/k/v, untied head
        return transformers.Qwen2Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        )  # fmt: skip
    return transformers.GPT2Config(  # Conv1D layers, learned positions
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0
    )


def _model(arch: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(_config(arch), attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def models():
    return {arch: _model(arch) for arch in ("llama", "qwen2", "gpt2")}


@pytest.fixture(scope="module")
def calibration():
    return torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids.unsqueeze(0)).logits[0].float()


def _cosine(a, b):
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


IDS = torch.randint(0, VOCAB, (100,), generator=torch.Generator().manual_seed(2))


# --- perplexity and speed -----------------------------------------------------------------------------------


def test_perplexity_with_one_window_is_exp_of_mean_nll(models):
    model = models["llama"]
    direct = math.exp(float(F.cross_entropy(_logits(model, IDS)[:-1], IDS[1:])))
    result = perplexity(model, IDS, context=128)
    assert result.tokens == len(IDS) - 1
    assert result.perplexity == pytest.approx(direct, rel=1e-5)


def test_sliding_window_scores_every_token_once_with_the_stated_context(models):
    model = models["qwen2"]
    overlapping = perplexity(model, IDS, context=32, stride=16)
    assert (overlapping.tokens, overlapping.context, overlapping.stride) == (len(IDS) - 1, 32, 16)
    # stride = context: disjoint windows; each window's first token has no context, so it is not scored
    disjoint = perplexity(model, IDS, context=25, stride=25)
    nll = sum(
        float(F.cross_entropy(_logits(model, IDS[s : s + 25])[:-1], IDS[s + 1 : s + 25], reduction="sum"))
        for s in range(0, 100, 25)
    )
    assert disjoint.tokens == 4 * 24
    assert disjoint.mean_nll == pytest.approx(nll / 96, rel=1e-5)
    with pytest.raises(ConfigError):
        perplexity(model, IDS, context=16, stride=32)


def test_generation_speed_times_every_model_at_each_batch(models):
    speeds = generation_speed(
        {"a": models["llama"], "b": models["gpt2"]}, IDS[:16], batch_size=2, new_tokens=3, rounds=1
    )
    assert set(speeds) == {"a", "b"}
    for speed in speeds.values():
        assert speed.prefill_ms > 0 and speed.decode_tokens_per_s > 0
        assert (speed.batch_size, speed.prompt_tokens, speed.new_tokens) == (2, 16, 3)


# --- quantization -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_int8_weight_only_logits_follow_float_on_both_paths(models, arch):
    model = models[arch]
    quantized = compress(copy.deepcopy(model), "int8")
    assert not any(block_linears(block) for block in decoder_layers(quantized))  # no float Linear left
    assert not any(type(m).__name__ == "Conv1D" for m in quantized.modules())  # GPT-2's, linearized first
    assert isinstance(quantized.get_output_embeddings(), Int8Linear)
    long, short = IDS[:64], IDS[:KERNEL_MAX_ROWS]  # dequantized float GEMM / the fused int8 kernel
    assert _cosine(_logits(quantized, long), _logits(model, long)) >= 0.99
    assert _cosine(_logits(quantized, short), _logits(model, short)) >= 0.99


def test_int4_layer_kernel_and_dequantized_paths_agree():
    torch.manual_seed(0)
    weight = torch.randn(96, 128)
    layer = Int4Linear(*int4_rtn(weight, 64), 64, torch.randn(96))
    assert torch.equal(layer.integers(), int4_rtn(weight, 64)[0])  # unpacking the CPU layout is exact
    x = torch.randn(KERNEL_MAX_ROWS + 1, 128)
    many = layer(x)  # more rows than the kernel takes: dequantized float32
    few = torch.cat([layer(x[:8]), layer(x[8:16]), layer(x[16:])])  # the int4 kernel, bf16 activations
    assert _cosine(many, few) > 0.999
    assert _cosine(many, x @ weight.t()) > 0.97


def _correlated_layer(seed: int = 0, tokens: int = 2048, inputs: int = 128, outputs: int = 64):
    """Inputs driven by a few shared factors (as LLM activations are) and the layer's float weight."""
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(tokens, 8, generator=g) @ torch.randn(8, inputs, generator=g)
    x = factors + 0.1 * torch.randn(tokens, inputs, generator=g)
    return x, torch.randn(outputs, inputs, generator=g)


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_reconstructs_a_layer_with_correlated_inputs_better_than_rtn(act_order):
    x, weight = _correlated_layer()
    hessian = 2 * x.t() @ x / len(x)

    def error(q, scale, zero):
        w = ((q.float().reshape(64, -1, 32) - 8) * scale.unsqueeze(-1) + zero.unsqueeze(-1)).reshape(64, 128)
        return float(((x @ weight.t() - x @ w.t()) ** 2).mean())

    rtn = error(*int4_rtn(weight, 32))
    gptq = error(*gptq_quantize(weight, hessian, 32, act_order=act_order))
    assert gptq < 0.7 * rtn


def test_gptq_model_has_int4_layers_and_follows_float(models, calibration):
    model = models["qwen2"]
    rtn = compress(copy.deepcopy(model), "int4")
    gptq = compress(copy.deepcopy(model), WeightQuant("int4", "gptq"), calibration)
    assert sum(isinstance(m, Int4Linear) for m in gptq.modules()) == 14  # 7 Linears × 2 blocks
    assert _cosine(_logits(gptq, IDS), _logits(model, IDS)) > 0.99
    assert _cosine(_logits(rtn, IDS), _logits(model, IDS)) > 0.99


def test_quantization_options_are_checked(models, calibration):
    model = copy.deepcopy(models["llama"])
    with pytest.raises(ConfigError, match="calibration"):
        compress(model, WeightQuant("int4", "gptq"))
    with pytest.raises(ConfigError, match="unknown"):
        compress(model, "int3")
    with pytest.raises(ConfigError, match="group size"):
        compress(model, WeightQuant("int4", group_size=48))


# --- sparsity ---------------------------------------------------------------------------------------------


def test_wanda_keeps_the_weights_of_a_large_activation_that_magnitude_prunes(calibration):
    """Input feature 5 of every first block's q/k/v is 40× larger than the others (its norm scale), while its
    weights are 10× smaller than typical: magnitude removes them, Wanda keeps them."""
    model = _model("llama")
    block = decoder_layers(model)[0]
    with torch.no_grad():
        block.input_layernorm.weight[5] = 40.0
        for proj in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
            proj.weight[:, 5] = 0.1 * proj.weight.abs().mean() * torch.sign(proj.weight[:, 5])
    magnitude = compress(copy.deepcopy(model), "magnitude", calibration)
    wanda = compress(copy.deepcopy(model), "wanda", calibration)
    for name in ("q_proj", "k_proj", "v_proj"):
        assert (getattr(decoder_layers(magnitude)[0].self_attn, name).weight[:, 5] == 0).all()
        assert (getattr(decoder_layers(wanda)[0].self_attn, name).weight[:, 5] != 0).all()
    assert sparsity_of(wanda) == pytest.approx(0.5, abs=1e-3)
    assert sparsity_of(magnitude) == pytest.approx(0.5, abs=1e-3)


def test_wanda_score_weighs_each_input_by_its_activation_norm():
    weight = torch.tensor([[1.0, 0.2, 0.9, 0.8]])
    norms_sq = torch.tensor([1.0, 100.0, 1.0, 1.0])  # input 1 is 10× larger
    assert keep_mask(weight.abs(), "unstructured").tolist() == [[True, False, True, False]]
    assert keep_mask(wanda_score(weight, norms_sq), "unstructured").tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("importance", ["magnitude", "wanda"])
def test_two_four_leaves_exactly_two_nonzeros_in_every_group_of_four(models, calibration, importance):
    pruned = compress(copy.deepcopy(models["gpt2"]), Sparsify(importance, "2:4"), calibration)
    for block in decoder_layers(pruned):
        for linear in block_linears(block).values():
            groups = (linear.weight != 0).reshape(linear.out_features, -1, 4).sum(-1)
            assert (groups == 2).all()


# --- W8A8 and SmoothQuant ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "pairs"), [("llama", 3), ("qwen2", 3), ("gpt2", 2)])
def test_smoothing_moves_activation_range_into_weights_without_changing_the_model(
    models, calibration, arch, pairs
):
    model = linearize(copy.deepcopy(models[arch]))
    smoothed = []
    each_block(
        model,
        calibration,
        lambda i, block, ranges: smoothed.append(smooth_block(block, ranges, 0.5)),
        SmoothQuant(alpha=0.5),
    )
    assert smoothed == [pairs, pairs]  # every block's norm → projections pairs were found and scaled
    assert torch.allclose(_logits(model, IDS), _logits(models[arch], IDS), atol=1e-4)


def test_smoothquant_recovers_what_outlier_channels_cost_plain_w8a8(models, calibration):
    model = copy.deepcopy(models["llama"])
    with torch.no_grad():  # a few activation channels 40x the others, as in real LLMs
        for block in model.model.layers:
            block.input_layernorm.weight[[3, 17, 40]] *= 40
            block.post_attention_layernorm.weight[[5, 33]] *= 40
    reference = _logits(model, IDS)
    plain = compress(copy.deepcopy(model), SmoothQuant(alpha=None))
    smooth = compress(copy.deepcopy(model), SmoothQuant(alpha=0.5), calibration)
    assert isinstance(smooth.model.layers[0].self_attn.q_proj, W8A8Linear)
    plain_cos, smooth_cos = _cosine(_logits(plain, IDS), reference), _cosine(_logits(smooth, IDS), reference)
    assert smooth_cos > 0.99 and 1 - smooth_cos < 0.5 * (1 - plain_cos), (plain_cos, smooth_cos)
    with pytest.raises(ConfigError, match="calibration"):
        compress(copy.deepcopy(model), SmoothQuant())
    with pytest.raises(ConfigError, match="alpha"):
        SmoothQuant(alpha=1.5)


def test_w8a8_holds_one_packed_copy_and_scales_each_token_on_its_own():
    torch.manual_seed(0)
    weight = torch.randn(96, 64) * 0.05
    from keiryo.lm.quant import int8_rtn

    q, scale = int8_rtn(weight)
    per_token = W8A8Linear(q, scale, torch.randn(96))
    assert set(per_token.state_dict()) == {"bias"}  # no int8 buffers beside fbgemm's packed weight
    back_q, back_scale = per_token.int8_weight()
    assert torch.equal(back_q, q) and torch.equal(back_scale.float(), scale.float())
    per_tensor = W8A8Linear(q, scale, per_token.bias.detach(), per_token=False)
    x = torch.randn(2, 8, 64)
    x[0, 0] *= 200  # one outlier token, as the first token of a real LLM's sequence often is
    exact = F.linear(x, per_token.dequantize(), per_token.bias)
    small = (slice(None), slice(1, None))  # every other token

    def error(layer):
        return float((layer(x)[small] - exact[small]).norm() / exact[small].norm())

    tokenwise, tensorwise = error(per_token), error(per_tensor)
    assert tokenwise < 0.02 and 5 * tokenwise < tensorwise, (tokenwise, tensorwise)
    assert copy.deepcopy(per_token)(x).equal(per_token(x))


# --- every method: generation, storage ----------------------------------------------------------------------

METHODS = {
    "int8": lambda m, c: compress(m, "int8"),
    "int4-rtn": lambda m, c: compress(m, "int4"),
    "int4-gptq": lambda m, c: compress(m, WeightQuant("int4", "gptq"), c),
    "magnitude-50%": lambda m, c: compress(m, "magnitude"),
    "wanda-50%": lambda m, c: compress(m, "wanda", c),
    "magnitude-2:4": lambda m, c: compress(m, Sparsify("magnitude", "2:4")),
    "wanda-2:4": lambda m, c: compress(m, Sparsify("wanda", "2:4"), c),
    "w8a8-smoothquant": lambda m, c: compress(m, SmoothQuant(), c),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_generates_and_saves_smaller_than_float(models, calibration, tmp_path, method):
    model = models["llama"]
    compressed = METHODS[method](copy.deepcopy(model), calibration)
    prompt = IDS[:6].unsqueeze(0)
    out = compressed.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11) and torch.equal(out[:, :6], prompt)
    float_bytes = save_compressed(model, tmp_path / "float.pt")
    size = save_compressed(compressed, tmp_path / "small.pt")
    assert size < (0.75 if "%" in method or ":" in method else 0.45) * float_bytes
    reloaded = load_compressed(tmp_path / "small.pt")
    assert torch.allclose(_logits(reloaded, IDS), _logits(compressed, IDS), atol=1e-5)


def test_compressed_file_refuses_foreign_content(tmp_path):
    torch.save({"format": "something-else"}, tmp_path / "x.pt")
    with pytest.raises(ArtifactError, match="not a keiryo language model"):
        load_compressed(tmp_path / "x.pt")


# --- loading ------------------------------------------------------------------------------------------------


def _tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="w0")
    tokenizer.save_pretrained(directory)
    return tokenizer


def test_loads_a_hugging_face_folder_offline_with_its_tokenizer(tmp_path):
    model = _model("llama")
    model.save_pretrained(tmp_path)
    _tokenizer(tmp_path)
    loaded, tokenizer = load_causal_lm(f"hf:{tmp_path}")
    assert type(loaded).__name__ == "LlamaForCausalLM" and not loaded.training
    ids = tokenize(tokenizer, "w1 w2 w3 w4 nonsense")
    assert ids.tolist() == [1, 2, 3, 4, VOCAB - 1]
    assert torch.allclose(_logits(loaded, IDS), _logits(model, IDS), atol=1e-5)


def _write_gguf(model, path):
    """A float32 GGUF of a tiny Llama with a byte-level vocabulary, laid out as llama.cpp's converter does
    (q/k rows permuted for its rotary layout, which transformers undoes on load)."""
    import gguf  # a [dev] dependency: a missing one fails here rather than skipping the test
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    config, state = model.config, model.state_dict()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("gpt2")
    byte_chars = bytes_to_unicode()
    writer.add_token_list([byte_chars[i] for i in range(VOCAB)])
    writer.add_token_types([1] * VOCAB)
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_merges([])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)

    def permute(weight, heads):
        return (
            weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)
        )

    names = {"input_layernorm": "attn_norm", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}  # fmt: skip
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k = state[p + "self_attn.q_proj.weight"], state[p + "self_attn.k_proj.weight"]
        writer.add_tensor(f"blk.{i}.attn_q.weight", permute(q, config.num_attention_heads).numpy())
        writer.add_tensor(f"blk.{i}.attn_k.weight", permute(k, config.num_key_value_heads).numpy())
        for hf, gg in names.items():
            writer.add_tensor(f"blk.{i}.{gg}.weight", state[f"{p}{hf}.weight"].numpy())
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_loads_a_gguf_file_with_its_tokenizer(tmp_path):
    import accelerate  # noqa: F401  (a [dev] dependency: transformers reads GGUF only with it)

    model = _model("llama")
    _write_gguf(model, tmp_path / "tiny.gguf")
    loaded, tokenizer = load_causal_lm(f"gguf:{tmp_path / 'tiny.gguf'}")
    assert torch.equal(_logits(loaded, IDS), _logits(model, IDS))
    assert tokenize(tokenizer, "hi!").tolist() == [104, 105, 33]  # byte-level: one token per byte


def _bpe_tokenizer(directory):
    """A byte-level BPE tokenizer (GPT-2's byte alphabet, no merges) of VOCAB tokens, as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = bytes_to_unicode()
    core = Tokenizer(models.BPE({chars[i]: i for i in range(VOCAB)}, []))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=chars[1], bos_token=chars[0]
    )
    tokenizer.save_pretrained(directory)


GGUF_CASES = {  # method → (compress, largest |GGUF weight − keiryo weight|, file × float32 GGUF at most)
    "float": (lambda m, c: m, 0.0, 1.0),
    "int8": (lambda m, c: compress(m, "int8"), 0.0, 0.3),
    "int4-rtn": (lambda m, c: compress(m, WeightQuant("int4", group_size=64)), 2e-3, 0.2),
    "int4-gptq": (lambda m, c: compress(m, WeightQuant("int4", "gptq", group_size=32), c), 2e-3, 0.2),
    "w8a8-smoothquant": (lambda m, c: compress(m, SmoothQuant(), c), 0.0, 0.3),
    "wanda-2:4": (lambda m, c: compress(m, Sparsify("wanda", "2:4"), c), 0.0, 1.0),
}


@pytest.mark.parametrize("method", list(GGUF_CASES))
def test_gguf_export_holds_the_very_weights_keiryo_computes_with(tmp_path, calibration, method):
    from keiryo.lm.gguf_export import export_gguf

    _write_gguf(_model("llama"), tmp_path / "source.gguf")
    source = f"gguf:{tmp_path / 'source.gguf'}"
    model, tokenizer = load_causal_lm(source)
    make, tolerance, ratio = GGUF_CASES[method]
    compressed = make(copy.deepcopy(model), calibration)
    size = export_gguf(compressed, tmp_path / "out.gguf", source)
    assert size <= ratio * (tmp_path / "source.gguf").stat().st_size + 8192  # + metadata of the tiny file
    back, back_tokenizer = load_causal_lm(f"gguf:{tmp_path / 'out.gguf'}")  # transformers dequantizes it
    for block, back_block in zip(decoder_layers(compressed), decoder_layers(back), strict=True):
        for name, layer in block_linears(back_block).items():
            mine = block.get_submodule(name)
            weight = mine.dequantize() if hasattr(mine, "dequantize") else mine.weight
            assert (layer.weight - weight).abs().max() <= tolerance, name  # q/k: llama.cpp's row order undone
    if method in ("float", "int8", "wanda-2:4"):  # the same weights, and the same kernels' arithmetic
        assert torch.allclose(_logits(back, IDS), _logits(compressed, IDS), atol=1e-4)
    assert back_tokenizer("hi!")["input_ids"] == tokenizer("hi!")["input_ids"]


def test_gguf_export_from_a_hugging_face_folder_in_half_precision(tmp_path):
    from keiryo.lm.gguf_export import export_gguf

    model = _model("llama")
    model.save_pretrained(tmp_path / "hf")
    _bpe_tokenizer(tmp_path / "hf")
    loaded, tokenizer = load_causal_lm(f"hf:{tmp_path / 'hf'}")
    f32 = export_gguf(loaded, tmp_path / "f32.gguf", f"hf:{tmp_path / 'hf'}")
    for kind in ("f16", "bf16"):
        size = export_gguf(loaded, tmp_path / f"{kind}.gguf", f"hf:{tmp_path / 'hf'}", kind)
        assert size < 0.6 * f32
        back, back_tokenizer = load_causal_lm(tmp_path / f"{kind}.gguf")
        assert _cosine(_logits(back, IDS), _logits(loaded, IDS)) > 0.9999
        assert back_tokenizer("hi w1!")["input_ids"] == tokenizer("hi w1!")["input_ids"]


def test_gguf_export_refuses_what_it_cannot_write_in_one_line(tmp_path):
    from keiryo.lm.gguf_export import export_gguf

    model = _model("gpt2")
    with pytest.raises(ModelError, match="Llama-architecture models; this one is 'gpt2'"):
        export_gguf(model, tmp_path / "x.gguf", tmp_path)
    _model("llama").save_pretrained(tmp_path / "word")
    _tokenizer(tmp_path / "word")  # a word-level tokenizer: not byte-level BPE
    llama, _ = load_causal_lm(tmp_path / "word")
    with pytest.raises(ModelError, match="byte-level BPE"):
        export_gguf(llama, tmp_path / "x.gguf", tmp_path / "word")
    with pytest.raises(ConfigError, match="GGUF float type"):
        export_gguf(llama, tmp_path / "x.gguf", tmp_path / "word", "f8")
    assert not list(tmp_path.glob("*.gguf*"))  # nothing half-written is left


def test_refuses_a_folder_that_names_its_own_code(tmp_path):
    _model("llama").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(TrustError, match="auto_map"):
        load_causal_lm(tmp_path)


def test_bad_sources_are_one_line_errors(tmp_path):
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="GGUF magic"):
        load_causal_lm(f"gguf:{tmp_path / 'fake.gguf'}")
    with pytest.raises(ModelError, match="does not exist"):
        load_causal_lm(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(ModelError, match="config.json"):
        load_causal_lm(f"hf:{tmp_path}")


# --- text -------------------------------------------------------------------------------------------------


def test_held_out_and_calibration_splits_share_no_document():
    documents = {f"play{i}": f"text of play {i}\n" for i in range(10)}
    splits = split_documents(documents, held_out=3, seed=0)
    assert len(splits.held_out_names) == 3 and len(splits.calibration_names) == 7
    assert not set(splits.held_out_names) & set(splits.calibration_names)
    assert all(documents[n] not in splits.calibration for n in splits.held_out_names)
    with pytest.raises(ConfigError):
        split_documents(documents, held_out=10)


def test_plain_text_and_calibration_windows():
    assert plain_text("# Hamlet\n\n**HAMLET**  \n_Aside_ to be\n") == "Hamlet\n\nHAMLET\nAside to be\n"
    windows = calibration_windows(torch.arange(100), 4, 10, seed=0)
    assert windows.shape == (4, 10)
    assert all(torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 10)) for w in windows)
