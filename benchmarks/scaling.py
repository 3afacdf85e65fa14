"""Scaling efficiency of ddp and fsdp at 2, 4 and 8 local workers, with real gradients and a real all-reduce
and a stand-in for the compute; gradient compression (fp16, PowerSGD) beside it; accuracy with compression.

Run: python benchmarks/scaling.py            (about 10-15 minutes on 2 cores)
     python benchmarks/scaling.py --quick    (a smoke run: 2 workers, small models, a short accuracy check)

What is real and what is stood in for: every worker holds parameters of the real shapes of three models
(keiryo's digits cnn; ResNet-50 and BERT-base, shapes from transformers' configs) and DDP's reducer (or FSDP2)
all-reduces (reduce-scatters) real gradient tensors of those shapes over gloo on loopback. The forward and
backward are a sleep per layer of the time that layer would take on a stated accelerator (`COMPUTE`: a Tesla
P100, the GPU of Horovod's 128-GPU figures, at 40% of its 21.2 TFLOP/s fp16 peak; FLOPs per step as `shapes`
says, split 1/3 forward, 2/3 backward,
layer by layer in proportion to its parameters), so gradients become ready through the backward as they would,
and DDP's buckets can overlap with the rest of it. A sleep costs no CPU, so 8 workers on 2 cores still
"compute" in parallel; the communication does use the CPU and is oversubscribed at 4 and 8 workers.

Per (model, workers): `ideal` is the step with DDP's communication replaced by a hook that returns at once
(same stand-in compute, same gradient writes), `step` the real one, efficiency = ideal / step; `comm` is the
step with no compute minus the same with no communication; exposed = step − ideal; the ring model is
2(N−1)/N × bytes / B with B measured here (an all-reduce of 64 MB at N=2). Written to
benchmarks/out/scaling.md and benchmarks/out/scaling.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from keiryo.data import DataSplits, load_data, split_tensors
from keiryo.loop import TrainConfig
from keiryo.metrics import accuracy
from keiryo.models import build_model, kwargs_for_data
from keiryo.parallel.config import DDP
from keiryo.parallel.ddp import GradTraffic, register_compression
from keiryo.parallel.group import init_worker
from keiryo.parallel.launch import run_local
from keiryo.training import train

OUT = Path(__file__).parent / "out"
PEAK_TFLOPS, MFU = 21.2, 0.40  # Tesla P100 (SXM2) fp16 peak, Horovod's GPU; a typical model-FLOPs utilisation
COMPUTE = f"Tesla P100 at {MFU:.0%} of {PEAK_TFLOPS} TFLOP/s fp16 = {PEAK_TFLOPS * MFU:.1f} TFLOP/s"
LAUNCH_FLOOR_S = 1e-3  # a step of a tiny model is bound by kernel launches, not FLOPs
METHODS = (None, "fp16", "powersgd:4")
BANDWIDTH_BYTES = 64 * 2**20
HOROVOD = (
    "Horovod (Sergeev & Del Balso 2018, arXiv:1802.05799): 90% scaling efficiency for Inception V3 and "
    "ResNet-101 on 128 Pascal GPUs (68% for VGG-16), over 25 Gbit/s RoCE/TCP with tensor fusion"
)


@dataclass
class Shape:
    """One model's parameter shapes grouped in layers (forward order) and the work per worker per step."""

    name: str
    layers: list[list[tuple[int, ...]]]
    flops: float  # forward + backward FLOPs per worker per step
    work: str  # what `flops` stands for

    @property
    def params(self) -> int:
        return sum(torch.Size(s).numel() for layer in self.layers for s in layer)

    @property
    def compute_s(self) -> float:
        return max(self.flops / (PEAK_TFLOPS * MFU * 1e12), LAUNCH_FLOOR_S)


def layers_of(model: nn.Module) -> list[list[tuple[int, ...]]]:
    """Parameter shapes grouped by the module path up to its last numbered part (a block, a conv+bn)."""
    groups: dict[str, list[tuple[int, ...]]] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")[:-1]
        numbered = [i for i, part in enumerate(parts) if part.isdigit()]
        key = ".".join(parts[: numbered[-1] + 1] if numbered else parts[:1])
        groups.setdefault(key, []).append(tuple(p.shape))
    return list(groups.values())


