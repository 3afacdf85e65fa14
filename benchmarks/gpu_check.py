"""keiryo on CUDA, in one script for a lent GPU machine: every check timed, a pass/fail table, under 4 min.

Run: python benchmarks/gpu_check.py [--budget 210] [--out benchmarks/out/gpu.md]
     python benchmarks/gpu_check.py --rehearse-on-cpu   # the same checks on the CPU where they can run

Without a CUDA device it prints one line and exits 0, writing nothing. Each check prints its row as it ends;
a failing check says why in one line and the others still run (exit status 1 if any failed). A check that
would not fit in what is left of `--budget` seconds is skipped and says so.

- cuda: the device, a bf16 and an fp16 matmul, pinned host memory and a non-blocking copy;
- loader: keiryo's training loader pins its batches for CUDA and they arrive intact;
- train {single, ddp, fsdp} x {fp32, bf16, fp16}: the cnn on digits; ddp and fsdp over local worker
  processes (one per GPU, NCCL); fp16 with the grad scaler; pass = test accuracy within 3 points of the same
  training in fp32 on the CPU;
- pipeline: needs 2 GPUs (skipped on one);
- async: the Ray parameter server (it trains on the CPU by design) runs its update budget and learns;
- elastic: `torchrun --max-restarts 1` with its worker SIGKILLed after the first checkpoint resumes from it;
- quantize: keiryo.quantize's bf16 cast on CUDA, and whether its int8 methods take a CUDA model; torchao's
  CUDA kernels themselves (int8 weight-only, int8 dynamic, int4 weight-only tile-packed) on a 4096-wide bf16
  MLP: SQNR against bf16 and the time ratio at batch 1 and 256.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

OUT = Path(__file__).resolve().parent / "out" / "gpu.md"
SRC = Path(__file__).resolve().parents[1] / "src"
EPOCHS = 3
ACCURACY_SLACK = 0.03  # a CUDA run's test accuracy may differ from the CPU fp32 run's by this much


@dataclass
class Row:
    """One check's outcome: status is pass, FAIL, skipped or info (a finding, neither pass nor fail)."""

    check: str
    status: str
    seconds: float
    detail: str


class Checks:
    """Runs checks in order within a time budget, printing each row as it ends."""

    def __init__(self, budget_s: float) -> None:
        self.deadline = time.monotonic() + budget_s
        self.rows: list[Row] = []

    def run(self, name: str, check: Callable[[], tuple[str, str]], cost_s: float) -> None:
        """`check()` -> (status, detail); an exception is a FAIL with its one-line message."""
        started = time.monotonic()
        if started + cost_s > self.deadline:
            status, detail = (
                "skipped",
                f"time budget: needs ~{cost_s:.0f} s, {self.deadline - started:.0f} s left",
            )
        else:
            try:
                status, detail = check()
            except Exception as exc:  # a check's failure is a row, not the end of the script
                status, detail = "FAIL", f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        row = Row(name, status, time.monotonic() - started, detail)
        self.rows.append(row)
        print(f"{row.check:<28} {row.status:<8} {row.seconds:6.1f}s  {row.detail}", flush=True)


def verdict(ok: bool, detail: str) -> tuple[str, str]:
    return ("pass" if ok else "FAIL"), detail


# --- the checks ------------------------------------------------------------------------------------------


def check_cuda() -> tuple[str, str]:
    """bf16/fp16 matmuls agree with fp32; pinned memory and a non-blocking copy round-trip."""
    a, b = torch.randn(512, 512, device="cuda"), torch.randn(512, 512, device="cuda")
    ref = a @ b
    errors = {}
    for dtype in (torch.bfloat16, torch.float16):
        out = (a.to(dtype) @ b.to(dtype)).float()
        errors[str(dtype).split(".")[-1]] = float((out - ref).norm() / ref.norm())
    host = torch.randn(1 << 20).pin_memory()
    moved = host.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    ok = host.is_pinned() and torch.equal(moved.cpu(), host) and max(errors.values()) < 1e-2
    rel = ", ".join(f"{k} rel. error {v:.1e}" for k, v in errors.items())
    return verdict(ok, f"{rel}; pinned 4 MiB copy {'intact' if ok else 'WRONG'}")


def check_loader(splits, device: str) -> tuple[str, str]:
    """keiryo.batches: the loader pins CUDA-bound batches and on_device moves them intact."""
    from keiryo.batches import epoch_batches, on_device, worker_loader

    dev = torch.device(device)
    batches = epoch_batches(len(splits.train), 64, 0, 0)
    batch = next(iter(worker_loader(splits.train, batches, 0, 1, dev)))
    inputs, targets = on_device(batch, dev)
    pinned = batch[0].is_pinned()
    intact = torch.equal(inputs.cpu(), batch[0]) and torch.equal(targets.cpu(), batch[1])
    if dev.type != "cuda":
        return ("skipped", "pinned memory is for CUDA copies") if intact else verdict(False, "batch changed")
    return verdict(pinned and intact, f"batch pinned: {pinned}; arrived intact: {intact}")


