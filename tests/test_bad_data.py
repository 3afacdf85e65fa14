"""Bad and oversized inputs are refused before any work, and a run that goes bad loses nothing.

Each test feeds one kind of bad input (non-finite values, labels the model has no output for, features of the
wrong shape, files that would unpack to gigabytes, options that cannot train) and checks the one-line
KeiryoError, and for a diverging or interrupted run that the last good checkpoint is still there.
"""

from __future__ import annotations

import io
import os
import struct
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import keiryo
from keiryo.cli import main
from keiryo.data import load_data
from keiryo.errors import ConfigError, DataError, KeiryoError, ModelError, ResourceError, TrainingError
from keiryo.loop import TrainConfig, classification_loss, fit
from keiryo.metrics import Timing
from keiryo.models import build_model


def _one_epoch() -> TrainConfig:
    return TrainConfig(epochs=1, progress=False, device="cpu")


def _one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert message and "\n" not in message
    return message


def _mlp(in_features: int = 8, classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", in_features=in_features, hidden=[16], num_classes=classes)


def _features(n: int = 60, width: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((n, width), dtype=np.float32), rng.integers(0, 3, n)


def _npy(shape: tuple[int, ...], dtype: str, payload: bytes = b"") -> bytes:
    """An .npy member whose header declares `shape`, followed by only `payload` (so it can lie)."""
    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + payload


def _png(width: int, height: int) -> bytes:
    """A 1x1 grayscale PNG whose header claims width x height: PIL reads the size without decoding."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])  # width, height, then depth, color, ...
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


# ---- non-finite values ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("where", "value"), [("x", np.nan), ("x", np.inf), ("y", np.nan), ("y", -np.inf)])
def test_nan_or_inf_in_an_npz_is_refused(tmp_path: Path, where: str, value: float) -> None:
    x, y = _features()
    y = y.astype(np.float32)
    (x if where == "x" else y)[5] = value
    np.savez(tmp_path / "bad.npz", x=x, y=y)
    with pytest.raises(DataError) as info:
        load_data(tmp_path / "bad.npz")
    message = _one_line(info)
    assert "bad.npz" in message and "NaN/inf" in message and "sample 5" in message
    assert ("inputs" if where == "x" else "targets") in message


@pytest.mark.parametrize(("row", "column"), [("0.5,nan,1", "b"), ("0.5,2,inf", "label")])
def test_nan_or_inf_in_a_csv_names_the_line_and_column(tmp_path: Path, row: str, column: str) -> None:
    (tmp_path / "bad.csv").write_text("a,b,label\n" + "0.1,0.2,0\n" * 5 + row + "\n")
    with pytest.raises(DataError) as info:
        load_data(tmp_path / "bad.csv")
    message = _one_line(info)
    assert "bad.csv' line 7" in message and f"column '{column}'" in message


def test_nan_in_tensors_from_python_names_the_data_you_passed() -> None:
    x, y = torch.rand(40, 4), torch.randint(0, 2, (40,))
    x[3, 1] = float("nan")
    with pytest.raises(DataError, match=r"the data you passed .*sample 3, feature \(1,\)"):
        keiryo.train(_mlp(4, 2), (x, y), config=_one_epoch())


# ---- options ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": float("inf")}, "learning rate"),
        ({"lr": float("nan")}, "learning rate"),
        ({"lr": 0.0}, "learning rate"),
        ({"checkpoint_every": -1}, "checkpoint_every"),
        ({"batch_size": 0}, "batch size"),
        ({"epochs": 1.5}, "epochs"),
        ({"weight_decay": float("nan")}, "weight decay"),
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"resume": True}, "resume needs a checkpoint"),
    ],
)
def test_options_that_cannot_train_are_refused_when_the_config_is_made(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        TrainConfig(**options)
    _one_line(info)
    model = _mlp()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match=message):
        keiryo.train(
            model,
            (torch.rand(20, 8), torch.randint(0, 3, (20,))),
            config=TrainConfig(progress=False, **options),
        )
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# ---- data that does not fit the model ---------------------------------------------------------------------


def test_labels_outside_the_models_classes_are_refused_before_training() -> None:
    x, y = torch.rand(40, 8), torch.randint(0, 3, (40,))
    y[7] = 5
    model = _mlp(8, 3)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(DataError) as info:
        keiryo.train(model, (x, y), config=_one_epoch())
    message = _one_line(info)
    assert "0..5" in message and "3 class output" in message and "0..2" in message
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_float_targets_for_a_classifier_are_refused() -> None:
    x, y = torch.rand(40, 8), torch.rand(40)
    with pytest.raises(DataError, match="float targets .* 3 outputs per sample"):
        keiryo.train(_mlp(8, 3), (x, y), config=_one_epoch())


def test_mismatched_features_name_both_shapes_in_train_and_measure(tmp_path: Path) -> None:
    x, y = _features(width=8)
    np.savez(tmp_path / "eight.npz", x=x, y=y)
    wide = _mlp(in_features=64)
    with pytest.raises(ModelError) as info:
        keiryo.train(wide, tmp_path / "eight.npz", config=_one_epoch())
    message = _one_line(info)
    assert "64 features" in message and "(8,)" in message and "eight.npz" in message
    with pytest.raises(ModelError, match=r"64 features .* the example inputs have shape \(8,\)"):
        keiryo.measure(wide, torch.rand(4, 8), timing=Timing(runs=1, warmup=0))
    with pytest.raises(KeiryoError, match=r"64 features .*eight.npz.* have shape \(8,\)"):
        keiryo.measure(
            wide, torch.rand(4, 64), data=str(tmp_path / "eight.npz"), timing=Timing(runs=1, warmup=0)
        )


def test_measure_refuses_labels_the_model_has_no_output_for() -> None:
    x, y = torch.rand(40, 8), torch.full((40,), 4)
    with pytest.raises(DataError, match="class labels 4..4 but the model has 3"):
        keiryo.measure(_mlp(8, 3), x[:4], data=(x, y), timing=Timing(runs=1, warmup=0))


def test_a_file_too_small_to_split_is_refused(tmp_path: Path) -> None:
    x, y = _features(n=3)
    np.savez(tmp_path / "tiny.npz", x=x, y=y)
    with pytest.raises(DataError) as info:
        load_data(tmp_path / "tiny.npz")
    message = _one_line(info)
    assert "tiny.npz" in message and "3 sample(s)" in message and "at least 4" in message
    assert len(load_data(tmp_path / "tiny.npz", val_fraction=0, test_fraction=0).train) == 3  # asked for


def test_an_empty_training_split_is_refused(digits) -> None:
    from dataclasses import replace

    from torch.utils.data import Subset

    empty = replace(digits, train=Subset(digits.train, []))
    with pytest.raises(DataError, match="no training samples"):
        fit(_mlp(64, 10), empty, TrainConfig(epochs=1, progress=False, device="cpu"))


# ---- bounded memory ---------------------------------------------------------------------------------------


def test_an_npz_declaring_2gb_is_refused_in_milliseconds_without_allocating(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w") as archive:
        archive.writestr("x.npy", _npy((1 << 29,), "<f4", b"\0" * 64))  # 2 GiB declared, 64 bytes present
        archive.writestr("y.npy", _npy((16,), "<i8", b"\0" * 128))
    assert bomb.stat().st_size < 4096
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(ResourceError) as info:
        load_data(bomb)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "bomb.npz" in _one_line(info) and "KEIRYO_MAX_BYTES" in str(info.value)
    assert seconds < 0.5 and peak < 16 << 20


def test_npz_members_that_are_objects_or_compressed_bytes_are_refused(tmp_path: Path, monkeypatch) -> None:
    objects = tmp_path / "objects.npz"
    with zipfile.ZipFile(objects, "w") as archive:
        archive.writestr("x.npy", _npy((4,), "|O"))
        archive.writestr("y.npy", _npy((4,), "<i8", b"\0" * 32))
    with pytest.raises(DataError, match="holds Python objects"):
        load_data(objects)
    monkeypatch.setenv("KEIRYO_MAX_BYTES", "1M")
    x, y = _features()
    packed = tmp_path / "packed.npz"
    np.savez(packed, x=x, y=y)
    with zipfile.ZipFile(packed, "a", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("extra", b"\0" * (4 << 20))  # 4 MiB that deflate to a few KiB
    assert packed.stat().st_size < 64 << 10
    with pytest.raises(ResourceError, match="packed.npz"):
        load_data(packed)


def test_csv_pt_and_image_folders_are_bounded(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KEIRYO_MAX_BYTES", "256K")
    (tmp_path / "big.csv").write_text("a,b,c,label\n" + "0.1,0.2,0.3,1\n" * 10_000)
    with pytest.raises(ResourceError, match="big.csv"):
        load_data(tmp_path / "big.csv")
    torch.save({"x": torch.zeros(100_000), "y": torch.zeros(100_000)}, tmp_path / "big.pt")
    with pytest.raises(ResourceError, match="big.pt"):
        load_data(tmp_path / "big.pt")
    (tmp_path / "images" / "a").mkdir(parents=True)
    (tmp_path / "images" / "a" / "huge.png").write_bytes(_png(4000, 4000))  # 16 MB decoded, 70 bytes here
    with pytest.raises(ResourceError, match="huge.png"):
        load_data(tmp_path / "images")


def test_a_decompression_bomb_image_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "images" / "a").mkdir(parents=True)
    (tmp_path / "images" / "a" / "bomb.png").write_bytes(_png(10_000, 10_000))  # above PIL's 89M pixels
    with pytest.raises(DataError, match="bomb.png.*decompression bomb") as info:
        load_data(tmp_path / "images")
    _one_line(info)


# ---- a run that goes bad loses nothing --------------------------------------------------------------------


class _NanAt:
    """A loss that turns NaN at training step `at`, remembering the checkpoint's bytes just before."""

    def __init__(self, at: int, checkpoint: Path) -> None:
        self.at, self.calls, self.checkpoint, self.before = at, 0, checkpoint, None

    def __call__(self, model, inputs, targets):
        loss, outputs = classification_loss(model, inputs, targets)
        if model.training:
            self.calls += 1
            if self.calls == self.at:
                self.before = self.checkpoint.read_bytes()
                return loss * float("nan"), outputs
        return loss, outputs


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    ck = tmp_path / "ck.pt"
    data = (torch.rand(200, 8), torch.randint(0, 3, (200,)))
    config = TrainConfig(epochs=2, batch_size=16, progress=False, device="cpu", checkpoint=str(ck))
    config.checkpoint_every = 4
    loss = _NanAt(at=7, checkpoint=ck)  # 11 steps per epoch: checkpoints after steps 4 and 8, epoch ends
    with pytest.raises(TrainingError) as info:
        fit(_mlp(), data, config, loss_fn=loss)
    message = _one_line(info)
    assert "nan" in message and "epoch 1, step 7" in message and "learning rate" in message
    assert "ck.pt" in message  # says the checkpoint is kept
    assert ck.read_bytes() == loss.before
    saved = torch.load(ck, weights_only=True)
    assert saved["global_step"] == 4 and all(torch.isfinite(t).all() for t in saved["model"].values())


def test_a_learning_rate_that_diverges_is_a_training_error_with_finite_checkpoint(tmp_path, digits) -> None:
    ck = tmp_path / "ck.pt"
    with pytest.raises(TrainingError, match="diverged") as info:
        config = TrainConfig(
            epochs=2, lr=1e12, optimizer="sgd", progress=False, device="cpu",
            checkpoint=str(ck), checkpoint_every=1,
        )  # fmt: skip
        keiryo.train(_mlp(64, 10), digits, config=config)
    _one_line(info)
    if ck.exists():
        saved = torch.load(ck, weights_only=True)
        assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_an_interrupt_during_a_checkpoint_write_keeps_the_old_one_and_no_temp(tmp_path, monkeypatch) -> None:
    ck = tmp_path / "ck.pt"
    data = (torch.rand(100, 8), torch.randint(0, 3, (100,)))
    config = TrainConfig(epochs=1, batch_size=10, progress=False, device="cpu", checkpoint=str(ck))
    config.checkpoint_every = 3
    real_fsync, writes, before = os.fsync, [], {}

    def fsync(fd: int) -> None:
        writes.append(fd)
        if len(writes) == 2:  # the second checkpoint, half written
            before["bytes"] = ck.read_bytes()
            raise KeyboardInterrupt
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(KeyboardInterrupt):
        fit(_mlp(), data, config)
    assert ck.read_bytes() == before["bytes"]
    assert torch.load(ck, weights_only=True)["global_step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]


def test_a_stale_temp_file_from_a_killed_run_is_removed(tmp_path: Path) -> None:
    ck = tmp_path / "ck.pt"
    stale = tmp_path / ".ck.pt.x1y2z3.tmp"
    stale.write_bytes(b"half a checkpoint")
    other = tmp_path / ".other.pt.abc.tmp"
    other.write_bytes(b"not ours")
    data = (torch.rand(40, 8), torch.randint(0, 3, (40,)))
    fit(_mlp(), data, TrainConfig(epochs=1, progress=False, device="cpu", checkpoint=str(ck)))
    assert ck.exists() and not stale.exists() and other.exists()


# ---- the command line -------------------------------------------------------------------------------------


def _bad_inputs(tmp_path: Path) -> dict[str, list[str]]:
    x, y = _features()
    x[2, 3] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=y)
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as archive:
        archive.writestr("x.npy", _npy((1 << 29,), "<f4"))
        archive.writestr("y.npy", _npy((16,), "<i8"))
    x, y = _features()
    np.savez(tmp_path / "ok.npz", x=x, y=y)
    return {
        "nan": ["--data", str(tmp_path / "nan.npz")],
        "bomb": ["--data", str(tmp_path / "bomb.npz")],
        "labels": ["--data", str(tmp_path / "ok.npz"), "--model-arg", "num_classes=2"],
        "lr": ["--data", str(tmp_path / "ok.npz"), "--lr", "inf"],
        "checkpoint_every": ["--data", str(tmp_path / "ok.npz"), "--checkpoint-every", "-2"],
    }


@pytest.mark.parametrize("case", ["nan", "bomb", "labels", "lr", "checkpoint_every"])
def test_cli_train_on_bad_input_is_one_error_line_and_keeps_the_old_model(tmp_path, capsys, case) -> None:
    out = tmp_path / "model.pt"
    out.write_bytes(b"the model from an earlier run")
    args = _bad_inputs(tmp_path)[case]
    code = main(["train", "--model", "mlp", *args, "--epochs", "1", "--no-progress", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "unexpected" not in lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert out.read_bytes() == b"the model from an earlier run"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