def shapes(quick: bool) -> list[Shape]:
    """The digits cnn (32 samples of 8×8 per worker: 2 × params × 64 positions FLOPs forward, ×3 with
    backward); ResNet-50 (64 images of 224², 3 × 4.1 GFLOP each); BERT-base (8 × 512 tokens, 6 × params
    × tokens)."""
    from transformers import BertConfig, BertModel, ResNetConfig, ResNetForImageClassification

    cnn = build_model("cnn")
    n = sum(p.numel() for p in cnn.parameters())
    out = [Shape("digits cnn", layers_of(cnn), 3 * 2 * n * 64 * 32, "32 digits of 8×8 per worker")]
    with torch.device("meta"):
        resnet, bert = ResNetForImageClassification(ResNetConfig()), BertModel(BertConfig())
    out.append(Shape("ResNet-50", layers_of(resnet), 3 * 4.1e9 * 64, "64 images of 224² per worker"))
    if not quick:
        n = sum(p.numel() for p in bert.parameters())
        out.append(Shape("BERT-base", layers_of(bert), 6 * n * 8 * 512, "8 × 512 tokens per worker"))
    return out


class _Sleep(torch.autograd.Function):
    """The stand-in for one layer: sleep forward, sleep backward, return real-shaped gradients (constant,
    expanded: no compute of their own; DDP/FSDP still write them into their buckets and send them)."""

    @staticmethod
    def forward(ctx, x, forward_s, backward_s, *weights):
        time.sleep(forward_s)
        ctx.backward_s, ctx.shapes = backward_s, [w.shape for w in weights]
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.backward_s)
        return (grad, None, None, *[torch.full((), 1e-3).expand(s) for s in ctx.shapes])


class Layer(nn.Module):
    """Parameters of one layer's shapes; `scale["compute"]` (shared by all layers: 0 or 1) turns its sleep
    on or off."""

    def __init__(self, shapes: list[tuple[int, ...]], seconds: float, scale: dict) -> None:
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.zeros(s)) for s in shapes)
        self.seconds, self.scale = seconds, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seconds = self.seconds * self.scale["compute"]
        return _Sleep.apply(x, seconds / 3, seconds * 2 / 3, *self.weights)


def stand_in(shape: Shape, switches: dict) -> nn.Sequential:
    """The model's parameters in its layers; each layer sleeps its share (by parameters) of the compute."""
    return nn.Sequential(
        *(
            Layer(layer, shape.compute_s * sum(torch.Size(s).numel() for s in layer) / shape.params, switches)
            for layer in shape.layers
        )
    )


def _no_comm(bucket):  # the "ideal" step: DDP's reducer and bucket writes, no all-reduce
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


class _Captured:
    """Takes the hook `register_compression` would register, so that a switch can turn it off per step."""

    def register_comm_hook(self, state, hook) -> None:
        self.state, self.hook = state, hook


def one_step(model: nn.Module) -> float:
    """The slowest worker's forward+backward seconds (all start together)."""
    dist.barrier()
    start = time.perf_counter()
    model(torch.zeros(1)).sum().backward()
    seconds = torch.tensor([time.perf_counter() - start])
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return float(seconds)


MODES = {"step": (1, True), "ideal": (1, False), "alone": (0, True), "local": (0, False)}


def ddp_case(shape: Shape, method: str | None, bucket_mb: float, rounds: int, modes: tuple[str, ...]) -> dict:
    """One DDP model with `method`'s hook: `modes` (compute on/off × communication on/off) interleaved
    step by step for `rounds` rounds after 3 warm-up steps; the median seconds of each, and the bytes the
    hook counted in its last step."""
    switches = {"compute": 1, "comm": True}
    model = stand_in(shape, switches)
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_mb, gradient_as_bucket_view=True)
    traffic, captured = GradTraffic(), _Captured()
    register_compression(captured, method, traffic, powersgd_start=2)

    def switched(state, bucket):
        return captured.hook(captured.state, bucket) if switches["comm"] else _no_comm(bucket)

    ddp.register_comm_hook(None, switched)
    for _ in range(3):  # DDP rebuilds its buckets after step 1; PowerSGD compresses from step 3
        one_step(ddp)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(rounds):
        for mode in modes:
            switches["compute"], switches["comm"] = MODES[mode]
            times[mode].append(one_step(ddp))
        switches["comm"] = True
    out = {mode: statistics.median(t) for mode, t in times.items()}
    out["bytes"] = traffic.last_sent
    del ddp, model
    gc.collect()
    return out