def fresh_cnn(splits) -> nn.Module:
    from keiryo.models import build_model, kwargs_for_data

    torch.manual_seed(0)
    return build_model("cnn", **kwargs_for_data("cnn", splits.input_shape, splits.num_classes))


def train_once(splits, device: str, strategy: str, precision: str) -> dict:
    """Train the cnn with one strategy (one worker: one GPU) and precision; test accuracy on the CPU."""
    from keiryo.loop import TrainConfig
    from keiryo.metrics import accuracy
    from keiryo.parallel.config import strategy_of
    from keiryo.training import train

    config = TrainConfig(epochs=EPOCHS, progress=False, device=device, precision=precision, patience=None)
    spec = strategy_of(strategy, None if strategy == "single" else 1)
    if strategy != "single":
        spec = replace(spec, timeout=90.0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = train(fresh_cnn(splits), splits, spec, config)
    model = result.model.cpu().float().eval()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" and strategy == "single" else None
    return {
        "accuracy": accuracy(model, splits.test),
        "samples_s": len(splits.train) / result.history[-1].seconds,
        "loss": result.history[-1].train_loss,
        "peak": peak,
    }


def check_train(splits, device: str, strategy: str, precision: str, reference: float) -> tuple[str, str]:
    got = train_once(splits, device, strategy, precision)
    ok = math.isfinite(got["loss"]) and abs(got["accuracy"] - reference) <= ACCURACY_SLACK
    scaler = " · grad scaler" if precision == "fp16" and device == "cuda" else ""
    peak = f" · peak {got['peak'] / 2**20:.0f} MiB" if got["peak"] else ""
    return verdict(
        ok,
        f"{got['samples_s']:,.0f} samples/s · test acc {got['accuracy']:.2%} (CPU fp32 {reference:.2%})"
        f"{scaler}{peak}",
    )


def check_async(splits) -> tuple[str, str]:
    """The parameter server reaches its update budget with every push counted, and the model learns."""
    from keiryo.loop import TrainConfig
    from keiryo.metrics import accuracy
    from keiryo.models import build_model
    from keiryo.parallel.async_ps import train_async
    from keiryo.parallel.config import Async

    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, hidden=[32], num_classes=10)
    config = TrainConfig(batch_size=32, progress=False, patience=None)
    result = train_async(model, splits, Async(workers=2, max_updates=150, eval_every=0.5), config)
    s, acc = result.stats, accuracy(result.model, splits.test)
    ok = s["version"] == s["accepted"] == 150 == sum(s["pushes"].values()) and acc > 0.6
    return verdict(ok, f"{s['version']} updates, pushes {s['pushes']}, test acc {acc:.2%} (Ray, CPU)")


def check_elastic(device: str) -> tuple[str, str]:
    """torchrun restarts its one worker, SIGKILLed after the first checkpoint; the run resumes from it.
    40 epochs on CUDA (seconds there), so that the kill lands well before the end."""
    with tempfile.TemporaryDirectory() as tmp:
        ck = Path(tmp) / "ck.pt"
        command = [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"),
            *("--max-restarts=1", "-m", "keiryo", "train", "--model", "cnn", "--device", device),
            *("--no-progress", "--strategy", "ddp", "--epochs", "40" if device == "cuda" else "3"),
            *("--out", str(Path(tmp) / "m.pt")),
            *("--checkpoint", str(ck), "--checkpoint-every", "10"),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "4", "PYTHONWARNINGS": "ignore"}
        run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 90
        while not ck.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        victim = _child_with_rank(run.pid, 0) if run.poll() is None else None
        if victim is not None:
            os.kill(victim, signal.SIGKILL)
        try:
            output = run.communicate(timeout=120)[0]
        except subprocess.TimeoutExpired:
            run.kill()
            return verdict(False, "torchrun did not finish within 120 s of the kill")
    if victim is None:
        return verdict(False, "the run ended (or stalled) before its first checkpoint; nothing was killed")
    resumed = [line for line in output.splitlines() if "resumed from step" in line]
    ok = run.returncode == 0 and bool(resumed)
    tail = resumed[0] if resumed else " ".join(output.split()[-30:])
    return verdict(ok, f"worker SIGKILLed after the first checkpoint; exit {run.returncode}; {tail}")


