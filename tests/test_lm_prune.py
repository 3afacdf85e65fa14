"""Structured pruning (heads by key/value group, FFN width, whole blocks) and distillation of causal LMs, on
tiny Llama / Qwen2 / GPT-2 configs with random weights built here."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from keiryo.compress.prune_transformers import kept_count  # noqa: E402
from keiryo.errors import ConfigError  # noqa: E402
from keiryo.lm import (  # noqa: E402
    load_compressed,
    prune,  # noqa: E402
    save_compressed,
)
from keiryo.lm.calibrate import Gather, block_linears, linearize, run_layerwise  # noqa: E402
from keiryo.lm.compress import check_chain, compress  # noqa: E402
from keiryo.lm.distill import LMDistill, LMDistillLoss, cache_teacher, distill  # noqa: E402
from keiryo.lm.load import decoder_layers  # noqa: E402
from keiryo.lm.prune import (  # noqa: E402
    IMPORTANCE_TOKENS,
    Structured,
    block_importance,
    blocks_removed,
    first_tokens,
    input_widths,
    least_important,
    structured_prune,
)
from keiryo.lm.quant import WeightQuant  # noqa: E402
from keiryo.lm.reconstruct import Reconstruct, segments  # noqa: E402
from keiryo.lm.smooth import SmoothQuant  # noqa: E402

VOCAB = 128


def _config(arch: str, layers: int = 4):
    common = {"initializer_range": 0.1}  # peaked distributions: something for a student to learn
    if arch == "llama":
        return transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=True, **common,
        )  # fmt: skip
    if arch == "qwen2":  # biases on q/k/v, untied head, per-layer layer_types
        return transformers.Qwen2Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **common,
        )  # fmt: skip
    return transformers.GPT2Config(  # Conv1D layers (linearized), one key/value head per query head
        vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=128, bos_token_id=0,
        eos_token_id=0, **common,
    )  # fmt: skip


def _model(arch: str = "llama", seed: int = 0, layers: int = 4):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(arch, layers), attn_implementation="sdpa")
    return linearize(model.eval())


def _windows(count: int, length: int = 32, seed: int = 1):
    return torch.randint(0, VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))


CALIBRATION = _windows(8)
HELD_OUT = _windows(8, seed=2)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


def _kl(teacher, student, ids) -> float:
    """Mean per-token KL(teacher ‖ student) on `ids`."""
    t, s = _logits(teacher, ids), _logits(student, ids)
    return float(
        F.kl_div(F.log_softmax(s, -1).flatten(0, 1), F.softmax(t, -1).flatten(0, 1), reduction="batchmean")
    )


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --- pruning ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_pruned_shapes_and_config_agree_and_the_model_reloads_and_generates(arch, tmp_path):
    model = _model(arch)
    before = _params(model)
    compress(model, Structured(heads=0.5, ffn=0.5, layers=1), CALIBRATION)
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (3, 2, 1)
    assert config.intermediate_size == 64 and config.head_dim == 16
    if arch == "qwen2":
        assert len(config.layer_types) == 3
    blocks = decoder_layers(model)
    assert len(blocks) == 3 and [b.self_attn.layer_idx for b in blocks] == [0, 1, 2]
    for block in blocks:
        assert block.self_attn.q_proj.weight.shape == (32, 64) and block.self_attn.k_proj.weight.shape == (
            16,
            64,
        )
        assert block.self_attn.o_proj.weight.shape == (64, 32) and block.mlp.down_proj.weight.shape == (
            64,
            64,
        )
    assert _params(model) < 0.75 * before
    # the keiryo file and a Hugging Face folder both rebuild the smaller model from its config alone
    save_compressed(model, tmp_path / "m.pt")
    ids = HELD_OUT[:2]
    torch.testing.assert_close(_logits(load_compressed(tmp_path / "m.pt"), ids), _logits(model, ids))
    model.save_pretrained(tmp_path / "hf")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(_logits(again, ids), _logits(model, ids))
    # generation with the KV cache (one slot per remaining block) follows the model's own greedy choice
    out = model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 14)
    assert int(out[0, 8]) == int(_logits(model, ids[:1, :8])[0, -1].argmax())


def test_gpt2_loses_feed_forward_width_and_blocks_but_refuses_heads(tmp_path):
    model = _model("gpt2")
    compress(model, Structured(ffn=0.25, layers=2), CALIBRATION)
    assert (model.config.n_layer, model.config.n_inner) == (2, 192)
    assert [b.attn.layer_idx for b in model.transformer.h] == [0, 1]
    save_compressed(model, tmp_path / "g.pt")
    torch.testing.assert_close(
        _logits(load_compressed(tmp_path / "g.pt"), HELD_OUT[:2]), _logits(model, HELD_OUT[:2])
    )
    with pytest.raises(ConfigError, match="GPT-2"):
        compress(_model("gpt2"), Structured(heads=0.5), CALIBRATION)


def _widths(model) -> set[int]:
    return {layer.in_features for block in decoder_layers(model) for layer in block_linears(block).values()}


@pytest.mark.parametrize(
    ("arch", "configs"),
    [
        ("llama", [Structured(ffn=0.375)]),
        ("llama", [Structured(heads=0.5, ffn=0.3, layers=1)]),
        ("qwen2", [Structured(heads=0.5), Structured(ffn=0.25), Structured(ffn=0.4)]),
        ("gpt2", [Structured(ffn=0.3)]),
        ("llama", [Structured(ffn=0.2, ffn_multiple=24)]),  # 103 of 128 kept, moved to 96
        ("qwen2", [Structured(ffn=0.3, ffn_multiple=16), Structured(heads=0.5)]),
    ],
)
def test_input_widths_foretell_the_shapes_pruning_leaves(arch, configs):
    model = _model(arch)
    expected = input_widths(model, configs)
    for config in configs:
        compress(model, replace(config, importance="l2"), CALIBRATION)
    assert expected == _widths(model)
    assert len(expected) > 1  # the narrowed layers differ from the model width


def test_kept_neurons_move_to_the_nearest_multiple_asked_for():
    assert kept_count(1536, 0.55) == 845 and kept_count(1536, 0.55, 64) == 832  # SmolLM2's FFN, 45% pruned
    assert kept_count(1536, 0.6, 64) == 896  # 921.6 → 921 kept: nearer 896 than 960
    assert kept_count(96, 1.0, 64) == 64  # a tie goes down
    assert kept_count(128, 0.1, 64) == 64 and kept_count(100, 0.99, 64) == 100  # one multiple, ≤ the width
    model = _model("llama")  # 128 neurons
    compress(model, Structured(ffn=0.45, ffn_multiple=32, importance="l2"), CALIBRATION)
    assert {block.mlp.down_proj.in_features for block in decoder_layers(model)} == {64}
    check_chain(_model("llama"), [Structured(ffn=0.45, ffn_multiple=64), WeightQuant("int4")])
    with pytest.raises(ConfigError, match="ffn_multiple must be a whole number ≥ 1"):
        Structured(ffn=0.5, ffn_multiple=0)


def test_a_chain_whose_quantizer_cannot_take_the_pruned_widths_is_refused_before_any_work():
    model = _model("llama")  # hidden 64, 128 neurons: 37.5% removed leaves 80, not a multiple of 32 or 64
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    width = Structured(ffn=0.375)
    with pytest.raises(ConfigError, match="int4 groups of 64 .* 80"):
        check_chain(model, [width, "int4"])
    with pytest.raises(ConfigError, match="blocks of 32 .* 80"):
        check_chain(model, [width, "int8"], gguf=True)
    with pytest.raises(ConfigError, match="blocks of 32"):
        check_chain(model, [Structured(ffn=0.375), SmoothQuant(alpha=None)], gguf=True)
    check_chain(model, [width, "int8"])  # a keiryo file keeps int8 rows of any length
    check_chain(model, [Structured(ffn=0.25), WeightQuant("int4", group_size=32)], gguf=True)  # 96 neurons
    check_chain(model, ["int8"], gguf=True)
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())  # nothing was pruned


def test_width_steps_gather_statistics_only_of_the_layers_they_narrow(monkeypatch):
    seen = []
    model = _model("llama")
    gather = Gather("hessian", layers=lambda block: [block.mlp.down_proj])
    run_layerwise(model, CALIBRATION, lambda i, block, stats: seen.append(sorted(stats)), gather)
    assert seen == [["mlp.down_proj"]] * 4
    # refit of heads and neurons: XᵀX of the output and down projections only, not of q/k/v or gate/up
    gathered, real = [], prune.run_layerwise

    def spy(model, windows, step, gather, progress):
        def recording(index, block, stats):
            gathered.append(sorted(stats))
            step(index, block, stats)

        real(model, windows, recording, gather, progress)

    monkeypatch.setattr(prune, "run_layerwise", spy)
    compress(model, Structured(heads=0.5, ffn=0.25, refit=True), CALIBRATION)
    assert gathered == [["mlp.down_proj", "self_attn.o_proj"]] * 4


def test_the_block_that_leaves_its_input_unchanged_is_the_one_removed():
    model = _model("llama")
    block = decoder_layers(model)[2]
    with torch.no_grad():  # block 2 adds nothing to the residual stream: output = input
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    reference = copy.deepcopy(model)
    scores = block_importance(model, CALIBRATION)
    assert float(scores[2]) == pytest.approx(0.0, abs=1e-6) and float(scores.min()) == float(scores[2])
    compress(model, Structured(layers=1), CALIBRATION)
    torch.testing.assert_close(_logits(model, HELD_OUT), _logits(reference, HELD_OUT), rtol=1e-4, atol=1e-4)


def _silence_group_and_neurons(model):
    """In every block: key/value group 1 outputs nothing (zero value rows) but has the largest weights
    otherwise; FFN neurons 0-63 output nothing (zero up rows) but have the largest gate rows."""
    with torch.no_grad():
        for block in decoder_layers(model):
            attn, mlp = block.self_attn, block.mlp
            attn.v_proj.weight[16:].zero_()
            attn.q_proj.weight[32:] *= 20
            attn.k_proj.weight[16:] *= 20
            attn.o_proj.weight[:, 32:] *= 20
            mlp.up_proj.weight[:64].zero_()
            mlp.gate_proj.weight[:64] *= 20


def test_activations_find_the_silent_heads_and_neurons_that_weight_norms_keep():
    model = _model("llama")
    _silence_group_and_neurons(model)
    reference = copy.deepcopy(model)
    by_activation, by_weight = copy.deepcopy(model), copy.deepcopy(model)
    compress(by_activation, Structured(heads=0.5, ffn=0.5), CALIBRATION)
    compress(by_weight, Structured(heads=0.5, ffn=0.5, importance="l2"), CALIBRATION)
    # what activations removed contributed nothing: the outputs are the unpruned model's
    torch.testing.assert_close(
        _logits(by_activation, HELD_OUT), _logits(reference, HELD_OUT), rtol=1e-4, atol=1e-4
    )
    # weight norms removed the working half instead
    assert _kl(reference, by_weight, HELD_OUT) > 0.05


def _twin_group_and_neurons(model):
    """In every block: key/value group 1 (with its query heads) computes what group 0 does, and FFN neurons
    64-127 what neurons 0-63 do; the twins' output columns are small (so they rank last), not zero."""
    with torch.no_grad():
        for block in decoder_layers(model):
            attn, mlp = block.self_attn, block.mlp
            attn.q_proj.weight[32:] = attn.q_proj.weight[:32]
            attn.k_proj.weight[16:] = attn.k_proj.weight[:16]
            attn.v_proj.weight[16:] = attn.v_proj.weight[:16]
            attn.o_proj.weight[:, 32:] = 0.02 * torch.randn(64, 32) * attn.o_proj.weight[:, :32].std()
            mlp.gate_proj.weight[64:] = mlp.gate_proj.weight[:64]
            mlp.up_proj.weight[64:] = mlp.up_proj.weight[:64]
            mlp.down_proj.weight[:, 64:] = 0.02 * torch.randn(64, 64) * mlp.down_proj.weight[:, :64].std()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_refit_moves_the_work_of_pruned_twins_onto_the_kept_heads_and_neurons(arch):
    model = _model(arch)
    _twin_group_and_neurons(model)
    reference = copy.deepcopy(model)
    refit, plain = copy.deepcopy(model), copy.deepcopy(model)
    compress(refit, Structured(heads=0.5, ffn=0.5, refit=True), CALIBRATION)
    compress(plain, Structured(heads=0.5, ffn=0.5), CALIBRATION)
    assert refit.config.intermediate_size == 64 and refit.config.num_key_value_heads == 1
    # the kept twin's output columns now carry both: the pruned model computes what the unpruned one did
    torch.testing.assert_close(_logits(refit, HELD_OUT), _logits(reference, HELD_OUT), rtol=0, atol=2e-3)
    assert _kl(reference, plain, HELD_OUT) > 100 * max(_kl(reference, refit, HELD_OUT), 1e-7)