def fsdp_case(shape: Shape, rounds: int) -> float:
    """FSDP2, each layer sharded: median seconds (all-gathers in forward and backward, reduce-scatter)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = stand_in(shape, {"compute": 1})
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for _ in range(2):
        one_step(model)
    seconds = statistics.median(one_step(model) for _ in range(rounds))
    del model
    gc.collect()
    return seconds


def bus_bandwidth(reps: int = 5) -> float:
    """Bytes/s of one link under the ring model: 2(N−1)/N × bytes / median all-reduce seconds (64 MB fp32)."""
    tensor = torch.ones(BANDWIDTH_BYTES // 4)
    world = dist.get_world_size()
    times = []
    for i in range(reps + 2):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        seconds = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        if i >= 2:
            times.append(float(seconds))
    return 2 * (world - 1) / world * BANDWIDTH_BYTES / statistics.median(times)


def worker(models: list[Shape], rounds: dict[str, int], buckets: bool, skip: set) -> dict:
    """Every configuration for this worker count, in one process group (one start-up per worker count)."""
    init_worker(torch.device("cpu"), 3600)
    out: dict = {"bus_bandwidth": bus_bandwidth(), "rows": [], "buckets": []}
    for shape in models:
        n = rounds[shape.name]
        for method in METHODS:
            if (shape.name, method) in skip:
                continue
            modes = tuple(MODES) if method is None else ("step", "ideal")
            t = ddp_case(shape, method, 25, n, modes)
            comm = t["alone"] - t["local"] if method is None else None
            row = {"model": shape.name, "strategy": "ddp", "method": method or "fp32", "comm": comm}
            out["rows"].append({**row, "ideal": t["ideal"], "step": t["step"], "bytes": t["bytes"]})
        if (shape.name, "fsdp") not in skip:
            ideal = next(r["ideal"] for r in out["rows"] if r["model"] == shape.name)
            row = {"model": shape.name, "strategy": "fsdp", "method": "fp32", "comm": None}
            out["rows"].append(
                {**row, "ideal": ideal, "step": fsdp_case(shape, n), "bytes": 4 * shape.params}
            )
        if buckets and shape.params > 10**7:  # 25 MB is DDP's default
            for mb in (1, 25, 4 * shape.params / 2**20 + 1):
                t = ddp_case(shape, None, mb, n, ("step", "ideal"))
                out["buckets"].append(
                    {"model": shape.name, "bucket_mb": mb, "ideal": t["ideal"], "step": t["step"]}
                )
    return out


def ring_seconds(workers: int, nbytes: float, bandwidth: float) -> float:
    """The ring all-reduce model: each worker sends and receives 2(N−1)/N × bytes over its link."""
    return 2 * (workers - 1) / workers * nbytes / bandwidth


def memory_skips(models: list[Shape], workers: int) -> set:
    """(model, method) pairs whose workers would not fit in half the memory available now (peak per worker:
    parameters + gradients, + PowerSGD's error and input copies, + FSDP's gathered copies)."""
    available = int(
        next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
    )
    budget = available * 1024 * 0.5
    skip = set()
    for shape in models:
        fp32 = 4 * shape.params
        for method, factor in ((None, 2.2), ("fp16", 2.7), ("powersgd:4", 4.2), ("fsdp", 2.5)):
            if workers * factor * fp32 > budget:
                skip.add((shape.name, method))
    return skip


def wine() -> DataSplits:
    """scikit-learn's wine (178 samples, 13 features, 3 classes), standardized; 30% held out for the test."""
    from sklearn.datasets import load_wine

    x, y = load_wine(return_X_y=True)
    inputs = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    train_set, val, test = split_tensors(inputs, torch.tensor(y), seed=0, val_fraction=0.2, test_fraction=0.3)
    return DataSplits(train_set, val, test, num_classes=3, input_shape=(13,), name="wine")


