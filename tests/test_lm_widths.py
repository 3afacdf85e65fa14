"""Feed-forward widths measured block by block (`Structured(ffn_widths="measured")`): the candidate widths,
the greedy sharing-out, the loss measured from a block on (the earlier blocks skipped), and the models it
makes — on tiny Llama / Qwen2 / GPT-2 configs with random weights built here."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_lm_prune import CALIBRATION, HELD_OUT, _model, _windows  # noqa: E402

from keiryo.errors import ConfigError, ModelError  # noqa: E402
from keiryo.lm import load_compressed, save_compressed  # noqa: E402
from keiryo.lm.calibrate import (  # noqa: E402
    block_output,
    capture_block_inputs,
    mean_loss,  # noqa: E402
)
from keiryo.lm.compress import NAMES, check_chain, compress  # noqa: E402
from keiryo.lm.load import decoder_layers  # noqa: E402
from keiryo.lm.prune import Structured, input_widths  # noqa: E402
from keiryo.lm.quant import WeightQuant  # noqa: E402
from keiryo.lm.reconstruct import Reconstruct  # noqa: E402
from keiryo.lm.widths import _loss_from, allocate, candidate_widths, measured_widths  # noqa: E402

MEASURED = Structured(ffn=0.5, refit=True, ffn_widths="measured")


def _widths(model) -> list[int]:
    mlps = [block.mlp for block in decoder_layers(model)]
    return [(mlp.down_proj if hasattr(mlp, "down_proj") else mlp.c_proj).in_features for mlp in mlps]


def test_candidate_widths_run_from_half_the_uniform_count_to_the_full_width():
    smollm = candidate_widths(1536, 0.5, 64)  # SmolLM2's FFN: uniform 768
    assert smollm[0] == 384 and smollm[-1] == 1536 and len(smollm) == 19
    assert all(w % 64 == 0 for w in smollm) and smollm == sorted(set(smollm))
    tiny = candidate_widths(128, 0.5, 1)
    assert tiny[0] == 32 and tiny[-1] == 128 and len(tiny) <= 25
    assert candidate_widths(128, 0.5, 64) == [64, 128]  # the floor never falls below one multiple


def test_allocate_gives_each_step_to_the_block_whose_cost_falls_most_within_the_budget():
    widths = [2, 4, 6, 8]
    costs = [[8.0, 4.0, 2.0, 1.0], [1.0, 0.9, 0.8, 0.7], [4.0, 1.0, 0.5, 0.0]]
    assert allocate(costs, widths, 6) == [2, 2, 2]  # nothing to share out
    assert allocate(costs, widths, 8) == [4, 2, 2]  # block 0 falls by 4 (2 per neuron), block 2 by 3
    assert allocate(costs, widths, 10) == [4, 2, 4]
    result = allocate(costs, widths, 15)  # an odd budget: steps of 2 fill 14 of it, never more
    assert sum(result) == 14 and result[1] == 2
    assert allocate(costs, widths, 100) == [8, 8, 8]
    with pytest.raises(ConfigError, match="exceed"):
        allocate(costs, widths, 5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_the_loss_measured_from_a_block_on_is_the_whole_model_s(arch):
    """Skipping the blocks before `index` and handing block `index` the states they made gives the loss
    the whole model gives: what each probe's cost is measured against."""
    model = _model(arch)
    batches = [CALIBRATION[:4], CALIBRATION[4:]]
    with torch.inference_mode():
        base = mean_loss(model, CALIBRATION, 4)
        inputs, kwargs = capture_block_inputs(model, CALIBRATION, 4)
        for index, block in enumerate(decoder_layers(model)):
            outputs = [block(x, **kwargs) for x in inputs]
            tuples = isinstance(outputs[0], (tuple, list))
            assert _loss_from(model, index, block, inputs, batches, tuples) == pytest.approx(base, rel=1e-5)
            inputs = [block_output(out) for out in outputs]
    assert [type(b).__name__ for b in decoder_layers(model)] == [
        type(decoder_layers(_model(arch))[0]).__name__
    ] * 4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_measured_widths_take_the_neurons_from_a_block_that_does_not_matter(arch):
    model = _model(arch)
    downs = [block.mlp.down_proj if arch != "gpt2" else block.mlp.c_proj for block in decoder_layers(model)]
    with torch.no_grad():
        downs[3].weight.zero_()  # block 3's feed-forward adds nothing: narrowing it costs nothing
    widths = measured_widths(model, _windows(16), 0.5, 1, 4, False)
    width = downs[0].in_features
    candidates = candidate_widths(width, 0.5, 1)
    assert widths[3] == candidates[0] and max(widths) > width // 2
    assert uniform_total(width) - 2 * 4 < sum(widths) <= uniform_total(width)  # the same total, to a step
    assert set(widths) <= set(candidates)
    assert _widths(model) == [width] * 4  # measuring changed nothing


def uniform_total(width: int) -> int:
    return width // 2 * 4