def test_refit_brings_a_width_pruned_model_closer_to_the_unpruned_one():
    # GPT-2's 256 GELU neurons on random weights overlap (as trained models' do, where refit takes SmolLM2's
    # perplexity from +64% to +19% at 37.5% of the neurons); tiny random SwiGLU ones barely do
    model, windows = _model("gpt2"), _windows(64, seed=5)
    refit = compress(copy.deepcopy(model), Structured(ffn=0.5, refit=True), windows)
    plain = compress(copy.deepcopy(model), Structured(ffn=0.5), windows)
    assert _params(refit) == _params(plain) < _params(model)
    before, after = _kl(model, plain, HELD_OUT), _kl(model, refit, HELD_OUT)
    assert after < 0.5 * before, (before, after)  # 0.156 → 0.041 when written


def test_l2_importance_prunes_without_calibration_and_bad_configs_are_one_line_errors():
    model = _model("llama")
    structured_prune(model, Structured(ffn=0.25, importance="l2"), None, None)
    assert model.config.intermediate_size == 96
    for bad in (
        {"heads": 1.0},
        {"ffn": -0.1},
        {"layers": -1},
        {"layers": 1.5},
        {"layers": 1.0},
        {"layers": 0.0},
        {"importance": "taylor"},
        {"batch_size": 0},
        {"refit": True},
        {"refit": True, "layers": 2},
        {"refit": True, "ffn": 0.5, "importance": "l2"},
        {"refit": 1, "ffn": 0.5},
    ):
        with pytest.raises(ConfigError):
            Structured(**bad)
    with pytest.raises(ConfigError, match="calibration"):
        compress(_model("llama"), Structured(ffn=0.5), None)
    with pytest.raises(ConfigError, match="at most 3"):
        compress(_model("llama"), Structured(layers=4), CALIBRATION)


