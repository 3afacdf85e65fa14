"""Weight-only quantized layers for CPU inference, each running the fastest kernel this CPU has for it.

Which kernel, and why (measured on an AMD EPYC Zen 3, AVX2 only: no AVX-512, no AVX-512 BF16, no VNNI; on an
EPYC with AVX-512 BF16 the same choices decode SmolLM2-135M 3.05× (int8) and 3.4× (int4) faster than float at
batch 1, against 1.36× and 2.06× on the AVX2 one: benchmarks/out/llm.md):

- int8 (`Int8Linear`, per-output-channel symmetric scales): for a few rows (decode, ≤ `KERNEL_MAX_ROWS`)
  torch's fused `torch._weight_int8pack_mm`, which reads the int8 weight directly; it is fast only with
  bfloat16 activations here (its float32 path is ~10× slower), so decode activations are cast to bf16 for
  the product and the result back to float32. For many rows (prefill, perplexity windows) the weight is
  dequantized to float32 for that call and multiplied by the float GEMM, which beats the int8 kernel 2×
  there. torchao's `Int8WeightOnlyConfig` was measured too: on CPU it converts the whole int8 weight to float
  on every call (6× slower than float at batch 1), so it is not used.
- int4 (`Int4Linear`, asymmetric, one bf16 scale and zero per group of `group_size` inputs): torch's tinygemm
  CPU kernel `_weight_int4pack_mm_for_cpu` (the one torchao's `Int4OpaqueTensor` calls) with bf16 activations,
  for a few rows; its float32 path is ~50× slower. For many rows the packed weight is unpacked and dequantized
  to float32 for that call, as for int8.
- `Int8Embedding` looks up int8 rows and scales them: a tied input embedding shares the lm_head's int8 weight.

Scales and zeros are rounded to bfloat16 when they are chosen (`round_params`), so every path — and GPTQ's
error compensation, which needs the exact dequantized values — sees the very numbers the kernels use.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KERNEL_MAX_ROWS = 16  # at most this many rows of activations go through the fused kernels; more: dequantize


def round_params(*params: Tensor) -> tuple[Tensor, ...]:
    """Scales/zeros rounded to bfloat16 (what the kernels read), kept as float32."""
    return tuple(p.to(torch.bfloat16).float() for p in params)


def packed_linear(layer: nn.Module, x: Tensor, kernel: Callable[[Tensor], Tensor]) -> Tensor:
    """`layer`'s output through its packed `kernel` (bf16 rows in) for up to KERNEL_MAX_ROWS rows — decode and
    short prompts — else through the dequantized weight, where a float GEMM is faster."""
    shape, dtype = x.shape, x.dtype
    x2 = x.reshape(-1, layer.in_features)
    if x2.shape[0] <= KERNEL_MAX_ROWS:
        y = kernel(x2.to(torch.bfloat16).contiguous()).to(dtype)
        if layer.bias is not None:
            y = y + layer.bias.to(dtype)
    else:
        y = F.linear(x2, layer.dequantize().to(dtype), None if layer.bias is None else layer.bias.to(dtype))
    return y.reshape(*shape[:-1], layer.out_features)


class Int8Linear(nn.Module):
    """y = x Wᵀ + b with W stored as int8 (out, in) times one scale per output channel."""

    def __init__(self, weight_int8: Tensor, scale: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.reshape(-1).to(torch.bfloat16).contiguous())
        self.bias = nn.Parameter(bias.detach().float(), requires_grad=False) if bias is not None else None

    def dequantize(self) -> Tensor:
        """The float32 weight this layer computes with."""
        return self.weight_int8.float() * self.scale.float().unsqueeze(1)

    def forward(self, x: Tensor) -> Tensor:
        return packed_linear(self, x, lambda x2: torch._weight_int8pack_mm(x2, self.weight_int8, self.scale))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel, kernel=_weight_int8pack_mm"


class W8A8Linear(nn.Module):
    """int8 weights (per output channel) and int8 activations with one scale per token, on fbgemm's integer
    GEMM (`quantized::linear_dynamic`).

    fbgemm's dynamic linear quantizes its whole input with one scale per call. A per-token scale is had from
    it exactly: each row is divided by its largest |x| before the call (every row then spans [-1, 1], so the
    call's one scale is every row's own) and the output row multiplied back — the product is linear in each
    row. The bias is added afterwards, in float. `per_token=False` keeps fbgemm's one scale per call (what
    torch.ao's dynamic quantization does): a single outlier token then coarsens every other token's levels.
    Without AVX-512 VNNI fbgemm's u8·s8 products saturate, so activations keep 7 bits there (`reduce_range`).

    Only fbgemm's packed weight is held (fbgemm keeps the int8 tensor it was packed from beside the packed
    copy, for `linear_unpack`); `int8_weight()` reads the int8 values and scales back from it for saving and
    export. torch.ao's quantized ops are deprecated, but they are the CPU integer GEMM that PyTorch ships:
    `torch._int_mm` runs a reference loop on this CPU (~25× slower than float at 512 rows), and oneDNN's
    `qlinear_pointwise` halves the weights' range on AVX2 (a larger error, measured)."""

    def __init__(
        self, weight_int8: Tensor, scale: Tensor, bias: Tensor | None = None, *, per_token: bool = True
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.per_token = per_token
        self.reduce_range = not torch.cpu._is_vnni_supported()
        self._packed = _prepack(weight_int8.to(torch.int8), scale.reshape(-1).to(torch.bfloat16))
        self.bias = nn.Parameter(bias.detach().float(), requires_grad=False) if bias is not None else None

    def int8_weight(self) -> tuple[Tensor, Tensor]:
        """(int8 weight (out, in), bf16 scale per output channel), read back from the packed weight."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantized, _ = torch.ops.quantized.linear_unpack(self._packed)
            return quantized.int_repr(), quantized.q_per_channel_scales().to(torch.bfloat16)

    def dequantize(self) -> Tensor:
        """The float32 weight this layer computes with."""
        q, scale = self.int8_weight()
        return q.float() * scale.float().unsqueeze(1)

    def packed_bytes(self) -> int:
        """Bytes fbgemm holds for this layer: the packed int8 weight and the int8 tensor it keeps for unpack,
        plus per-channel scales, zero points and column offsets (estimated; the object is opaque)."""
        return 2 * self.out_features * self.in_features + 20 * self.out_features

    def forward(self, x: Tensor) -> Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        if self.per_token:
            rows = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
            y = torch.ops.quantized.linear_dynamic(x2 / rows, self._packed, self.reduce_range) * rows
        else:
            y = torch.ops.quantized.linear_dynamic(x2, self._packed, self.reduce_range)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(dtype)

    def __deepcopy__(self, memo: dict) -> W8A8Linear:
        bias = None if self.bias is None else self.bias.detach().clone()
        return W8A8Linear(*self.int8_weight(), bias, per_token=self.per_token)

    def extra_repr(self) -> str:
        bits = 7 if self.reduce_range else 8
        scales = "per-token" if self.per_token else "per-tensor"
        return (
            f"in={self.in_features}, out={self.out_features}, int8 weights per-channel, {bits}-bit dynamic "
            f"{scales} activations, kernel=fbgemm linear_dynamic"
        )


def _prepack(weight_int8: Tensor, scale: Tensor) -> object:
    """fbgemm's packed weight (no bias) from int8 values and per-channel scales."""
    with warnings.catch_warnings():  # the deprecation note on quantized tensors: see W8A8Linear
        warnings.simplefilter("ignore")
        out = weight_int8.shape[0]
        q = torch._make_per_channel_quantized_tensor(
            weight_int8.contiguous(), scale.double(), torch.zeros(out, dtype=torch.long), 0
        )
        return torch.ops.quantized.linear_prepack(q, None)


class Int8Embedding(nn.Module):
    """An embedding whose table is int8 rows times one scale per row (shareable with an `Int8Linear`)."""

    def __init__(self, weight_int8: Tensor, scale: Tensor, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight_int8.shape
        self.padding_idx = padding_idx
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scale", scale)

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(ids, self.weight_int8).float()
        return rows * F.embedding(ids, self.scale.unsqueeze(1)).float()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row"


class Int4Linear(nn.Module):
    """y = x Wᵀ + b with W stored as 4-bit integers q in [0, 15] per group of `group_size` inputs:
    W = (q - 8) · scale + zero, packed two to a byte in the layout of torch's CPU int4 kernel."""

    def __init__(
        self, q: Tensor, scale: Tensor, zero: Tensor, group_size: int, bias: Tensor | None = None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        self.register_buffer("weight_packed", packed)
        # tinygemm's (in/group, out, 2) table of bf16 scale and zero
        table = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        self.register_buffer("scale_and_zero", table)
        self.bias = nn.Parameter(bias.detach().float(), requires_grad=False) if bias is not None else None
        if _unpack_layout() is None or self.out_features % _unpack_layout() != 0:
            # This CPU packs in a layout `unpack` does not know: keep the plain integers as well.
            self.register_buffer("q_plain", q.to(torch.uint8).contiguous())
        else:
            self.q_plain = None

    def integers(self) -> Tensor:
        """The (out, in) 4-bit integers, as uint8."""
        if self.q_plain is not None:
            return self.q_plain
        return _unpack(self.weight_packed, self.out_features, self.in_features, _unpack_layout())

    def scale_zero(self) -> tuple[Tensor, Tensor]:
        """(scale, zero), each (out, in / group_size) float32."""
        table = self.scale_and_zero.float()
        return table[..., 0].t().contiguous(), table[..., 1].t().contiguous()

    def dequantize(self) -> Tensor:
        """The float32 weight this layer computes with."""
        scale, zero = self.scale_zero()
        q = self.integers().float().reshape(self.out_features, -1, self.group_size)
        w = (q - 8) * scale.unsqueeze(-1) + zero.unsqueeze(-1)
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        return packed_linear(
            self,
            x,
            lambda x2: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2, self.weight_packed, self.group_size, self.scale_and_zero
            ),
        )

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, int4 group={self.group_size}, "
            "kernel=_weight_int4pack_mm_for_cpu"
        )


def _unpack(packed: Tensor, rows: int, cols: int, block: int) -> Tensor:
    """Invert torch's CPU int4 packing: per block of `block` rows and per input column, one byte holds two
    rows' 4-bit values (AVX2: rows j and j+16 of a 32-row block; AVX-512: lanes 0|2 and 1|3 of 64)."""
    b = packed.reshape(rows // block, cols, block // 2)
    if block == 32:
        parts = [b & 15, b >> 4]
    else:  # block == 64
        parts = [b[..., :16] & 15, b[..., 16:] & 15, b[..., :16] >> 4, b[..., 16:] >> 4]
    return torch.cat(parts, dim=2).permute(0, 2, 1).reshape(rows, cols)


@functools.cache
def _unpack_layout() -> int | None:
    """The row block of this CPU's int4 packing that `_unpack` inverts (checked on a probe), or None."""
    probe = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    for block in (32, 64):
        try:
            if torch.equal(_unpack(packed, 128, 64, block).to(torch.int32), probe):
                return block
        except RuntimeError:
            continue
    return None
