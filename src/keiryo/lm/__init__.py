"""Causal language models: load (HF folder or GGUF), measure (perplexity, generation speed, memory),
compress (int8/int4 weight-only by RTN or GPTQ; W8A8 with per-token activation scales and SmoothQuant; 50% or
2:4 sparsity by magnitude or Wanda; structured pruning of heads, FFN width and blocks), heal or shrink
by distillation from the original (`distill`), store (keiryo's compact file, with the tokenizer) and export
as GGUF.

One module per job: `load`, `text`, `evaluate`, `calibrate` (layer-by-layer calibration), `kernels`
(quantized CPU layers), `quant`, `smooth`, `sparsity`, `prune` (one method family each; `compress` is the
verb over them), `reconstruct` (retrains the blocks pruning changed), `distill`, `store`, `gguf_export`,
`job` (a whole compression from file to file), `measure` (models side by side, as `keiryo lm eval`).
"""

from keiryo.lm.compress import compress
from keiryo.lm.distill import LMDistill, distill
from keiryo.lm.evaluate import Perplexity, Speed, generation_speed, perplexity
from keiryo.lm.gguf_export import export_gguf
from keiryo.lm.job import CalibrationText, compress_file
from keiryo.lm.load import load_causal_lm
from keiryo.lm.measure import EvalOptions, LMTable, measure
from keiryo.lm.prune import Structured
from keiryo.lm.quant import WeightQuant
from keiryo.lm.reconstruct import Reconstruct
from keiryo.lm.smooth import SmoothQuant
from keiryo.lm.sparsity import Sparsify
from keiryo.lm.store import load_compressed, load_lm, save_compressed
from keiryo.lm.text import TextSplits, calibration_windows, shakespeare_plays, split_documents, tokenize

__all__ = [
    "CalibrationText",
    "EvalOptions",
    "LMTable",
    "LMDistill",
    "Perplexity",
    "Reconstruct",
    "SmoothQuant",
    "Sparsify",
    "Speed",
    "Structured",
    "TextSplits",
    "WeightQuant",
    "calibration_windows",
    "compress",
    "compress_file",
    "distill",
    "export_gguf",
    "generation_speed",
    "load_causal_lm",
    "load_compressed",
    "load_lm",
    "measure",
    "perplexity",
    "save_compressed",
    "shakespeare_plays",
    "split_documents",
    "tokenize",
]
