"""A causal LM — float, pruned or quantized by keiryo.lm — written as a GGUF file that llama.cpp runs.

Which keiryo layers map to which GGUF tensor types, exactly (the file holds the very numbers keiryo computed
with, not a re-quantization):

- float / pruned weights → F32, F16 or BF16 (`float_type`); GGUF has no sparse type, so a pruned model's file
  is as large as the float one (pruning saves space only in keiryo's own file).
- `Int8Linear`, `W8A8Linear` and `Int8Embedding` (int8, one scale per output row) → Q8_0 (blocks of 32 int8
  values with one fp16 scale each: every block of a row gets the row's scale). W8A8's integer activations
  are a property of the kernel, not of the weights: llama.cpp quantizes activations itself.
- `Int4Linear` (4-bit q, W = (q − 8)·scale + zero per group of 32, 64 or 128 inputs) → Q4_1 (blocks of 32:
  W = d·q + m, d = scale, m = zero − 8·scale, both fp16; m is the one value rounded on the way).
  Q4_0 (symmetric, no offset) does not map: keiryo's int4 groups are asymmetric.

Only the Llama architecture is written (q and k rows permuted into llama.cpp's rotary layout, as its own
converter does). The tokenizer comes from the source: a GGUF file's tokenizer.* and general.* metadata are
copied as they are; a Hugging Face folder's byte-level BPE tokenizer (tokenizer.json) is converted with the
`gguf` package's vocabulary readers (its pre-tokenizer is written as "default": llama.cpp names pre-tokenizers
by a hash of their behaviour that only its converter computes).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from keiryo.errors import ConfigError, ModelError, check_choice
from keiryo.lm.kernels import Int4Linear, Int8Embedding, Int8Linear, W8A8Linear
from keiryo.lm.load import _first_line, _gguf_reader, _resolve

FLOAT_TYPES = ("f32", "f16", "bf16")
BLOCK = 32  # values per Q8_0 / Q4_1 block
MAPS = {  # keiryo layer → GGUF tensor type, for messages and the CLI's help
    "float or pruned": "F32 | F16 | BF16",
    "int8 (weight-only, W8A8, int8 embedding)": "Q8_0",
    "int4 (RTN or GPTQ, groups of 32/64/128)": "Q4_1",
}


def export_gguf(
    model: nn.Module, path: str | os.PathLike, tokenizer_source: str | os.PathLike, float_type: str = "f32"
) -> int:
    """Write `model` (a Llama-architecture causal LM from keiryo.lm) to `path` as GGUF, atomically, with the
    tokenizer of `tokenizer_source` (the gguf:FILE or hf:FOLDER the model came from). Returns the bytes."""
    gguf = _gguf()
    check_choice(float_type, FLOAT_TYPES, "GGUF float type")
    check_exportable(model)
    config = model.config
    source, kind = _resolve(tokenizer_source)
    tensors = list(_tensors(model, float_type, gguf))
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, staged = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(handle)
    try:
        writer = gguf.GGUFWriter(staged, "llama")
        _write_architecture(writer, config, [block.mlp.down_proj.in_features for block in model.model.layers])
        writer.add_file_type(_file_type(tensors, float_type, gguf))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if kind == "gguf":
            _copy_tokenizer(writer, source, gguf)
        else:
            _convert_tokenizer(writer, source, gguf)
        for name, array, raw_type in tensors:
            writer.add_tensor(name, array, raw_dtype=raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staged, target)
    finally:
        Path(staged).unlink(missing_ok=True)
    return target.stat().st_size


def check_exportable(model: nn.Module) -> None:
    """Refuse, in one line, a model GGUF export cannot write (before any work is spent on it)."""
    architecture = getattr(getattr(model, "config", None), "model_type", "?")
    if architecture != "llama":
        raise ModelError(f"GGUF export writes Llama-architecture models; this one is '{architecture}'")


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise ModelError("GGUF export needs the gguf package: pip install gguf") from exc
    return gguf


def _write_architecture(writer: Any, config: Any, ffn_widths: list[int]) -> None:
    """The Llama hyperparameters; the feed-forward length one per block (an array, which llama.cpp reads)
    where the blocks were pruned to different widths (`ffn_widths`), else the one width."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ModelError(f"GGUF export does not write rope scaling '{rope.get('rope_type')}'")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(ffn_widths[0] if len(set(ffn_widths)) == 1 else ffn_widths)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)


