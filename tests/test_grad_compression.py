"""Gradient compression for DDP (PyTorch's fp16/bf16/PowerSGD communication hooks): the bytes each worker
all-reduces per step, counted by keiryo's hook wrapper, equal the bytes of the tensors the hooks really hand
to `dist.all_reduce` and are really lower; compressed gradients stay close to the exact mean; fp16 training
reaches uncompressed accuracy; bad values are one-line errors from the API and the CLI. Two real worker
processes over gloo on loopback."""

from __future__ import annotations

import re
import threading

import pytest
import torch
import torch.distributed as dist

from keiryo.cli import main
from keiryo.errors import ConfigError
from keiryo.loop import TrainConfig
from keiryo.metrics import accuracy
from keiryo.models import build_model
from keiryo.parallel.config import DDP, grad_compression_of
from keiryo.parallel.ddp import POWERSGD_START, GradTraffic, apply_ddp
from keiryo.parallel.group import init_worker
from keiryo.parallel.launch import run_local
from keiryo.training import train

METHODS = (None, "fp16", "bf16", "powersgd:2")


def _cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("cnn", width=16, blocks=1)


def _mlp() -> torch.nn.Module:
    """2.2 MB of fp32 parameters: DDP makes several buckets (its first holds 1 MB)."""
    torch.manual_seed(0)
    return build_model("mlp", in_features=64, hidden=[512, 512, 512], num_classes=10)


def _hooks_in_worker() -> dict:
    """In each worker: for every method, a DDP mlp trains POWERSGD_START + 3 steps on its own random batches,
    with `dist.all_reduce` wrapped to add up the bytes of every tensor a hook hands it (PowerSGD calls it
    from future callbacks too). Returns, per method, keiryo's count, the wrapped count, and how far the last
    step's averaged gradients are from the exact fp32 mean of the two workers' gradients."""
    init_worker(torch.device("cpu"), 60)
    seen = {"bytes": 0, "on": False}
    lock = threading.Lock()
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        if seen["on"]:
            with lock:
                seen["bytes"] += tensor.numel() * tensor.element_size()
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    out = {}
    try:
        for method in METHODS:
            model, traffic = _mlp(), GradTraffic()
            worker = apply_ddp(model, torch.device("cpu"), grad_compression=method, traffic=traffic)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            generator = torch.Generator().manual_seed(100 + dist.get_rank())
            seen["bytes"] = 0
            for _ in range(POWERSGD_START + 3):
                inputs = torch.randn(16, 64, generator=generator)
                targets = torch.randint(0, 10, (16,), generator=generator)
                loss = torch.nn.functional.cross_entropy(model(inputs), targets)
                exact = torch.cat(
                    [g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]
                )
                real_all_reduce(exact)
                optimizer.zero_grad()
                seen["on"] = True
                torch.nn.functional.cross_entropy(worker.forward(inputs), targets).backward()
                seen["on"] = False
                optimizer.step()
            got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            exact /= dist.get_world_size()
            error = float((got - exact).norm() / exact.norm())
            out[method] = {**traffic.summary(), "seen": seen["bytes"], "sent": traffic.sent, "error": error}
    finally:
        dist.all_reduce = real_all_reduce
    return out


@pytest.fixture(scope="module")
def counted() -> dict:
    return run_local(_hooks_in_worker, (), 2, 120)


def test_counted_bytes_are_the_bytes_the_hooks_all_reduce(counted):
    for method in METHODS:
        assert counted[method]["steps"] == POWERSGD_START + 3
        assert counted[method]["sent"] == counted[method]["seen"] > 0, method


def test_compression_sends_fewer_bytes_and_keeps_the_mean(counted):
    dense = counted[None]["dense_bytes_per_step"]
    params = sum(p.numel() for p in _mlp().parameters())
    assert dense == 4 * params and counted[None]["last_step_bytes"] == dense
    for method in ("fp16", "bf16"):
        assert counted[method]["last_step_bytes"] == dense // 2
        assert counted[method]["dense_bytes_per_step"] == dense
    assert counted["powersgd:2"]["last_step_bytes"] < 0.05 * dense  # weight matrices as rank-2 factors
    assert counted[None]["error"] < 1e-6
    assert counted["fp16"]["error"] < 2e-3 and counted["bf16"]["error"] < 2e-2


def test_fp16_training_reaches_uncompressed_accuracy(digits):
    config = TrainConfig(epochs=3, batch_size=32, progress=False, device="cpu", seed=0)
    results = {}
    for method in (None, "fp16"):
        result = train(_cnn(), digits, DDP(workers=2, timeout=60, grad_compression=method), config)
        results[method] = (accuracy(result.model, digits.test), result.parallel["grad_traffic"])
    (plain, plain_traffic), (fp16, fp16_traffic) = results[None], results["fp16"]
    assert plain > 0.8 and abs(fp16 - plain) <= 0.01, (plain, fp16)  # it trained; fp16 within 1 point
    assert fp16_traffic["last_step_bytes"] * 2 == plain_traffic["last_step_bytes"]
    assert fp16_traffic["steps"] == plain_traffic["steps"] > 0


@pytest.mark.parametrize(
    "value", ["fp8", "powersgd:0", "powersgd:x", "powersgd:", "fp16:2", "", 16, ["fp16"]]
)
def test_bad_values_are_one_line_errors(value):
    with pytest.raises(ConfigError) as caught:
        DDP(grad_compression=value)
    assert "\n" not in str(caught.value) and "grad_compression" in str(caught.value)


def test_accepted_values():
    assert grad_compression_of(None) is None
    assert grad_compression_of("fp16") == ("fp16", 0) and grad_compression_of("BF16") == ("bf16", 0)
    assert grad_compression_of("powersgd") == ("powersgd", 1)
    assert grad_compression_of("powersgd:4") == ("powersgd", 4)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strategy", "ddp", "--grad-compression", "fp8"], "unknown grad_compression 'fp8'"),
        (["--strategy", "fsdp", "--grad-compression", "fp16"], "--grad-compression needs --strategy ddp"),
        (["--grad-compression", "bf16"], "--grad-compression needs --strategy ddp, not single"),
    ],
)
def test_cli_refuses_bad_values_in_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "model.pt"
    code = main(["train", "--no-progress", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_cli_trains_with_powersgd_and_reports_the_bytes(tmp_path, capsys):
    out = tmp_path / "cnn.pt"
    args = ["train", "--model", "cnn", "-a", "width=16", "-a", "blocks=1", "--epochs", "1", "--no-progress"]
    ddp = ["--strategy", "ddp", "--workers", "2", "--grad-compression", "powersgd:2", "--out", str(out)]
    code = main(args + ddp)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    text = " ".join(captured.out.split())  # rich wraps long lines
    share = re.search(r"gradients all-reduced per step per worker: .*? \(powersgd:2; ([\d.]+)% of fp32", text)
    assert share and float(share.group(1)) < 50, text
    assert "test accuracy" in text and out.exists()
