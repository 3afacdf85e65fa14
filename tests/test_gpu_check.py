"""benchmarks/gpu_check.py, the script for a lent GPU machine: without CUDA one line and nothing written; its
check runner turns a failing check into one FAIL row and skips what the time budget cannot hold; its torchao
check measures on the CPU what it measures on CUDA."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_says_so_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu.md"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device (torch "), run.stdout
    assert lines[0].endswith("; nothing checked")
    assert not out.exists()


def test_a_failing_check_is_one_row_and_the_budget_skips_the_rest(capsys):
    gpu_check = _module()
    checks = gpu_check.Checks(budget_s=30)
    checks.run("ok", lambda: ("pass", "fine"), 1)
    checks.run("broken", lambda: 1 / 0, 1)
    checks.run("too long", lambda: ("pass", "never run"), 60)
    assert [(r.check, r.status) for r in checks.rows] == [
        ("ok", "pass"),
        ("broken", "FAIL"),
        ("too long", "skipped"),
    ]
    assert checks.rows[1].detail == "ZeroDivisionError: division by zero"
    assert checks.rows[2].detail.startswith("time budget: needs ~60 s")
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_the_torchao_check_measures_sqnr_and_time_on_the_cpu():
    gpu_check = _module()
    status, detail = gpu_check.check_torchao("int8-weight-only", "cpu")
    assert status == "pass", detail
    assert "SQNR" in detail and "batch 1:" in detail and "batch 256:" in detail
    assert gpu_check.check_torchao("int4-weight-only", "cpu")[0] == "skipped"