def test_layers_as_a_share_removes_that_share_of_the_blocks_rounded_half_up():
    assert [blocks_removed(0.25, n) for n in (30, 10, 8, 2)] == [8, 3, 2, 1]
    assert blocks_removed(0.01, 4) == 1 and blocks_removed(5, 30) == 5  # at least one; a count stays
    assert blocks_removed(0.7, 45) == 32  # 31.4999… in floating point: still a half, rounded up
    model = compress(_model("llama"), Structured(layers=0.5), CALIBRATION)
    assert model.config.num_hidden_layers == len(decoder_layers(model)) == 2


def test_progress_is_called_once_per_remaining_block():
    calls = []
    compress(_model("llama"), Structured(ffn=0.5, layers=1), CALIBRATION, progress=calls.append)
    assert calls == [1, 1, 1]


# --- reconstruction after removing blocks ---------------------------------------------------------------


def test_segments_widen_each_removed_run_and_merge_those_that_touch():
    assert segments(30, [12, 13, 14, 15, 16, 17, 25, 26], 3) == [(9, 20), (22, 29)]
    assert segments(30, [12, 13, 14, 15, 16, 17, 25, 26], 5) == [(7, 29)]  # (7, 22) and (20, 29) overlap
    assert segments(10, [0, 9], 1) == [(0, 1), (8, 9)]  # clamped to the model
    assert segments(10, [3, 6], 1) == [(2, 7)]  # (2, 4) and (5, 7) touch
    # width pruning changed every block: runs of `around` surviving blocks cover the model
    assert segments(8, [], 3, every=True) == [(0, 2), (3, 5), (6, 7)]
    assert segments(8, [1, 7], 3, every=True) == [(0, 3), (4, 7)]  # a removed block rides in its run
    assert segments(6, [4, 5], 2, every=True) == [(0, 1), (2, 5)]  # removed ones alone at the end join
    # block importance reads the first windows only, up to a number of tokens, at least one window
    assert first_tokens(CALIBRATION, 100).shape == (3, 32) and len(first_tokens(CALIBRATION, 1)) == 1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reconstruction_brings_a_depth_pruned_model_closer_and_leaves_far_blocks_alone(arch):
    teacher = _model(arch, layers=8)
    # 118 windows: the last batch of 4 is smaller than the one the blocks' arguments were captured with
    windows = _windows(118, seed=5)
    removed = least_important(block_importance(teacher, first_tokens(windows, IMPORTANCE_TOKENS)), 2)
    plain = compress(copy.deepcopy(teacher), Structured(layers=2), windows)
    config = Reconstruct(epochs=4, around=1, lr=3e-3, progress=False)
    rebuilt = compress(copy.deepcopy(teacher), Structured(layers=2, reconstruct=config), windows)
    assert all(p.grad is None for p in rebuilt.parameters())  # no gradients left behind
    assert rebuilt.config.num_hidden_layers == 6 and _params(rebuilt) == _params(plain)
    before, after = _kl(teacher, plain, HELD_OUT), _kl(teacher, rebuilt, HELD_OUT)
    assert after < 0.7 * before, (before, after)  # llama 0.101 → 0.059, GPT-2 0.099 → 0.010 when written
    spans = segments(8, removed, 1)
    kept = [i for i in range(8) if i not in removed]
    inside = {new: any(lo <= old <= hi for lo, hi in spans) for new, old in enumerate(kept)}
    same = {
        new: _same_block(decoder_layers(rebuilt)[new], decoder_layers(teacher)[old])
        for new, old in enumerate(kept)
    }
    assert all(same[i] for i in inside if not inside[i])  # blocks outside every segment: the teacher's
    assert not all(same[i] for i in inside if inside[i])  # those inside were trained


