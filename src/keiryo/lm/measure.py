"""Language models measured side by side, as `keiryo lm eval` and a language-model recipe report them.

What a row shows: perplexity on a text (sliding window; context and stride stated), prefill ms of a prompt
and greedy decode tokens/s with the KV cache at each batch size (all models timed interleaved, median of the
rounds), the bytes of the weights in memory, the process's peak resident memory while that model ran its
perplexity and one generation at the largest batch (the process includes every loaded model), and the size
of the model's files. `markdown` and `as_json` are the table as files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from keiryo.errors import ConfigError
from keiryo.lm.evaluate import (
    generation_speed,
    peak_resident_bytes,
    perplexity,
    release_free_memory,
    reset_peak,
    tensor_bytes,
)
from keiryo.lm.load import spec_path
from keiryo.lm.store import load_lm
from keiryo.lm.text import held_out_text, tokenize
from keiryo.progress import counting
from keiryo.units import human_bytes


@dataclass(frozen=True)
class EvalOptions:
    """What is measured: perplexity `context` and `stride` (default: the context) over at most `max_tokens`
    of the text; prefill of a `prompt_tokens` prompt and `new_tokens` greedy tokens at each of `batch_sizes`,
    median of `rounds` interleaved rounds."""

    context: int = 512
    stride: int | None = None
    max_tokens: int = 16384
    prompt_tokens: int = 128
    new_tokens: int = 32
    batch_sizes: tuple[int, ...] = (1, 8)
    rounds: int = 3


@dataclass
class LMTable:
    """The measured models, the first the baseline: per name a row of figures (`perplexity`: a Perplexity
    or absent; `b{size}`: a Speed; `weight_bytes`, `peak_bytes`, `file_bytes`), with the options and a
    title that states how they were measured."""

    rows: dict[str, dict[str, Any]]
    options: EvalOptions
    title: str


def measure(
    specs: list[str], text: str | None, options: EvalOptions = EvalOptions(), progress: bool = True
) -> LMTable:
    """Load every model (hf:FOLDER, gguf:FILE or keiryo LM files; the first is the baseline) and measure
    them side by side; `text`: a UTF-8 file or "shakespeare" (its held-out plays), None: no perplexity."""
    if options.stride is not None and options.stride > options.context:
        raise ConfigError(f"stride {options.stride} is longer than the context {options.context}")
    loaded: dict[str, tuple[Any, Any]] = {}
    for spec in specs:
        name = spec_path(spec).name
        loaded[name if name not in loaded else spec] = load_lm(spec)
    tokenizer = next((t for _, t in loaded.values() if t is not None), None)
    ids = None
    if text is not None:
        if tokenizer is None:
            raise ConfigError("none of the models carries a tokenizer; give one from hf:FOLDER or gguf:FILE")
        ids = tokenize(tokenizer, held_out_text(text), options.max_tokens)
    prompt = _prompt(ids, options.prompt_tokens, next(iter(loaded.values()))[0].config.vocab_size)
    rows: dict[str, dict[str, Any]] = {
        name: {"file_bytes": _source_bytes(spec)} for name, spec in zip(loaded, specs, strict=True)
    }
    for name, (model, _) in loaded.items():
        rows[name]["weight_bytes"] = tensor_bytes(model)
        release_free_memory()
        reset_peak()
        if ids is not None:
            with counting(f"{name}: perplexity (tokens)", ids.numel() - 1, progress) as advance:
                rows[name]["perplexity"] = perplexity(
                    model, ids, context=options.context, stride=options.stride, progress=advance
                )
        with torch.inference_mode():
            batch = prompt.unsqueeze(0).expand(max(options.batch_sizes), -1)
            model.generate(batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
        rows[name]["peak_bytes"] = peak_resident_bytes()
    models = {name: model for name, (model, _) in loaded.items()}
    with counting("generation speed (batch sizes)", len(options.batch_sizes), progress) as advance:
        for size in options.batch_sizes:
            speeds = generation_speed(
                models, prompt, batch_size=size, new_tokens=options.new_tokens, rounds=options.rounds
            )
            for name, speed in speeds.items():
                rows[name][f"b{size}"] = speed
            advance(1)
    return LMTable(rows, options, _title(ids, text, options, prompt))


def headers(options: EvalOptions) -> list[str]:
    """The table's column names."""
    names = ["model", "perplexity"]
    for size in options.batch_sizes:
        names += [f"prefill ms b{size}", f"decode tok/s b{size}"]
    return [*names, f"decode × first (b{options.batch_sizes[0]})", "weights in RAM", "peak RSS", "file"]