def test_a_measured_model_keeps_its_widths_through_save_and_load_and_beats_uniform(tmp_path):
    model = _model("llama")
    with torch.no_grad():
        decoder_layers(model)[0].mlp.down_proj.weight *= 6.0
    measured, uniform = copy.deepcopy(model), copy.deepcopy(model)
    compress(measured, MEASURED, _windows(16))
    compress(uniform, Structured(ffn=0.5, refit=True), _windows(16))
    widths = _widths(measured)
    assert len(set(widths)) > 1 and sum(widths) <= sum(_widths(uniform)) and _widths(uniform) == [64] * 4
    assert measured.config.intermediate_size == 128  # a config says one width: it keeps the original's

    def loss(m):
        with torch.no_grad():
            return float(m(HELD_OUT, labels=HELD_OUT).loss)

    assert loss(measured) < loss(uniform)  # the neurons went where the loss wanted them
    save_compressed(measured, tmp_path / "m.pt")
    back = load_compressed(tmp_path / "m.pt")
    assert _widths(back) == widths
    assert torch.allclose(back(HELD_OUT).logits, measured(HELD_OUT).logits, atol=1e-5)
    quantized = compress(copy.deepcopy(measured), "int8")  # int8 layers of each block's own width
    save_compressed(quantized, tmp_path / "q.pt")
    assert torch.allclose(load_compressed(tmp_path / "q.pt")(HELD_OUT).logits, quantized(HELD_OUT).logits)


def test_a_measured_model_refuses_a_hugging_face_folder_in_one_line(tmp_path):
    from keiryo.hf_export import write_folder

    model = _model("llama")
    with torch.no_grad():
        decoder_layers(model)[0].mlp.down_proj.weight *= 6.0
    compress(model, MEASURED, _windows(16))
    with pytest.raises(ModelError, match="different feed-forward width"):
        write_folder(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())


def test_a_file_whose_feed_forward_weights_disagree_is_refused(tmp_path):
    model = _model("llama")
    with torch.no_grad():
        decoder_layers(model)[0].mlp.down_proj.weight *= 6.0
    compress(model, MEASURED, _windows(16))
    save_compressed(model, tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    key = "model.layers.0.mlp.up_proj.weight"
    payload["state"][key] = payload["state"][key][:-1]  # one row short of its block's width
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(Exception, match="disagree on its width") as caught:
        load_compressed(tmp_path / "bad.pt")
    assert type(caught.value).__name__ == "ArtifactError"


def test_measured_widths_are_checked_before_any_work():
    with pytest.raises(ConfigError, match="refit=True"):
        Structured(ffn=0.5, ffn_widths="measured")
    with pytest.raises(ConfigError, match="ffn_widths"):
        Structured(ffn=0.5, refit=True, ffn_widths="adaptive")
    # every width a block may get is known from the shapes: int4 groups of 64 fit multiples of 64 only
    model = _model("llama")
    assert input_widths(model, [MEASURED]) >= set(candidate_widths(128, 0.5, 1))
    with pytest.raises(ConfigError, match="int4 groups of 64"):
        check_chain(model, [MEASURED, WeightQuant("int4", group_size=64)])
    check_chain(_model("llama"), [Structured(ffn=0.5, refit=True, ffn_widths="measured", ffn_multiple=32),
                                  WeightQuant("int4", group_size=32)])  # fmt: skip


def test_width_is_half_the_neurons_measured():
    width = NAMES["width"]
    assert (width.ffn, width.ffn_multiple, width.ffn_widths, width.refit) == (0.5, 64, "measured", True)


def test_a_measured_model_exports_to_gguf_with_one_feed_forward_length_per_block(tmp_path):
    import gguf
    from test_lm import _model as _byte_model
    from test_lm import _write_gguf

    from keiryo.lm.gguf_export import export_gguf
    from keiryo.lm.load import load_causal_lm

    _write_gguf(_byte_model("llama"), tmp_path / "source.gguf")
    source = f"gguf:{tmp_path / 'source.gguf'}"
    model, _ = load_causal_lm(source)
    with torch.no_grad():
        decoder_layers(model)[1].mlp.down_proj.weight.zero_()
    compress(model, MEASURED, torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(3)))
    widths = _widths(model)
    assert widths[1] == 32 and widths[0] == 96  # block 1 adds nothing: its neurons went to block 0
    export_gguf(model, tmp_path / "out.gguf", source)
    reader = gguf.GGUFReader(tmp_path / "out.gguf")
    field = reader.fields["llama.feed_forward_length"]
    assert [int(field.parts[i][0]) for i in field.data] == widths  # an array: llama.cpp reads one per block
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
    assert [shapes[f"blk.{i}.ffn_down.weight"][0] for i in range(2)] == widths  # GGUF lists (columns, rows)
    with pytest.raises(ModelError, match="its own feed-forward width"):  # transformers cannot read it back
        load_causal_lm(tmp_path / "out.gguf")


def test_retraining_that_raises_the_calibration_loss_is_undone(capsys):
    """Retraining segments one by one can take the whole model further from the unpruned one; it is then
    undone, and the run says so. A learning rate far too high makes it so here."""
    model = _model("llama")
    refit_only = copy.deepcopy(model)
    compress(refit_only, Structured(ffn=0.5, refit=True), CALIBRATION)
    wild = Reconstruct(around=2, lr=5.0, progress=True)
    compress(model, Structured(ffn=0.5, refit=True, reconstruct=wild), CALIBRATION)
    assert "retraining raised the calibration loss" in capsys.readouterr().out
    for mine, reference in zip(model.parameters(), refit_only.parameters(), strict=True):
        assert torch.equal(mine, reference)  # exactly the refit model
    sane = copy.deepcopy(refit_only)
    healed = _model("llama")
    compress(
        healed,
        Structured(ffn=0.5, refit=True, reconstruct=Reconstruct(around=2, progress=False)),
        CALIBRATION,
    )
    assert mean_loss(healed, CALIBRATION[-8:], 4) <= mean_loss(sane, CALIBRATION[-8:], 4)  # kept: it helped