def test_reconstruction_after_width_pruning_retrains_every_block_closer_to_the_unpruned_model():
    teacher, windows = _model("gpt2"), _windows(256, seed=5)
    config = Reconstruct(epochs=2, around=2, lr=1e-3, progress=False)
    plain = compress(copy.deepcopy(teacher), Structured(ffn=0.5), windows)
    rebuilt = compress(copy.deepcopy(teacher), Structured(ffn=0.5, reconstruct=config), windows)
    assert _params(rebuilt) == _params(plain) and all(p.grad is None for p in rebuilt.parameters())
    before, after = _kl(teacher, plain, HELD_OUT), _kl(teacher, rebuilt, HELD_OUT)
    assert after < 0.5 * before, (before, after)  # 0.156 → 0.044 when written
    # the same neurons went (ranked on the same windows); every block was then trained
    assert not any(
        _same_block(a, b) for a, b in zip(decoder_layers(rebuilt), decoder_layers(plain), strict=True)
    )


def _same_block(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_reconstruction_in_bf16_keeps_float32_weights_and_bad_configs_are_one_line_errors():
    teacher = _model("qwen2", layers=6)
    config = Reconstruct(epochs=2, around=1, lr=3e-3, precision="bf16", progress=False)
    rebuilt = compress(copy.deepcopy(teacher), Structured(layers=1, reconstruct=config), CALIBRATION)
    assert rebuilt.config.num_hidden_layers == 5
    assert all(p.dtype == torch.float32 for p in rebuilt.parameters())
    assert all(torch.isfinite(p).all() for p in rebuilt.parameters())
    # depth and width at once: the segments cover every block, the removed one inside its run
    both = Structured(layers=1, heads=0.5, ffn=0.5, refit=True, reconstruct=config)
    rebuilt = compress(copy.deepcopy(teacher), both, CALIBRATION)
    config_after = rebuilt.config
    assert (config_after.num_hidden_layers, config_after.num_key_value_heads) == (5, 1)
    assert config_after.intermediate_size == 64
    assert all(torch.isfinite(p).all() and p.grad is None for p in rebuilt.parameters())
    for bad in ({"epochs": 0}, {"around": 0}, {"lr": 0.0}, {"lr": float("nan")}, {"precision": "int3"}):
        with pytest.raises(ConfigError):
            Reconstruct(**bad)
    with pytest.raises(ConfigError, match="set layers, heads or ffn"):
        Structured(importance="l2", reconstruct=Reconstruct())
    with pytest.raises(ConfigError, match="Reconstruct"):
        Structured(layers=1, reconstruct={"epochs": 1})


# --- distillation -------------------------------------------------------------------------------------------


def test_cached_teacher_gives_the_same_loss_as_running_it():
    teacher, student = _model("llama"), _model("llama", seed=3, layers=2)
    rows = torch.tensor([3, 0, 5])
    config = LMDistill(temperature=2.0, alpha=0.7, top_k=None)
    cache = cache_teacher(teacher, CALIBRATION, config)
    cached, _ = LMDistillLoss(teacher, CALIBRATION, config, cache)(student, rows, torch.zeros(3))
    live, _ = LMDistillLoss(teacher, CALIBRATION, config, None)(student, rows, torch.zeros(3))
    torch.testing.assert_close(cached, live)
    # top-k keeps each position's k most likely tokens with their exact probabilities
    top = cache_teacher(teacher, CALIBRATION, LMDistill(temperature=2.0, top_k=8))
    dense = top.targets(rows)
    full = cache.targets(rows)
    assert int((dense > 0).sum(1).max()) == 8
    kept = dense > 0
    torch.testing.assert_close(dense[kept], full[kept])
    mass = dense.sum(1)  # the k most likely of V tokens hold at least k/V of the mass, and at most all
    assert bool((mass <= 1 + 1e-5).all()) and bool((mass >= 8 / VOCAB - 1e-6).all())


def test_healing_lowers_the_held_out_kl_of_a_pruned_model():
    teacher = _model("llama")
    pruned = compress(copy.deepcopy(teacher), Structured(heads=0.5, ffn=0.5, layers=1), CALIBRATION)
    unhealed = _kl(teacher, pruned, HELD_OUT)
    embedding = pruned.get_input_embeddings().weight.detach().clone()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    distill(teacher, pruned, _windows(160, seed=4), LMDistill(steps=40, lr=3e-3, top_k=32, progress=False))
    healed = _kl(teacher, pruned, HELD_OUT)
    assert healed < 0.9 * unhealed, (unhealed, healed)  # 0.48 → 0.38 when written
    torch.testing.assert_close(pruned.get_input_embeddings().weight, embedding)  # frozen by default
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())  # never trained
    assert pruned.get_input_embeddings().weight.requires_grad  # given back as it was


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_fresh_shallower_student_learns_from_the_teacher(precision):
    teacher = _model("qwen2")
    student = _model("qwen2", seed=5, layers=2)
    before = _kl(teacher, student, HELD_OUT)
    distill(
        teacher,
        student,
        _windows(32, seed=4),
        LMDistill(steps=40, lr=3e-3, train_embeddings=True, precision=precision, progress=False),
    )
    assert _kl(teacher, student, HELD_OUT) < 0.7 * before
    assert next(student.parameters()).dtype == torch.float32  # autocast: the weights stay float32


def test_distillation_inputs_are_checked():
    teacher = _model("llama")
    with pytest.raises(ConfigError, match="different model"):
        distill(teacher, teacher, CALIBRATION)
    with pytest.raises(ConfigError, match="windows"):
        distill(teacher, _model("llama", seed=1), CALIBRATION[0])
    for bad in (
        {"steps": 0},
        {"top_k": 0},
        {"lr": 0.0},
        {"temperature": 0.0},
        {"alpha": 2.0},
        {"precision": "int3"},
    ):
        with pytest.raises(ConfigError):
            LMDistill(**bad)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB * 2, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    other_vocab = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ConfigError, match="shape"):
        distill(teacher, other_vocab, CALIBRATION, LMDistill(steps=1, progress=False))