def cells(table: LMTable, name: str) -> list[str]:
    """Row `name` as text, its decode speed against the first row's."""
    row, base, first = table.rows[name], next(iter(table.rows.values())), table.options.batch_sizes[0]
    ppl = row.get("perplexity")
    out = [f"{ppl.perplexity:.2f}" if ppl else "-"]
    for size in table.options.batch_sizes:
        speed = row[f"b{size}"]
        out += [f"{speed.prefill_ms:.0f}", f"{speed.decode_tokens_per_s:.1f}"]
    ratio = row[f"b{first}"].decode_tokens_per_s / base[f"b{first}"].decode_tokens_per_s
    peak = row["peak_bytes"]
    return [
        *out,
        f"{ratio:.2f}×",
        human_bytes(row["weight_bytes"]),
        human_bytes(peak) if peak else "-",
        human_bytes(row["file_bytes"]),
    ]


def markdown(table: LMTable) -> str:
    """The title and a markdown table."""
    names = headers(table.options)
    lines = [table.title, "", "| " + " | ".join(names) + " |", "|---|" + "---:|" * (len(names) - 1)]
    lines += [f"| {name} | " + " | ".join(cells(table, name)) + " |" for name in table.rows]
    return "\n".join(lines) + "\n"


def as_json(table: LMTable) -> dict[str, Any]:
    """The figures unrounded, one entry per model."""
    models = []
    for name, row in table.rows.items():
        ppl = row.get("perplexity")
        entry: dict[str, Any] = {
            "name": name,
            "perplexity": ppl.perplexity if ppl else None,
            "scored_tokens": ppl.tokens if ppl else None,
            "weight_bytes": row["weight_bytes"],
            "peak_rss_bytes": row["peak_bytes"],
            "file_bytes": row["file_bytes"],
        }
        for size in table.options.batch_sizes:
            speed = row[f"b{size}"]
            entry[f"batch_{size}"] = {
                "prefill_ms": speed.prefill_ms,
                "decode_tokens_per_s": speed.decode_tokens_per_s,
            }
        models.append(entry)
    stride = table.options.stride or table.options.context
    return {"title": table.title, "context": table.options.context, "stride": stride, "models": models}


def _prompt(ids: torch.Tensor | None, length: int, vocab: int) -> torch.Tensor:
    """The first `length` tokens of the text, or seeded random ids when there is no text."""
    if ids is not None and ids.numel() >= length:
        return ids[:length]
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(0))


def _source_bytes(spec: str) -> int:
    path = spec_path(spec)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))
    return path.stat().st_size


def _title(ids: torch.Tensor | None, text: str | None, options: EvalOptions, prompt: torch.Tensor) -> str:
    stride = options.stride or options.context
    what = (
        f"perplexity on {ids.numel()} tokens of {text} (context {options.context}, stride {stride})"
        if ids is not None
        else "no text: perplexity not measured, prompt of random tokens"
    )
    return (
        f"keiryo lm eval · {what} · prefill of a {prompt.numel()}-token prompt · decode {options.new_tokens} "
        f"greedy tokens with the KV cache, median of {options.rounds} interleaved rounds · "
        f"{torch.get_num_threads()} threads"
    )
