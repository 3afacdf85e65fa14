"""What a language model is judged by: perplexity on held-out text, generation speed, and memory.

- Perplexity: exp(mean negative log-likelihood of each token given the ones before it), over a sliding
  window of `context` tokens moved by `stride` tokens. Every token after the first is scored exactly once;
  a window scores only the tokens its predecessor did not, so with stride < context each scored token sees at
  least context - stride tokens before it. With a window as long as the text it is the plain exp(mean NLL).
- Generation speed: prefill is one forward pass over a prompt that fills the KV cache (ms); decode is the
  following greedy steps, one token per sequence per step, each reading the cache (tokens/s over all
  sequences of the batch). Models in one call are timed interleaved, round by round, so a shared machine's
  noise falls on all of them alike.
- Memory: the process's resident set (VmRSS) and its peak (VmHWM, which Linux lets a process reset).
"""

from __future__ import annotations

import ctypes
import inspect
import math
import random
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keiryo.errors import ConfigError
from keiryo.lm.kernels import W8A8Linear


@dataclass
class Perplexity:
    """Perplexity over `tokens` scored tokens, with the window that produced it."""

    perplexity: float
    mean_nll: float
    tokens: int
    context: int
    stride: int


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    ids: Tensor,
    *,
    context: int = 512,
    stride: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Perplexity:
    """Sliding-window perplexity of a causal LM on 1-D token `ids` (stride defaults to `context`).

    `progress(n)` is called with the number of tokens each window scored (e.g. a progress bar's advance).
    """
    stride = context if stride is None else stride
    if context < 2 or not 1 <= stride <= context:
        raise ConfigError(f"perplexity needs context ≥ 2 and 1 ≤ stride ≤ context, got {context}, {stride}")
    ids = ids.reshape(-1).long()
    n = ids.numel()
    if n < 2:
        raise ConfigError("perplexity needs at least 2 tokens")
    was_training = model.training
    model.eval()
    nll_sum, scored, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        window = ids[begin:end]
        logits = model(window.unsqueeze(0), use_cache=False).logits[0, :-1]
        nll = F.cross_entropy(logits.float(), window[1:], reduction="none")
        new = min(end - prev_end, nll.numel())  # targets no earlier window scored
        nll_sum += float(nll[-new:].double().sum())
        scored += new
        prev_end = end
        if progress is not None:
            progress(new)
        if end == n:
            break
    model.train(was_training)
    mean = nll_sum / scored
    return Perplexity(math.exp(mean), mean, scored, context, stride)


@dataclass
class Speed:
    """Generation speed of one model at one batch size (medians over rounds)."""

    batch_size: int
    prompt_tokens: int
    new_tokens: int
    prefill_ms: float
    decode_tokens_per_s: float  # all sequences of the batch together
    rounds: int


@torch.inference_mode()
def generation_speed(
    models: Mapping[str, nn.Module],
    prompt: Tensor,
    *,
    batch_size: int = 1,
    new_tokens: int = 32,
    rounds: int = 5,
    seed: int = 0,
) -> dict[str, Speed]:
    """Prefill ms of `prompt` (1-D ids, repeated `batch_size` times) and greedy decode tokens/s with the KV
    cache, for each model, timed interleaved in a new random order each round after one warm-up round."""
    if new_tokens < 1 or rounds < 1 or batch_size < 1:
        raise ConfigError(
            f"need new_tokens, rounds, batch_size ≥ 1, got {new_tokens}, {rounds}, {batch_size}"
        )
    batch = prompt.reshape(1, -1).long().expand(batch_size, -1).contiguous()
    prefill: dict[str, list[float]] = {name: [] for name in models}
    decode: dict[str, list[float]] = {name: [] for name in models}
    order = list(models)
    shuffle = random.Random(seed).shuffle
    for round_index in range(rounds + 1):
        shuffle(order)
        for name in order:
            p, d = _generate_once(models[name].eval(), batch, new_tokens)
            if round_index:  # the first round warms up caches and allocators
                prefill[name].append(p)
                decode[name].append(d)
    return {
        name: Speed(
            batch_size=batch_size,
            prompt_tokens=batch.shape[1],
            new_tokens=new_tokens,
            prefill_ms=statistics.median(prefill[name]) * 1000,
            decode_tokens_per_s=batch_size * new_tokens / statistics.median(decode[name]),
            rounds=rounds,
        )
        for name in models
    }


def _generate_once(model: nn.Module, batch: Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds for `new_tokens` greedy steps reusing the KV cache)."""
    name = cache_argument(model)
    start = time.perf_counter()
    out = model(batch, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    middle = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, use_cache=True, **{name: getattr(out, name)})
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return middle - start, time.perf_counter() - middle


def cache_argument(model: nn.Module) -> str:
    """The name under which the model takes and returns its KV cache: `cache` (transformers ≥ 5.2x) or
    `past_key_values` (earlier)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# --- memory -------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux VmRSS), or None where /proc is not available."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_resident_bytes() -> int | None:
    """This process's peak resident memory since start or the last `reset_peak` (Linux VmHWM)."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_peak() -> bool:
    """Start a new peak: Linux resets VmHWM to the current RSS when "5" is written to clear_refs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def release_free_memory() -> bool:
    """Hand memory that was freed but kept by glibc's allocator back to the OS (malloc_trim), so that the
    resident set shows what the process holds, not what it once held. False where glibc is not present."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind the model's parameters and buffers (quantized tensors counted
    by their packed data), plus what fbgemm holds for `W8A8Linear` layers: what the weights occupy."""
    seen: dict[tuple[int, int], int] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        for leaf in _leaves(tensor):
            if leaf.device.type == "meta":
                continue
            storage = leaf.untyped_storage()
            seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
    packed = sum(m.packed_bytes() for m in model.modules() if isinstance(m, W8A8Linear))
    return sum(seen.values()) + packed


def _leaves(tensor: Tensor) -> list[Tensor]:
    """The plain tensors a (possibly subclassed) tensor is made of."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is None or type(tensor) in (Tensor, nn.Parameter):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [leaf for name in names for leaf in _leaves(getattr(tensor, name))]