# --- tensors ------------------------------------------------------------------------------------------------

HF_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _tensors(model: nn.Module, float_type: str, gguf: Any):
    """(GGUF name, array, raw GGML type or None) for every weight, in llama.cpp's names."""
    config = model.config
    base = model.model
    yield ("token_embd.weight", *_encode(base.embed_tokens, float_type, gguf, None))
    for index, block in enumerate(base.layers):
        for hf_name, gguf_name in HF_TO_GGUF.items():
            module = block.get_submodule(hf_name)
            if getattr(module, "bias", None) is not None:
                raise ModelError(f"GGUF export: layer {index}'s {hf_name} has a bias, which Llama has not")
            heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
            rows = _rope_rows(_rows(module), heads[gguf_name]) if gguf_name in heads else None
            yield (f"blk.{index}.{gguf_name}.weight", *_encode(module, float_type, gguf, rows))
    yield ("output_norm.weight", *_encode(base.norm, float_type, gguf, None))
    if not config.tie_word_embeddings:
        yield ("output.weight", *_encode(model.lm_head, float_type, gguf, None))


def _rows(module: nn.Module) -> int:
    return module.out_features if hasattr(module, "out_features") else module.weight.shape[0]


def _rope_rows(rows: int, heads: int) -> Tensor:
    """The row order llama.cpp's converter gives q and k: within each head, the two rotary halves
    interleaved (transformers undoes it when it reads a GGUF)."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)


def _encode(module: nn.Module, float_type: str, gguf: Any, rows: Tensor | None) -> tuple[np.ndarray, Any]:
    """(array, raw GGML type or None for a plain numpy dtype) of one module's weight."""
    if isinstance(module, (Int8Linear, Int8Embedding)):
        return _q8_0(module.weight_int8, module.scale, rows), gguf.GGMLQuantizationType.Q8_0
    if isinstance(module, W8A8Linear):
        return _q8_0(*module.int8_weight(), rows), gguf.GGMLQuantizationType.Q8_0
    if isinstance(module, Int4Linear):
        scale, zero = module.scale_zero()
        return _q4_1(module.integers(), scale, zero, module.group_size, rows), gguf.GGMLQuantizationType.Q4_1
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        raise ModelError(f"GGUF export: no mapping for a {type(module).__name__} layer")
    weight = weight.detach().float()
    if rows is not None:
        weight = weight[rows]
    if weight.dim() == 1 or float_type == "f32":  # norms stay float32, as llama.cpp keeps them
        return weight.numpy(), None
    if float_type == "f16":
        return weight.half().numpy(), None
    return gguf.quants.quantize(
        weight.numpy(), gguf.GGMLQuantizationType.BF16
    ), gguf.GGMLQuantizationType.BF16


def _q8_0(q: Tensor, scale: Tensor, rows: Tensor | None) -> np.ndarray:
    """Q8_0 bytes (rows, blocks × 34) of int8 `q` (rows, cols) with one scale per row."""
    if rows is not None:
        q, scale = q[rows], scale[rows]
    out, cols = q.shape
    if cols % BLOCK:
        raise ConfigError(f"GGUF Q8_0 needs rows of a multiple of {BLOCK} values, got {cols}")
    blocks = cols // BLOCK
    d = scale.float().reshape(out, 1).expand(out, blocks).numpy().astype(np.float16)
    values = q.to(torch.int8).reshape(out, blocks, BLOCK).numpy()
    packed = np.concatenate([d.reshape(out, blocks, 1).view(np.uint8), values.view(np.uint8)], axis=-1)
    return np.ascontiguousarray(packed.reshape(out, blocks * (2 + BLOCK)))