def _child_with_rank(parent: int, rank: int) -> int | None:
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        try:
            if f"RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
                return int(child)
        except OSError:
            continue
    return None


def check_keiryo_quantize(splits, device: str) -> tuple[str, str]:
    """keiryo.quantize on a model on the device: the bf16 cast runs; int8 weight-only says what it does."""
    from keiryo import quantize
    from keiryo.errors import KeiryoError
    from keiryo.metrics import agreement

    model = fresh_cnn(splits).to(device).eval()
    example = next(iter(torch.utils.data.DataLoader(splits.test, batch_size=64)))[0].to(device)
    cast = quantize(copy.deepcopy(model), "bf16", example_inputs=example)
    agree = agreement(cast, model, example)
    try:
        quantize(copy.deepcopy(model), "int8-weight-only", example_inputs=example)
        int8 = "int8-weight-only ran on the device"
    except KeiryoError as exc:
        int8 = f"int8-weight-only: {exc}"
    status = "pass" if agree.top1 >= 0.95 else "FAIL"
    return status, f"bf16 cast top-1 agreement {agree.top1:.1%}; {int8}"


def check_torchao(method: str, device: str) -> tuple[str, str]:
    """torchao's kernel for `method` on a bf16 MLP: SQNR against bf16, time ratio at batch 1 and 256."""
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    if method == "int4-weight-only" and device != "cuda":
        return "skipped", "torchao's tile-packed int4 kernel (tinygemm) is CUDA-only"
    configs = {
        "int8-weight-only": (Int8WeightOnlyConfig, {}, 30.0),
        "int8-dynamic": (Int8DynamicActivationInt8WeightConfig, {}, 25.0),
        "int4-weight-only": (
            Int4WeightOnlyConfig,
            {"group_size": 128, "int4_packing_format": "tile_packed_to_4d"},
            12.0,
        ),
    }
    make, options, min_sqnr = configs[method]
    width = 4096 if device == "cuda" else 512
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width)).to(
        device, torch.bfloat16
    )
    model.eval().requires_grad_(False)
    quantized = copy.deepcopy(model)
    quantize_(quantized, make(**options))
    parts = []
    with torch.inference_mode():
        x = torch.randn(256, width, device=device, dtype=torch.bfloat16)
        ref, out = model(x).float(), quantized(x).float()
        sqnr = float(20 * torch.log10(ref.norm() / (ref - out).norm()))
        broken = False
        for batch in (1, 256):
            try:
                base, mine = _ms(model, x[:batch]), _ms(quantized, x[:batch])
            except RuntimeError as exc:  # a kernel's shape limits (e.g. _int_mm wants more than 16 rows)
                broken = True
                parts.append(f"batch {batch}: {' '.join(str(exc).split())[:120]}")
                continue
            parts.append(f"batch {batch}: {mine:.3f} ms vs bf16 {base:.3f} ms ({base / mine:.2f}x)")
    weight = type(quantized[0].weight).__name__
    detail = f"SQNR {sqnr:.1f} dB (≥ {min_sqnr:.0f}) · {weight} · " + " · ".join(parts)
    if sqnr >= min_sqnr and broken:
        return "info", detail
    return verdict(sqnr >= min_sqnr, detail)


