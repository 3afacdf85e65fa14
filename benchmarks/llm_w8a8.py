"""W8A8 on SmolLM2-135M: one activation scale per call (fbgemm's dynamic GEMM as torch.ao uses it) against
one per token, without and with SmoothQuant; resident memory of the one-packed-copy layer; GGUF export read
back by transformers. A focused companion of benchmarks/llm.py (same model, split, context and kernels),
small enough for a shared machine:

    nice -n 5 python benchmarks/llm_w8a8.py        # ~20 min on 2 loaded cores; writes out/llm_w8a8.md

Perplexity: the first HELD_OUT_TOKENS tokens of llm.py's held-out plays, context 512, stride 512, every row in
this process. Speed: prefill ms of a 128-token prompt and greedy decode tokens/s at batch 1 with the KV
cache, all rows timed interleaved. Memory: a fresh process loads the saved W8A8 file twice (llm.py's
`child_memory`); the W8A8 layers before this change held keiryo's int8 buffers beside fbgemm's packing
(291.2 MiB resident in llm.md's run at commit 2bb80b3).
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from pathlib import Path

import torch
from llm import CONTEXT, OUT, PACKAGE_NOTE, STRIDE, THREADS, child_memory, cpu, gguf_path

HELD_OUT_TOKENS = 2048
CALIBRATION_WINDOWS, CALIBRATION_LENGTH = 8, 512
PROMPT_TOKENS, NEW_TOKENS, ROUNDS = 128, 32, 3


def main() -> None:
    import subprocess

    import transformers

    from keiryo.lm import (
        SmoothQuant,
        WeightQuant,
        calibration_windows,
        compress,
        export_gguf,
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
    started, load_start = time.time(), os.getloadavg()[0]
    model_name, flags = cpu()
    source = f"gguf:{gguf_path()}"
    float_model, tokenizer = load_causal_lm(source)
    splits = split_documents(shakespeare_plays(), held_out=4, seed=0)
    held_out = tokenize(tokenizer, splits.held_out, HELD_OUT_TOKENS)
    calibration = calibration_windows(
        tokenize(tokenizer, splits.calibration, 100_000), CALIBRATION_WINDOWS, CALIBRATION_LENGTH, seed=0
    )
    configs = {
        "float (fp32)": None,
        "W8A8 per-tensor (no smoothing)": SmoothQuant(alpha=None, per_token=False),
        "W8A8 per-token (no smoothing)": SmoothQuant(alpha=None),
        "W8A8 per-tensor SmoothQuant α=0.5": SmoothQuant(alpha=0.5, per_token=False),
        "W8A8 per-token SmoothQuant α=0.5": SmoothQuant(alpha=0.5),
        "int4 RTN g64": WeightQuant("int4", group_size=64),
    }
    workdir = Path(tempfile.mkdtemp(prefix="keiryo-llm-w8a8-"))
    rows: dict[str, dict] = {}
    models = {}
    for name, config in configs.items():
        start = time.time()
        model = float_model if config is None else compress(copy.deepcopy(float_model), config, calibration)
        row = {"compress_s": time.time() - start}
        row["ppl"] = perplexity(model, held_out, context=CONTEXT, stride=STRIDE).perplexity
        row["weights"] = tensor_bytes(model)
        path = workdir / "model.pt"
        row["file"] = save_compressed(model, path)
        if name == "W8A8 per-token SmoothQuant α=0.5":
            row["memory"] = child_memory(path)
        path.unlink()
        if config is not None:
            gguf = workdir / "model.gguf"
            row["gguf"] = export_gguf(model, gguf, source)
            if name == "int4 RTN g64":  # Q4_1 read back by transformers (dequantized to float)
                back, _ = load_causal_lm(gguf)
                row["gguf_ppl"] = perplexity(back, held_out, context=CONTEXT, stride=STRIDE).perplexity
                del back
            gguf.unlink()
        rows[name] = row
        models[name] = model
        print(name, {k: v for k, v in row.items() if k != "memory"}, flush=True)
    speeds = generation_speed(models, held_out[:PROMPT_TOKENS], new_tokens=NEW_TOKENS, rounds=ROUNDS)
    load_end = os.getloadavg()[0]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    mib = 1 << 20
    base = rows["float (fp32)"]
    lines = [
        "# W8A8 on SmolLM2-135M: per-tensor against per-token activation scales; GGUF read back",
        "",
        f"`nice -n 5 python benchmarks/llm_w8a8.py` · {model_name} (flags: {' '.join(flags)}) · torch "
        f"{torch.__version__} · transformers {transformers.__version__} · {THREADS} threads · load average "
        f"{load_start:.1f} at start, {load_end:.1f} at the end (2 cores shared with other jobs: times are "
        f"noisy, rows timed interleaved) · {time.time() - started:.0f} s · commit {commit.strip() or '?'}",
        "",
        f"{PACKAGE_NOTE}. Perplexity: the first {held_out.numel()} tokens of the held-out plays of "
        f"benchmarks/llm.py ({', '.join(splits.held_out_names)}), context {CONTEXT}, stride {STRIDE} (fewer "
        "tokens than llm.md's 16384: compare rows within this table). SmoothQuant calibration: "
        f"{CALIBRATION_WINDOWS} windows × {CALIBRATION_LENGTH} tokens of the other plays. Speed: "
        f"{PROMPT_TOKENS}-token prompt, {NEW_TOKENS} greedy tokens, batch 1, median of {ROUNDS} rounds.",
        "",
        "| method | perplexity | Δ vs float | prefill b1 | decode b1 | × float | weights in RAM | file "
        "| GGUF |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        s = speeds[name]
        gguf = f"{r['gguf'] / mib:.1f} MiB" if "gguf" in r else "-"
        if "gguf_ppl" in r:
            gguf += f" (Q4_1; read back by transformers: perplexity {r['gguf_ppl']:.2f})"
        elif "gguf" in r:
            gguf += " (Q8_0)"
        lines.append(
            f"| {name} | {r['ppl']:.2f} | {100 * (r['ppl'] / base['ppl'] - 1):+.1f}% | "
            f"{s.prefill_ms:.0f} ms | "
            f"{s.decode_tokens_per_s:.1f} tok/s | "
            f"{s.decode_tokens_per_s / speeds['float (fp32)'].decode_tokens_per_s:.2f}× | "
            f"{r['weights'] / mib:.1f} MiB | {r['file'] / mib:.1f} MiB | {gguf} |"
        )
    sq = rows["W8A8 per-token SmoothQuant α=0.5"]
    resident = (sq["memory"]["loaded"] - sq["memory"]["base"]) / mib
    lines += [
        "",
        f"Resident memory of the W8A8 model (fresh process, loaded twice, growth over the second load): "
        f"**{resident:.1f} MiB** for a {sq['file'] / mib:.1f} MiB file (llm.md's run at 2bb80b3, which held "
        "keiryo's int8 buffers beside fbgemm's packing: 291.2 MiB). fbgemm keeps the int8 tensor it packed "
        "beside the packed copy (for `linear_unpack`), so one W8A8 layer still takes about twice its int8 "
        "bytes; keiryo keeps nothing else.",
        "",
        "Per-token scales: each row is divided by its own max |x| before fbgemm's dynamic GEMM (whose one "
        "scale then is every row's own) and multiplied back after: exact, since the product is linear in "
        "each row; the cost is one row-max, a division and a multiplication per call. Activations keep 7 "
        "bits on this CPU (no VNNI; fbgemm's u8·s8 products would saturate at 8).",
        "",
    ]
    OUT.mkdir(exist_ok=True)
    (OUT / "llm_w8a8.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