def _q4_1(q: Tensor, scale: Tensor, zero: Tensor, group_size: int, rows: Tensor | None) -> np.ndarray:
    """Q4_1 bytes (rows, blocks × 20) of 4-bit `q` (rows, cols) with W = (q − 8)·scale + zero per group."""
    if rows is not None:
        q, scale, zero = q[rows], scale[rows], zero[rows]
    out, cols = q.shape
    if group_size % BLOCK:
        raise ConfigError(f"GGUF Q4_1 needs int4 groups of a multiple of {BLOCK}, got {group_size}")
    blocks = cols // BLOCK
    per_block = group_size // BLOCK
    scale = scale.float().repeat_interleave(per_block, dim=1)
    minimum = zero.float().repeat_interleave(per_block, dim=1) - 8 * scale
    d = scale.numpy().astype(np.float16).reshape(out, blocks, 1)
    m = minimum.numpy().astype(np.float16).reshape(out, blocks, 1)
    values = q.to(torch.uint8).reshape(out, blocks, BLOCK).numpy()
    nibbles = values[..., : BLOCK // 2] | (values[..., BLOCK // 2 :] << 4)
    packed = np.concatenate([d.view(np.uint8), m.view(np.uint8), nibbles], axis=-1)
    return np.ascontiguousarray(packed.reshape(out, blocks * (4 + BLOCK // 2)))


def _file_type(tensors: list, float_type: str, gguf: Any) -> int:
    """general.file_type: the type most of the matrices have (llama.cpp reports it as the model's)."""
    kinds = gguf.GGMLQuantizationType
    counts: dict[Any, int] = {}
    for _, array, raw in tensors:
        if array.ndim == 2:
            counts[raw] = counts.get(raw, 0) + 1
    most = max(counts, key=counts.get) if counts else None
    types = gguf.LlamaFileType
    if most == kinds.Q4_1:
        return types.MOSTLY_Q4_1
    if most == kinds.Q8_0:
        return types.MOSTLY_Q8_0
    return {"f32": types.ALL_F32, "f16": types.MOSTLY_F16, "bf16": types.MOSTLY_BF16}[float_type]


# --- tokenizer ----------------------------------------------------------------------------------------------


def _copy_tokenizer(writer: Any, source: Path, gguf: Any) -> None:
    """The tokenizer.* and general.* metadata of a GGUF file, as they are (file type and the keys written
    from the config excepted)."""
    reader = _gguf_reader(source)
    skip = {"general.architecture", "general.file_type", "general.quantization_version"}
    value_types = gguf.GGUFValueType
    for key, field in reader.fields.items():
        if not key.startswith(("tokenizer.", "general.")) or key in skip:
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == value_types.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(key, field.contents(), vtype, sub)


def _convert_tokenizer(writer: Any, folder: Path, gguf: Any) -> None:
    """A Hugging Face folder's byte-level BPE tokenizer (tokenizer.json or vocab.json) as GGUF metadata."""
    try:
        vocab = gguf.vocab.BpeVocab(folder)
        special = gguf.vocab.SpecialVocab(folder, load_merges=True, n_vocab=vocab.vocab_size)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise ModelError(
            f"GGUF export converts byte-level BPE tokenizers only; the one in '{folder}' is not: "
            f"{_first_line(exc)}"
        ) from exc
    tokens, scores, types = zip(*vocab.all_tokens(), strict=True)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t if isinstance(t, str) else t.decode("utf-8") for t in tokens])
    writer.add_token_scores(list(scores))
    writer.add_token_types([int(t) for t in types])
    special.add_to_gguf(writer, quiet=True)