def _ms(model: nn.Module, x: torch.Tensor, calls: int = 20) -> float:
    """Median milliseconds per call over 5 repeats, after warm-up, synchronized on CUDA."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(3):
        model(x)
    sync()
    times = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            model(x)
        sync()
        times.append((time.perf_counter() - started) / calls * 1e3)
    return statistics.median(times)


# --- the report --------------------------------------------------------------------------------------------


def machine(device: str) -> list[str]:
    """What the figures were measured on: GPU, versions, CPU model and its SIMD flags."""
    lines = [
        f"- torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), "
        f"Python {platform.python_version()}"
    ]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        nccl = torch.cuda.nccl.version() if torch.distributed.is_nccl_available() else "none"
        nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        lines.append(
            f"- GPU: {torch.cuda.get_device_name(0)} × {torch.cuda.device_count()}, "
            f"{props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}, "
            f"cuDNN {torch.backends.cudnn.version()}, NCCL {nccl}"
        )
    for package in ("torchao", "ray"):
        try:
            version = __import__(package).__version__
        except Exception as exc:
            version = f"not importable ({type(exc).__name__})"
        lines.append(f"- {package} {version}")
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        flags = [
            f for f in fields.get("Flags", "").split() if f.startswith(("avx", "amx", "fma")) or "vnni" in f
        ]
        lines.append(
            f"- CPU: {fields.get('Model name', '?').strip()}, {os.cpu_count()} cores; flags {' '.join(flags)}"
        )
    except (OSError, subprocess.CalledProcessError):
        lines.append(f"- CPU: {platform.processor() or 'unknown'}, {os.cpu_count()} cores")
    return lines


def write(path: Path, rows: list[Row], header: list[str], total_s: float) -> None:
    failed = sum(r.status == "FAIL" for r in rows)
    text = [
        "# keiryo on CUDA (benchmarks/gpu_check.py)",
        "",
        f"Run {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC: `python benchmarks/gpu_check.py`, "
        f"{total_s:.0f} s in all; {len(rows) - failed} of {len(rows)} checks did not fail.",
        "",
        *header,
        "",
        "| check | status | s | detail |",
        "|---|---|---:|---|",
        *(f"| {r.check} | {r.status} | {r.seconds:.1f} | {r.detail.replace('|', '/')} |" for r in rows),
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget", type=float, default=210.0, help="seconds for all checks (default 210)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--rehearse-on-cpu", action="store_true", help="run what can run on the CPU; no file")
    args = parser.parse_args()
    if not args.rehearse_on_cpu and not torch.cuda.is_available():
        built = torch.version.cuda or "none"
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, CUDA build {built}); nothing checked")
        return 0
    device = "cpu" if args.rehearse_on_cpu else "cuda"
    started = time.monotonic()
    _find_keiryo()
    from keiryo.data import load_data

    gpus = torch.cuda.device_count() if device == "cuda" else 0
    splits = load_data("digits")
    checks = Checks(args.budget)
    if device == "cuda":
        checks.run("cuda basics", check_cuda, 5)
    checks.run("pinned loader", lambda: check_loader(splits, device), 2)
    reference = math.nan  # set by the first check: the CPU fp32 run every training row is compared with

    def cpu_reference() -> tuple[str, str]:
        nonlocal reference
        got = train_once(splits, "cpu", "single", "fp32")
        reference = got["accuracy"]
        return "info", f"{got['samples_s']:,.0f} samples/s · test acc {reference:.2%} (CPU, {EPOCHS} epochs)"

    checks.run("train cpu fp32 (reference)", cpu_reference, 15)
    for strategy in ("single", "ddp", "fsdp"):
        # the rehearsal trains in fp32 only: CPU autocast is no CUDA check, and slow without AVX512-BF16
        for precision in ("fp32", "bf16", "fp16") if device == "cuda" else ("fp32",):
            cost = 5 if strategy == "single" else 20
            checks.run(
                f"train {strategy} {precision}",
                lambda s=strategy, p=precision: check_train(splits, device, s, p, reference),
                cost,
            )
    if gpus >= 2:
        checks.run("train pipeline bf16", lambda: _pipeline(splits, reference), 25)
    else:
        checks.rows.append(Row("train pipeline", "skipped", 0.0, f"needs 2 GPUs, found {gpus}"))
    checks.run("quantize (keiryo)", lambda: check_keiryo_quantize(splits, device), 10)
    for method in ("int8-weight-only", "int8-dynamic", "int4-weight-only"):
        checks.run(f"torchao {method}", lambda m=method: check_torchao(m, device), 15)
    checks.run("async (Ray)", lambda: check_async(splits), 40)
    checks.run("elastic restart", lambda: check_elastic(device), 45)
    total = time.monotonic() - started
    failed = [r.check for r in checks.rows if r.status == "FAIL"]
    print(f"total {total:.0f} s; failed: {', '.join(failed) or 'none'}")
    if device == "cuda":
        write(args.out, checks.rows, machine(device), total)
        print(f"wrote {args.out}")
    return 1 if failed else 0


def _find_keiryo() -> None:
    """On a bare machine keiryo may not be installed: use this checkout's src/ (torchrun's workers too)."""
    try:
        import keiryo  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(SRC))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))


def _pipeline(splits, reference: float) -> tuple[str, str]:
    """Two pipeline stages on two GPUs, bf16 (the schedules have no loss scaling for fp16)."""
    from keiryo.loop import TrainConfig
    from keiryo.metrics import accuracy
    from keiryo.parallel.config import Pipeline
    from keiryo.training import train

    config = TrainConfig(epochs=EPOCHS, progress=False, device="cuda", precision="bf16", patience=None)
    result = train(fresh_cnn(splits), splits, Pipeline(workers=2, timeout=90.0), config)
    acc = accuracy(result.model.cpu().float().eval(), splits.test)
    return verdict(abs(acc - reference) <= ACCURACY_SLACK, f"test acc {acc:.2%} (CPU fp32 {reference:.2%})")


if __name__ == "__main__":
    sys.exit(main())
