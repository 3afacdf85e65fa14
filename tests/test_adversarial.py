"""Bad input at the command line: one line on stderr, exit 2, nothing lost and nothing left behind.

Every case runs in a fresh folder holding `old.pt` (known bytes) and is given `--out old.pt` where it writes a
file; after the failure `old.pt` must be byte-identical and no other file may have appeared anywhere.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from keiryo import artifacts
from keiryo.cli import main
from keiryo.compress.qconfig import Policy
from keiryo.compress.quantize import quantize
from keiryo.models import build_model

OLD_BYTES = b"the user's previous output: must survive every failed run\n"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """The files the cases refer to by name (MODEL, CORRUPT, ...), made once for the module."""
    folder = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, hidden=[8], num_classes=10)
    meta = {"input_shape": [1, 8, 8], "num_classes": 10}
    paths = {"MODEL": artifacts.save(model, folder / "m.pt", metadata=meta)}
    paths["FOREIGN"] = artifacts.save(model, folder / "foreign.pt", factory="os:getcwd", kwargs={})
    paths["QMODEL"] = artifacts.save(  # fbgemm int8: packed weights that safetensors cannot hold
        quantize(model, "int8-dynamic", policy=Policy(backend="fbgemm", runs=1, compile=False)),
        folder / "q.pt",
        metadata=meta,
    )
    (folder / "corrupt.pt").write_bytes(b"\x00not a model")
    paths["CORRUPT"] = folder / "corrupt.pt"
    (folder / "a-folder").mkdir()
    paths["DIR"] = folder / "a-folder"
    (folder / "file.txt").write_text("a file, not a folder\n")
    paths["FILE"] = folder / "file.txt"
    paths["UNDER_FILE"] = folder / "file.txt" / "x.pt"
    rng = np.random.default_rng(0)
    paths["MISFIT"] = folder / "five-features.npz"  # 5 features; the model takes 64
    np.savez(paths["MISFIT"], x=rng.normal(size=(40, 5)).astype("float32"), y=rng.integers(0, 3, 40))
    paths["BADYAML"] = folder / "bad.yaml"
    paths["BADYAML"].write_text("name: x\nsteps: [\n")
    hf_dir = folder / "hf-no-config"
    hf_dir.mkdir()
    paths["HFDIR"] = hf_dir
    return {k: str(v) for k, v in paths.items()}


def _tree(*roots: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for root in roots for p in root.rglob("*") if p.is_file()}


def _run_failing(capsys, monkeypatch, tmp_path, inputs, args: list[str]) -> str:
    """Run `keiryo ARGS` in a fresh folder; check exit 2, one `error:` line, nothing written or lost."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # default output paths land here, where they are checked
    (work / "old.pt").write_bytes(OLD_BYTES)
    args = [inputs.get(a, a) for a in args]
    roots = (work, Path(inputs["MODEL"]).parent)
    before = _tree(*roots)
    code = main(args)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.out + captured.err and "unexpected" not in lines[0]
    assert (work / "old.pt").read_bytes() == OLD_BYTES
    assert _tree(*roots) == before, "a failed run wrote or changed a file"
    return lines[0]


MODEL_OUT = ["--out", "old.pt"]
TRAIN = ["train", "-m", "mlp", "-a", "hidden=[8]", "--epochs", "1", "--no-progress"]
DISTILL = ["distill", "-t", "MODEL", "-s", "mlp", "-a", "hidden=[4]", "--epochs", "1", "--no-progress"]

