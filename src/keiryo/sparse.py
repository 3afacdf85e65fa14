"""Sparse storage for zero-heavy tensors: non-zero values plus a packed bitmask.

Unstructured pruning leaves dense tensors full of zeros; model files (and the LLM store) write them through
`encode_sparse` so the bytes on disk shrink with the sparsity, and `decode_sparse` checks what a file claims
against `KEIRYO_MAX_BYTES` before allocating.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from keiryo.errors import ArtifactError, check_bytes, one_line

SPARSE_FORMAT = "keiryo-sparse/1"
SPARSE_MAX_FRACTION = 0.75  # a tensor is stored sparse only if that takes at most this share of its bytes
MAX_DIMS = 8  # dimensions a recorded tensor or input shape may have


def checked_shape(value: Any, what: str) -> list[int]:
    """A recorded shape, checked to be at most `MAX_DIMS` whole numbers ≥ 0."""
    if (
        not isinstance(value, (list, tuple))
        or len(value) > MAX_DIMS
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        raise ArtifactError(f"{what} has shape {short(value)}, not a list of at most {MAX_DIMS} sizes ≥ 0")
    return list(value)


def short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def encode_sparse(tensor: torch.Tensor) -> torch.Tensor | dict[str, Any]:
    """A zero-heavy float tensor as {values, packed bitmask, shape}, when that is clearly smaller; else as is.

    Unstructured pruning leaves dense tensors full of zeros; this makes the file shrink with the sparsity
    (at 80% zeros an fp32 tensor takes 0.2 × 4 + 1/8 bytes per element: 0.23× of dense).
    """
    if tensor.is_quantized or not tensor.is_floating_point() or tensor.numel() < 64:
        return tensor
    if type(tensor) is not torch.Tensor:  # tensor subclasses (torchao's quantized weights) stay as they are
        return tensor
    keep = tensor != 0
    nonzero = int(keep.sum())
    sparse_bytes = (tensor.numel() + 7) // 8 + nonzero * tensor.element_size()
    if sparse_bytes > SPARSE_MAX_FRACTION * tensor.numel() * tensor.element_size():
        return tensor
    return {
        "format": SPARSE_FORMAT,
        "shape": list(tensor.shape),
        "mask": _pack_bits(keep.flatten()),
        "values": tensor[keep].clone(),
    }


def decode_sparse(entry: Any, what: str = "model file") -> Any:
    """The dense tensor that `encode_sparse` stored (anything else is returned unchanged); its size is checked
    against `KEIRYO_MAX_BYTES` before it is allocated."""
    if not (isinstance(entry, dict) and entry.get("format") == SPARSE_FORMAT):
        return entry
    try:
        check_bytes(dense_bytes(entry, what), f"{what}: a sparse tensor")
        shape, mask, values = entry["shape"], entry["mask"], entry["values"]
        numel = math.prod(shape)
        keep = _unpack_bits(mask, numel)
        if int(keep.sum()) != values.numel():
            raise ValueError("mask and values disagree")
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[keep] = values.flatten()
        return dense.view(shape)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise ArtifactError(f"{what} has a corrupt sparse tensor ({one_line(exc)})") from exc


def dense_bytes(entry: Any, what: str) -> int:
    """Bytes a stored sparse tensor decodes to (0 for anything else)."""
    if not (isinstance(entry, dict) and entry.get("format") == SPARSE_FORMAT):
        return 0
    values = entry.get("values")
    if not isinstance(values, torch.Tensor):
        raise ArtifactError(f"{what} has a corrupt sparse tensor (its values are not a tensor)")
    return math.prod(checked_shape(entry.get("shape"), f"{what}: a sparse tensor")) * values.element_size()


_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def _pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """Booleans → uint8, eight per byte, most significant bit first (like numpy.packbits)."""
    padded = torch.zeros((flags.numel() + 7) // 8 * 8, dtype=torch.uint8)
    padded[: flags.numel()] = flags.to(torch.uint8)
    return (padded.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` booleans that `_pack_bits` packed."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() * 8 < count:
        raise ValueError(f"bitmask of {packed.numel()} bytes cannot hold {count} flags")
    return (packed.unsqueeze(1) & _BIT_WEIGHTS).ne(0).flatten()[:count]