def accuracy_rows(quick: bool) -> list[dict]:
    """Test accuracy after the same epochs with each compression (2 workers, same seed and batches)."""
    runs = {"digits": ("cnn", 8, 64), "wine": ("mlp", 60, 16)}
    methods = (None, "fp16") if quick else (None, "fp16", "bf16", "powersgd", "powersgd:4")
    rows = []
    for data in ("digits",) if quick else ("digits", "wine"):
        splits = load_data(data, seed=0) if data == "digits" else wine()
        name, epochs, batch = runs[data]
        epochs = 1 if quick else epochs
        config = TrainConfig(epochs=epochs, batch_size=batch, patience=None, progress=False, device="cpu")
        for method in methods:
            torch.manual_seed(0)
            model = build_model(name, **kwargs_for_data(name, splits.input_shape, splits.num_classes))
            result = train(model, splits, DDP(workers=2, grad_compression=method), config)
            traffic = result.parallel.get("grad_traffic")
            if traffic is None:
                raise RuntimeError("this keiryo's launcher does not pass grad_compression to DDP yet")
            rows.append(
                {
                    "data": data,
                    "model": name,
                    "epochs": epochs,
                    "method": method or "fp32",
                    "accuracy": accuracy(result.model, splits.test),
                    "bytes": traffic["last_step_bytes"],
                    "dense": traffic["dense_bytes_per_step"],
                }
            )
            print(f"accuracy {rows[-1]}", flush=True)
    return rows