CASES = {
    # train: outputs checked before any work, options checked before any work
    "train out is a folder": ([*TRAIN, "--out", "DIR"], "folder"),
    "train out under a file": ([*TRAIN, "--out", "UNDER_FILE"], "is a file"),
    "train checkpoint is out": ([*TRAIN, "--checkpoint", "old.pt", *MODEL_OUT], "--checkpoint"),
    "train checkpoint is a folder": ([*TRAIN, "--checkpoint", "DIR", *MODEL_OUT], "--checkpoint"),
    "train seed too large": ([*TRAIN, "--seed", str(2**70), *MODEL_OUT], "--seed"),
    "train malformed model-arg": ([*TRAIN[:3], "-a", "x=[1,", "--epochs", "1", *MODEL_OUT], "YAML"),
    "train zero epochs": ([*TRAIN[:5], "--epochs", "0", *MODEL_OUT], "--epochs"),
    "train huge batch": ([*TRAIN, "--batch-size", str(10**20), *MODEL_OUT], "--batch-size"),
    "train negative timeout": ([*TRAIN, "--timeout", "-1", *MODEL_OUT], "--timeout"),
    "train untrusted spec": (["train", "-m", "os:getcwd", "--epochs", "1", *MODEL_OUT], "--trust-code"),
    "train unknown precision": ([*TRAIN, "--precision", "fp8", *MODEL_OUT], "precision"),
    "train unknown schedule": ([*TRAIN, "--pipeline-schedule", "zigzag", *MODEL_OUT], "schedule"),
    "train corrupt data": ([*TRAIN, "-d", "CORRUPT", *MODEL_OUT], "corrupt.pt"),
    "train missing data": ([*TRAIN, "-d", "nope.npz", *MODEL_OUT], "nope.npz"),
    "train out is the data": ([*TRAIN, "-d", "MISFIT", "--out", "MISFIT"], "input"),
    # bench
    "bench zero runs": (["bench", "MODEL", "--runs", "0"], "--runs"),
    "bench zero threads": (["bench", "MODEL", "--threads", "0"], "--threads"),
    "bench zero batch": (["bench", "MODEL", "--batch-sizes", "0"], "--batch-sizes"),
    "bench huge batch": (["bench", "MODEL", "--batch-sizes", "99999999999"], "--batch-sizes"),
    "bench json is a folder": (["bench", "MODEL", "--json", "DIR"], "--json"),
    "bench markdown under a file": (["bench", "MODEL", "--markdown", "UNDER_FILE"], "--markdown"),
    "bench model is a folder": (["bench", "DIR"], "directory"),
    "bench corrupt model": (["bench", "CORRUPT"], "corrupt"),
    "bench data does not fit": (["bench", "MODEL", "--data", "MISFIT"], "shape"),
    "bench untrusted file": (["bench", "FOREIGN"], "--trust-code"),
    # prune
    "prune zero threads": (["prune", "MODEL", "--threads", "0", *MODEL_OUT], "--threads"),
    "prune ratio above 1": (["prune", "MODEL", "--ratio", "1.5", *MODEL_OUT], "ratio"),
    "prune unknown importance": (["prune", "MODEL", "--importance", "nope", *MODEL_OUT], "importance"),
    "prune out is a folder": (["prune", "MODEL", "--out", "DIR"], "folder"),
    "prune out under a file": (["prune", "MODEL", "--out", "UNDER_FILE"], "is a file"),
    "prune out is the model": (["prune", "MODEL", "--out", "MODEL"], "input"),
    "prune missing model": (["prune", "missing.pt", *MODEL_OUT], "missing.pt"),
    "prune seed too large": (["prune", "MODEL", "--seed", str(2**64), *MODEL_OUT], "--seed"),
    "prune data does not fit": (["prune", "MODEL", "--data", "MISFIT", *MODEL_OUT], "shape"),
    "prune unknown layer": (["prune", "MODEL", "--protect", "nope", *MODEL_OUT], "nope"),
    "prune zero steps": (["prune", "MODEL", "--iterative-steps", "0", *MODEL_OUT], "--iterative-steps"),
    "prune taylor without data": (["prune", "MODEL", "--importance", "taylor", *MODEL_OUT], "data"),
    "prune untrusted file": (["prune", "FOREIGN", *MODEL_OUT], "--trust-code"),
    # quantize
    "quantize unknown method": (["quantize", "MODEL", "--method", "int3", *MODEL_OUT], "int3"),
    "quantize unknown layer": (["quantize", "MODEL", "--skip", "nope", *MODEL_OUT], "nope"),
    "quantize bad group size": (
        ["quantize", "MODEL", "--method", "int4-weight-only", "--group-size", "7", *MODEL_OUT],
        "group_size",
    ),
    "quantize static without data": (
        ["quantize", "MODEL", "--method", "int8-static", *MODEL_OUT],
        "calibration",
    ),
    "quantize unknown observer": (
        ["quantize", "MODEL", "--method", "int8-static", "-c", "digits", "--observer", "x", *MODEL_OUT],
        "observer",
    ),
    "quantize zero qat epochs": (["quantize", "MODEL", "--qat-epochs", "0", *MODEL_OUT], "--qat-epochs"),
    "quantize out is a folder": (["quantize", "MODEL", "--out", "DIR"], "folder"),
    "quantize corrupt model": (["quantize", "CORRUPT", *MODEL_OUT], "corrupt"),
    "quantize calibration misfit": (["quantize", "MODEL", "-c", "MISFIT", *MODEL_OUT], "shape"),
    # distill
    "distill zero runs": ([*DISTILL, "--runs", "0", *MODEL_OUT], "--runs"),
    "distill zero temperature": ([*DISTILL, "--temperature", "0", *MODEL_OUT], "temperature"),
    "distill alpha above 1": ([*DISTILL, "--alpha", "2", *MODEL_OUT], "alpha"),
    "distill unknown loss": ([*DISTILL, "--loss", "huber", *MODEL_OUT], "loss"),
    "distill malformed feature": ([*DISTILL, "--feature", "fc0", *MODEL_OUT], "--feature"),
    "distill malformed student arg": ([*DISTILL[:5], "-a", "hidden=[4", *MODEL_OUT], "YAML"),
    "distill zero lr": ([*DISTILL, "--lr", "0", *MODEL_OUT], "learning rate"),
    "distill out is the teacher": ([*DISTILL, "--out", "MODEL"], "input"),
    "distill teacher is a folder": (["distill", "-t", "DIR", "--epochs", "1", *MODEL_OUT], "directory"),
    "distill untrusted student": ([*DISTILL[:3], "-s", "os:getcwd", "--epochs", "1", *MODEL_OUT], "trust"),
    "distill data does not fit": ([*DISTILL, "-d", "MISFIT", *MODEL_OUT], "shape"),
    # optimize: everything refused before the first candidate
    "optimize ratio above 1": (["optimize", "MODEL", "--ratios", "1.5", *MODEL_OUT], "ratio"),
    "optimize ratio not a number": (["optimize", "MODEL", "--ratios", "half", *MODEL_OUT], "--ratios"),
    "optimize unknown method": (["optimize", "MODEL", "--methods", "int3", *MODEL_OUT], "int3"),
    "optimize negative time": (["optimize", "MODEL", "--time-limit", "-5", *MODEL_OUT], "time limit"),
    "optimize bad time": (["optimize", "MODEL", "--time-limit", "soon", *MODEL_OUT], "time limit"),
    "optimize negative budget": (["optimize", "MODEL", "--max-drop", "-1", *MODEL_OUT], "max_drop"),
    "optimize unknown objective": (["optimize", "MODEL", "--objective", "joy", *MODEL_OUT], "objective"),
    "optimize out is a folder": (["optimize", "MODEL", "--out", "DIR"], "folder"),
    # export
    "export unknown format": (["export", "MODEL", "--format", "tflite", *MODEL_OUT], "tflite"),
    "export out is a folder": (["export", "MODEL", "--out", "DIR"], "folder"),
    "export out under a file": (["export", "MODEL", "--out", "UNDER_FILE"], "is a file"),
    "export out is the model": (["export", "MODEL", "--out", "MODEL"], "input"),
    "export zero batch": (["export", "MODEL", "--batch-size", "0", *MODEL_OUT], "--batch-size"),
    "export data does not fit": (["export", "MODEL", "--data", "MISFIT", *MODEL_OUT], "shape"),
    "export int8 to safetensors": (
        ["export", "QMODEL", "--format", "safetensors", *MODEL_OUT],
        "keiryo .pt",
    ),
    # hf, run, demo, usage
    "hf missing folder": (["hf", "nowhere", *MODEL_OUT], "does not exist"),
    "hf folder without config": (["hf", "HFDIR", *MODEL_OUT], "config.json"),
    "hf out is a folder": (["hf", "HFDIR", "--out", "DIR"], "folder"),
    "hf data-out is out": (["hf", "HFDIR", "--out", "old.pt", "--data-out", "old.pt"], "--data-out"),
    "hf zero max length": (["hf", "HFDIR", "--max-length", "0", *MODEL_OUT], "--max-length"),
    "run missing recipe": (["run", "nope.yaml"], "nope.yaml"),
    "run malformed recipe": (["run", "BADYAML"], "YAML"),
    "run out is a file": (["run", "BADYAML", "--out", "FILE"], ""),
    "demo out is a file": (["demo", "--out", "FILE"], "is a file"),
    "demo out under a file": (["demo", "--out", "UNDER_FILE"], "is a file"),
    "unknown command": (["frobnicate"], "frobnicate"),
    "unknown option": (["prune", "MODEL", "--rato", "0.5"], "--rato"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_loses_nothing(case, inputs, tmp_path, capsys, monkeypatch):
    args, expected = CASES[case]
    line = _run_failing(capsys, monkeypatch, tmp_path, inputs, args)
    assert expected in line, line


def test_an_unwritable_out_fails_before_any_work(inputs, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        probe = locked / "probe"
        try:
            probe.write_text("x")  # root writes anywhere: then use a folder nobody can create files in
            probe.unlink()
            target = Path("/proc/keiryo-test/x.pt")
            if not Path("/proc").is_dir():
                pytest.skip("no folder here that this user cannot write in")
        except OSError:
            target = locked / "x.pt"
        started = time.perf_counter()
        line = _run_failing(
            capsys, monkeypatch, tmp_path, inputs, [*TRAIN, "--epochs", "50", "--out", str(target)]
        )
        assert "cannot write" in line and time.perf_counter() - started < 5  # not after 50 epochs
    finally:
        locked.chmod(0o700)


def test_a_failure_late_in_the_run_keeps_the_old_output(inputs, tmp_path, capsys, monkeypatch):
    """The model is saved to a temporary name first: a failure after that still loses nothing."""
    from keiryo.cli import compress
    from keiryo.errors import ConfigError

    def broken_compare(*args, **kwargs):
        raise ConfigError("measuring failed (simulated)")

    monkeypatch.setattr(compress, "compare", broken_compare)
    line = _run_failing(
        capsys, monkeypatch, tmp_path, inputs, ["prune", "MODEL", "--ratio", "0.5", *MODEL_OUT]
    )
    assert "simulated" in line


def test_ctrl_c_in_process_is_one_line_130_and_keeps_the_old_output(inputs, tmp_path, capsys, monkeypatch):
    from keiryo.cli import train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run_training", interrupted)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "old.pt").write_bytes(OLD_BYTES)
    assert main([*TRAIN, "--out", "old.pt"]) == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert (tmp_path / "old.pt").read_bytes() == OLD_BYTES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.pt"]  # no temporary file left


def test_a_successful_run_replaces_the_output_whole(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "old.pt").write_bytes(OLD_BYTES)
    assert main([*TRAIN, "--out", "old.pt"]) == 0, capsys.readouterr().err
    assert artifacts.load(tmp_path / "old.pt").fc0.out_features == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.pt"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "old.pt").stat().st_mode & 0o777 == 0o666 & ~umask  # not a temporary file's 0600


INTERRUPT_ON_TORCH_IMPORT = """
import runpy, sys

class Interrupt:  # Ctrl-C arriving exactly while torch is being imported
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, Interrupt())
sys.argv = ["keiryo", *sys.argv[1:]]
runpy.run_module("keiryo", run_name="__main__", alter_sys=True)
"""


def test_ctrl_c_while_importing_torch_is_one_line_and_exit_130(tmp_path):
    args = [sys.executable, "-c", INTERRUPT_ON_TORCH_IMPORT, *TRAIN, "--out", str(tmp_path / "m.pt")]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.splitlines() == ["interrupted"], proc.stderr


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path):
    """A real SIGINT 1.5 s in lands while torch is imported (or as training starts): `interrupted`, 130."""
    args = [sys.executable, "-m", "keiryo", *TRAIN[:5], "--epochs", "200", "--out", str(tmp_path / "m.pt")]
    # as a terminal starts it: SIGINT at its default (a job started in the background of a non-interactive
    # shell, as CI may be, inherits SIGINT ignored, and a program rightly keeps ignoring it then)
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.splitlines() == ["interrupted"], err
    assert "Traceback" not in out + err and not (tmp_path / "m.pt").exists()