def cpu_lines() -> list[str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return [platform.processor() or "unknown CPU"]
    keep = ("Model name", "CPU(s)", "Thread(s) per core", "L3 cache", "Flags")
    return [line.strip()[:300] for line in text.splitlines() if line.startswith(keep)]


def efficiency(row: dict) -> float:
    return row["ideal"] / row["step"]


def plot(results: dict, models: list[Shape], bandwidth: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted(results)
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), sharey=True)
    for ax, shape in zip(axes if len(models) > 1 else [axes], models, strict=True):
        for strategy, method, style in (
            ("ddp", "fp32", "o-"),
            ("ddp", "fp16", "s-"),
            ("ddp", "powersgd:4", "^-"),
            ("fsdp", "fp32", "d-"),
        ):
            points = [
                (n, efficiency(r))
                for n in counts
                for r in results[n]["rows"]
                if (r["model"], r["strategy"], r["method"]) == (shape.name, strategy, method)
            ]
            if points:
                ax.plot(*zip(*points, strict=True), style, label=f"{strategy} {method} (measured)")
        ideal = statistics.median(
            r["ideal"] for n in counts for r in results[n]["rows"] if r["model"] == shape.name
        )
        xs = list(range(2, max(counts) + 1))
        comm = [ring_seconds(n, 4 * shape.params, bandwidth) for n in xs]
        ax.plot(xs, [ideal / (ideal + c) for c in comm], "k--", label="ring model fp32, no overlap")
        ax.plot(xs, [ideal / max(ideal, c) for c in comm], "k:", label="ring model fp32, full overlap")
        ax.set_title(
            f"{shape.name} ({shape.params / 1e6:.1f}M params, {shape.compute_s * 1e3:.1f} ms compute)"
        )
        ax.axhline(0.9, color="gray", lw=0.8, ls="-.", label="Horovod: 90% at 128 GPUs (anchor)")
        ax.set_xlabel("workers (local processes, gloo on loopback)")
        ax.set_xticks(counts)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    (axes[0] if len(models) > 1 else axes).set_ylabel("scaling efficiency = ideal / measured step")
    (axes[-1] if len(models) > 1 else axes).legend(fontsize=7, loc="upper right")
    fig.suptitle(f"Stand-in compute: {COMPUTE}; loopback ring bandwidth {bandwidth / 1e9:.2f} GB/s (N=2)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 workers, no BERT, short accuracy")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--workers", default="2,4,8", help="worker counts to run now (others: from the json)")
    parser.add_argument(
        "--reuse", action="store_true", help="take every scaling row from --out's scaling.json"
    )
    args = parser.parse_args()
    models = shapes(args.quick)
    raw = args.out / "scaling.json"
    saved = json.loads(raw.read_text()) if raw.exists() and not args.quick else {"results": {}, "skipped": {}}
    counts = () if args.reuse else (2,) if args.quick else tuple(int(n) for n in args.workers.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    for workers in counts:  # saved after each count: a long run that stops keeps what it measured
        begun = time.time()
        result, skipped = scaling_run(models, workers, args.quick)
        saved["results"][str(workers)], saved["skipped"][str(workers)] = result, skipped
        saved.setdefault("minutes", {})[str(workers)] = round((time.time() - begun) / 60, 1)
        raw.write_text(json.dumps(saved, indent=1))
    results = {int(n): r for n, r in sorted(saved["results"].items(), key=lambda kv: int(kv[0]))}
    skipped = {int(n): s for n, s in saved["skipped"].items()}
    bandwidth = results[2]["bus_bandwidth"]
    if not (args.reuse and "accuracy" in saved):
        begun = time.time()
        saved["accuracy"] = accuracy_rows(args.quick)
        saved.setdefault("minutes", {})["accuracy"] = round((time.time() - begun) / 60, 1)
        raw.write_text(json.dumps(saved, indent=1))
    acc = saved["accuracy"]
    plot(results, models, bandwidth, args.out / "scaling.png")
    text = report(results, models, bandwidth, acc, skipped, saved.get("minutes", {}), args.quick)
    (args.out / "scaling.md").write_text(text)
    print(text)


def scaling_run(models: list[Shape], workers: int, quick: bool) -> tuple[dict, list[str]]:
    """One worker count in one process group: its results, and what was skipped (memory or run time: at 4
    and 8 workers BERT-base runs fp32 and fp16 only; its PowerSGD and FSDP steps take ~9 s at 2 workers)."""
    rounds = {"digits cnn": 8, "ResNet-50": 4, "BERT-base": 3}
    if quick:
        rounds = {name: 2 for name in rounds}
    slow = {("BERT-base", "powersgd:4"), ("BERT-base", "fsdp")} if workers > 2 else set()
    skip = memory_skips(models, workers) | slow
    skipped = sorted(f"{m} {k or 'fp32'}" for m, k in skip)
    print(f"{workers} workers (skipped: {skipped or 'none'})", flush=True)
    result = run_local(worker, (models, rounds, workers == 2, skip), workers, 3600)
    for row in result["rows"]:
        print(
            f"  {row['model']} {row['strategy']} {row['method']}: step {row['step'] * 1e3:.1f} ms, "
            f"ideal {row['ideal'] * 1e3:.1f} ms, eff {efficiency(row):.0%}",
            flush=True,
        )
    return result, skipped


def summary_lines(results: dict, models: list[Shape], bandwidth: float) -> list[str]:
    """Efficiency per model and worker count, each way, beside the ring model for fp32 gradients."""
    ways = (("ddp", "fp32"), ("ddp", "fp16"), ("ddp", "powersgd:4"), ("fsdp", "fp32"))
    lines = [
        "## Efficiency (ideal / measured step) at 2, 4 and 8 workers",
        "",
        "| model | workers | ddp fp32 | ddp fp16 | ddp powersgd:4 | fsdp "
        "| ring model, fp32 (no overlap · full) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for shape in models:
        for n, result in results.items():
            found = {(r["strategy"], r["method"]): r for r in result["rows"] if r["model"] == shape.name}
            if not found:
                continue
            cells = [f"{efficiency(found[w]):.0%}" if w in found else "–" for w in ways]
            ideal, comm = found[ways[0]]["ideal"], ring_seconds(n, 4 * shape.params, bandwidth)
            model = f"{ideal / (ideal + comm):.0%} · {ideal / max(ideal, comm):.0%}"
            lines.append(f"| {shape.name} | {n} | " + " | ".join(cells) + f" | {model} |")
    return [*lines, ""]


def report(results, models, bandwidth, acc, skipped, minutes, quick) -> str:
    counts = sorted(results)
    load = " ".join(open("/proc/loadavg").read().split()[:3])
    lines = [
        "# Scaling efficiency and gradient compression",
        "",
        f"Command: `python benchmarks/scaling.py{' --quick' if quick else ''}` · torch {torch.__version__} · "
        "minutes: "
        + ", ".join(f"{k if k == 'accuracy' else f'{k} workers'} {v}" for k, v in minutes.items())
        + f" · load average at the end {load} (2 cores shared with other jobs; other sessions' tests and "
        "benchmarks ran throughout, load average 12–27)",
        "",
        "```",
        *cpu_lines(),
        "```",
        "",
        f"Stand-in compute: {COMPUTE} (floor {LAUNCH_FLOOR_S * 1e3:.0f} ms per step: a tiny model is bound "
        "by kernel launches); per layer, forward sleeps 1/3 and backward 2/3 of its share (by parameters) of "
        "the "
        "step, and the backward returns real-shaped gradients that DDP (FSDP2) really all-reduces "
        "(reduce-scatters) over gloo on loopback. `ideal`: the same step with DDP's all-reduce replaced by a "
        "hook that returns at once. Efficiency = ideal / step.",
        "",
        "| model | parameters | fp32 gradients | work per worker per step | FLOPs | compute |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for s in models:
        lines.append(
            f"| {s.name} | {s.params / 1e6:.2f}M | {4 * s.params / 2**20:.1f} MiB | {s.work} | "
            f"{s.flops:.2e} | {s.compute_s * 1e3:.2f} ms |"
        )
    lines += [
        "",
        f"Loopback bandwidth (all-reduce of {BANDWIDTH_BYTES >> 20} MiB fp32, ring bus bandwidth "
        "2(N−1)/N × bytes / time): "
        + ", ".join(f"N={n}: {results[n]['bus_bandwidth'] / 1e9:.2f} GB/s" for n in counts)
        + f". The ring model uses B = {bandwidth / 1e9:.2f} GB/s (N=2) at every N.",
        "",
        *summary_lines(results, models, bandwidth),
        "## Every measured row",
        "",
        "bytes: what each worker hands to all-reduce per step (counted by keiryo's hook; PowerSGD's steady "
        "state); comm: the step with no compute minus the step with neither compute nor communication; ring "
        "model: 2(N−1)/N × bytes / B (fsdp: 3(N−1)/N × bytes / B: all-gather in forward and in backward, "
        "reduce-scatter); exposed: step − ideal; hidden: 1 − exposed / comm.",
        "",
        "| model | strategy | gradients | workers | bytes/step | ideal ms | step ms | efficiency | comm ms | "
        "ring model ms | model efficiency (no overlap · full overlap) | exposed ms | hidden |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for shape in models:
        for n in counts:
            for r in (r for r in results[n]["rows"] if r["model"] == shape.name):
                factor = 1.5 if r["strategy"] == "fsdp" else 1.0
                model_s = factor * ring_seconds(n, r["bytes"], bandwidth)
                exposed = r["step"] - r["ideal"]
                comm = r["comm"]
                hidden = f"{1 - exposed / comm:.0%}" if comm and comm > 1e-4 else "–"
                lines.append(
                    f"| {shape.name} | {r['strategy']} | {r['method']} | {n} | {r['bytes'] / 2**20:.2f} MiB "
                    f"| {r['ideal'] * 1e3:.1f} | {r['step'] * 1e3:.1f} | **{efficiency(r):.0%}** "
                    f"| {f'{comm * 1e3:.1f}' if comm is not None else '–'} | {model_s * 1e3:.1f} "
                    f"| {r['ideal'] / (r['ideal'] + model_s):.0%} · "
                    f"{r['ideal'] / max(r['ideal'], model_s):.0%} "
                    f"| {exposed * 1e3:.1f} | {hidden} |"
                )
    if any(skipped.values()):
        lines += [
            "",
            "Skipped (memory: over half of MemAvailable when that worker count started; run time: BERT-base "
            "PowerSGD and FSDP beyond 2 workers): "
            + "; ".join(f"N={n}: {', '.join(s)}" for n, s in skipped.items() if s)
            + ".",
        ]
    rows = [(n, b) for n in counts for b in results[n]["buckets"]]
    if rows:
        lines += [
            "",
            "## DDP's buckets overlap communication with backward",
            "",
            "Same model, fp32 gradients; DDP all-reduces a bucket as soon as all its gradients are ready, "
            "while the backward continues. One bucket as large as the model cannot start before the backward "
            "ends.",
            "",
            "| model | workers | bucket_cap_mb | step ms | ideal ms | efficiency | exposed ms |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for n, b in rows:
            cap = "whole model (one bucket)" if b["bucket_mb"] > 25 else f"{b['bucket_mb']:.0f}"
            lines.append(
                f"| {b['model']} | {n} | {cap} | {b['step'] * 1e3:.1f} | {b['ideal'] * 1e3:.1f} | "
                f"{b['ideal'] / b['step']:.0%} | {(b['step'] - b['ideal']) * 1e3:.1f} |"
            )
    lines += [
        "",
        "## The ring model at 128 workers (analytic, not measured)",
        "",
        f"{HOROVOD}. With the compute above, the ring model's efficiency at N=128 for fp32 gradients and for "
        "the compression ratios counted here (no overlap · full overlap):",
        "",
        "| model | gradients | loopback here | 25 Gbit/s (3.1 GB/s) | 100 Gbit/s (12.5 GB/s) "
        "| 200 Gbit/s InfiniBand per GPU (25 GB/s) |",
        "|---|---|---|---|---|---|",
    ]
    for shape in models:
        for r in (
            r for r in results[counts[0]]["rows"] if r["model"] == shape.name and r["strategy"] == "ddp"
        ):
            cells = []
            for bw in (bandwidth, 3.125e9, 12.5e9, 25e9):
                c = ring_seconds(128, r["bytes"], bw)
                cells.append(
                    f"{shape.compute_s / (shape.compute_s + c):.0%} · {min(1, shape.compute_s / c):.0%}"
                )
            lines.append(f"| {shape.name} | {r['method']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Accuracy after the same epochs, with and without compression",
        "",
        "keiryo.train with DDP(workers=2, grad_compression=...), same seed, data order and epochs; PowerSGD "
        "starts after 10 plain steps (keiryo's POWERSGD_START) with error feedback; bytes counted per step.",
        "",
        "| data | model | epochs | gradients | test accuracy | Δ vs fp32 | bytes/step | of fp32 |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    base = {r["data"]: r["accuracy"] for r in acc if r["method"] == "fp32"}
    for r in acc:
        lines.append(
            f"| {r['data']} | {r['model']} | {r['epochs']} | {r['method']} | {r['accuracy']:.2%} | "
            f"{(r['accuracy'] - base[r['data']]) * 100:+.1f} pt | {r['bytes'] / 1024:.1f} KiB | "
            f"{r['bytes'] / r['dense']:.1%} |"
        )
    lines += ["", "## What these figures show, and what they do not", "", *findings(results), *CAVEATS]
    return "\n".join(lines) + "\n"


def findings(results: dict) -> list[str]:
    """Sentences computed from the rows: what compression bought per model at the smallest worker count."""
    n = min(results)
    rows = {(r["model"], r["strategy"], r["method"]): r for r in results[n]["rows"]}
    out = []
    for model in dict.fromkeys(r["model"] for r in results[n]["rows"]):
        base = rows.get((model, "ddp", "fp32"))
        if base is None:
            continue
        parts = []
        for method in ("fp16", "powersgd:4"):
            r = rows.get((model, "ddp", method))
            if r:
                parts.append(
                    f"{method} sends {r['bytes'] / base['bytes']:.1%} of fp32's bytes and its step takes "
                    f"{r['step'] / base['step']:.2f}× fp32's"
                )
        if parts:
            out.append(f"- {model}, {n} workers: " + "; ".join(parts) + ".")
    return [
        *out,
        "- Compression trades CPU time for bytes. Here the CPU that moves loopback's bytes is the same 2 "
        "shared cores that compress them, and it is the scarce resource (casting, gloo's half-precision "
        "sums, PowerSGD's matrix products and orthogonalisation, which keiryo also waits for bucket by "
        "bucket on gloo), so fewer bytes need not make a faster step; on a real network the ring model's "
        "seconds scale with the bytes, and the "
        "128-worker rows show where compression pays (slow links, large models).",
    ]


CAVEATS = [
    "- Real here: the gradient tensors (shapes and bytes of the real models), DDP's reducer and buckets, "
    "FSDP2's sharding, gloo's all-reduce, the compression hooks and their byte counts, and the overlap of "
    "bucket all-reduces with a backward that takes the stated time.",
    "- Stood in for: the compute. A sleep takes no CPU, so the workers compute in parallel even at 8 workers "
    "on 2 cores; the compute time is an assumption (stated above), not a measurement of any accelerator.",
    "- Loopback is not a network: it is memory copies between processes on one machine, with no NIC, switch "
    "or congestion; its bandwidth and latency differ from any cluster's, and at 4 and 8 workers the 2 cores "
    "are oversubscribed, so gloo's copies and reductions (and PowerSGD's matrix products) queue for CPU time:"
    " "
    "the measured communication grows faster than the ring model's 2(N−1)/N, which assumes every link works "
    "in parallel at the N=2 bandwidth.",
    "- So the efficiencies are those of this machine, not a prediction for a cluster; what carries over is "
    "the method (ideal vs measured step, comm vs the ring model, bytes per step per compression, how much of "
    "the communication the buckets hide) and the 128-worker rows, which are the ring model only.",
    "- Gradient writes into DDP's buckets are real CPU memory traffic here (tiny on a GPU); they are in "
    "both ideal and step, so efficiency measures communication only.",
    "- The accuracy rows are one seed each on small data: a point or two of difference is within seed noise.",
]


if __name__ == "__main__":
    sys.exit(main())
