"""Structured pruning of Hugging Face transformer blocks: whole attention heads and feed-forward width.

Read from the modules' own layout, not from a traced graph, so that it takes milliseconds on any family:
encoders (BERT, DistilBERT, ViT: separate query/key/value), GPT-2 (one fused Conv1D `c_attn`), and
Llama/Qwen2/Mistral-style decoders (grouped-query attention, rotary embeddings, RMSNorm, tied embeddings).
As in Torch-Pruning's LLM examples, heads go with their key/value group (so every remaining query head still
shares its key/value head) and head_dim is kept (rotary embeddings need it); the model width (embeddings,
norms, the residual stream, the tied LM head) is kept, so the outputs keep their shape. Every block keeps
the same number of heads and neurons, which is what a model config can say: it is updated
(num_attention_heads, num_key_value_heads, head_dim, intermediate size) so `save_pretrained` writes the
pruned shape. Heads and neurons are ranked by the l1/l2 norm of their weights, or by scores the caller
measured (keiryo.lm ranks them by their activations on calibration text, as Minitron does).
Whole blocks go too (`remove_layers`, ShortGPT/Minitron depth pruning): the remaining blocks are renumbered
(their KV-cache slot) and the config's layer count and per-layer lists follow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from keiryo.errors import ConfigError

QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q_lin", "k_lin", "v_lin"))
OUT_NAMES = ("o_proj", "out_proj", "out_lin", "dense")
MLP_NAMES = (
    (("gate_proj", "up_proj"), "down_proj"),
    (("c_fc",), "c_proj"),
    (("lin1",), "lin2"),
    (("fc1",), "fc2"),
)
HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
CONFIG_INTERMEDIATE = ("intermediate_size", "n_inner", "hidden_dim", "ffn_dim")
PER_LAYER_CONFIG = ("layer_types", "no_rope_layers")


@dataclass
class Heads:
    """One attention module's projections: query/key/value rows and output columns, `head_dim` wide."""

    module: nn.Module
    q: nn.Module
    k: nn.Module
    v: nn.Module
    out: nn.Module
    head_dim: int
    fused: bool = False  # GPT-2: q, k and v are three thirds of one Conv1D (`q is k is v`)

    @property
    def heads(self) -> int:
        return _width(self.q, out=True) // (3 if self.fused else 1) // self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.heads if self.fused else _width(self.k, out=True) // self.head_dim


@dataclass
class FeedForward:
    """One feed-forward block: the layers that widen (gate and up) and the one that narrows back (down)."""

    ups: list[nn.Module]
    down: nn.Module


def is_transformer(model: nn.Module) -> bool:
    """A Hugging Face model (it has a config) with attention modules this file knows how to prune."""
    return hasattr(getattr(model, "config", None), "model_type") and bool(attention_blocks(model))


def attention_blocks(model: nn.Module) -> list[Heads]:
    """Every attention module laid out as one of the known families, in model order."""
    found = []
    for module in model.modules():
        if _is_layer(getattr(module, "c_attn", None)) and hasattr(module, "split_size"):
            found.append(Heads(module, module.c_attn, module.c_attn, module.c_attn, module.c_proj,
                               module.head_dim, fused=True))  # fmt: skip
            continue
        names = next((n for n in QKV_NAMES if all(_is_layer(getattr(module, x, None)) for x in n)), None)
        if names is None:
            continue
        q, k, v = (getattr(module, x) for x in names)
        out = _output_projection(model, module)
        head_dim = _head_dim(module, model)
        if out is None or head_dim is None:
            continue
        found.append(Heads(module, q, k, v, out, head_dim))
    return found


def feed_forwards(model: nn.Module) -> list[FeedForward]:
    """Every feed-forward block: Llama (gate/up/down), GPT-2 (c_fc/c_proj), DistilBERT (lin1/lin2), ViT and
    CLIP (fc1/fc2), and BERT layers (`intermediate.dense` → `output.dense`)."""
    found = []
    for module in model.modules():
        for ups, down in MLP_NAMES:
            layers = [getattr(module, n, None) for n in (*ups, down)]
            if all(_is_layer(layer) for layer in layers):
                found.append(FeedForward(layers[:-1], layers[-1]))
        inner = getattr(getattr(module, "intermediate", None), "dense", None)
        outer = getattr(getattr(module, "output", None), "dense", None)
        if _is_layer(inner) and _is_layer(outer) and _width(inner, out=True) == _width(outer, out=False):
            found.append(FeedForward([inner], outer))
    return found


def prune_transformer(model: nn.Module, keep: float, importance: str, protected: list[str]) -> None:
    """Keep `keep` of each block's key/value groups (or query heads, with one key/value head) and of its
    feed-forward neurons, ranked by weight norms, in place; update the modules' head counts and the config."""
    if importance not in ("l1", "l2"):
        raise ConfigError(
            f"importance '{importance}' is not available for Hugging Face transformer blocks "
            "(heads and neurons are ranked by weight magnitude: use l1 or l2)"
        )
    p = 1 if importance == "l1" else 2
    skip = {model.get_submodule(name) for name in protected}  # layers whose outputs must stay whole
    for block in attention_blocks(model):
        if not {block.module, block.q, block.k, block.v} & skip:
            prune_heads(block, keep, weight_head_scores(block, p))
    for ffn in feed_forwards(model):
        if not set(ffn.ups) & skip:
            prune_neurons(ffn, keep, weight_neuron_scores(ffn, p))
    update_config(model)


def weight_head_scores(block: Heads, p: int) -> Tensor:
    """One score per query head from its weights: the l_p norms of its query rows and output columns, plus
    (grouped-query attention) its key/value group's key and value rows shared out over the group's heads."""
    heads, kv, d = block.heads, block.kv_heads, block.head_dim
    parts = 3 if block.fused else 1  # a fused c_attn scores each head's query, key and value rows together
    score = _row_norms(block.q, p).view(parts, heads, d).sum((0, 2))
    score += _row_norms(block.out, p, out=False).view(heads, d).sum(1)
    if kv > 1 and not block.fused:
        shared = (_row_norms(block.k, p) + _row_norms(block.v, p)).view(kv, d).sum(1) / (heads // kv)
        score += shared.repeat_interleave(heads // kv)
    return score


def prune_heads(block: Heads, keep: float, scores: Tensor) -> Tensor:
    """Keep `keep` of the block's key/value groups, ranked by the sum of their query heads' `scores` (one per
    query head), each with the query heads that read it; with a single key/value head (or GPT-2's
    one-to-one heads) the query heads themselves are ranked. The module's head counts follow. Returns the
    output layer's kept input columns (indices into its width before pruning)."""
    heads, kv, d = block.heads, block.kv_heads, block.head_dim
    per_group = heads // kv
    scores = scores.detach().float().cpu()
    if scores.shape != (heads,):
        raise ConfigError(
            f"head scores must have one value per query head ({heads}), got {tuple(scores.shape)}"
        )
    if kv > 1 and not block.fused:  # whole key/value groups go: each with the query heads that read it
        groups = _top(scores.view(kv, per_group).sum(1), kept_count(kv, keep))
        kept_heads = (groups[:, None] * per_group + torch.arange(per_group)).flatten()
    else:  # one key/value head shared by all (or one per head, GPT-2): the query heads go
        groups = torch.tensor([0])
        kept_heads = _top(scores, kept_count(heads, keep))
    rows = (kept_heads[:, None] * d + torch.arange(d)).flatten()
    kv_rows = (groups[:, None] * d + torch.arange(d)).flatten()
    if block.fused:  # query, key and value thirds of c_attn keep the same heads
        width = heads * d
        _keep(block.q, torch.cat([rows, rows + width, rows + 2 * width]), out=True)
        block.module.split_size = len(rows)
    else:
        _keep(block.q, rows, out=True)
        _keep(block.k, kv_rows, out=True)
        _keep(block.v, kv_rows, out=True)
    _keep(block.out, rows, out=False)
    new_heads, new_kv = len(kept_heads), len(groups) if not block.fused else len(kept_heads)
    for attr in HEAD_ATTRS:
        if isinstance(getattr(block.module, attr, None), int):
            setattr(block.module, attr, new_heads)
    for attr, value in (
        ("num_key_value_heads", new_kv),
        ("num_key_value_groups", new_heads // new_kv),
        ("all_head_size", new_heads * d),
    ):
        if isinstance(getattr(block.module, attr, None), int):
            setattr(block.module, attr, value)
    return rows


def weight_neuron_scores(ffn: FeedForward, p: int) -> Tensor:
    """One score per feed-forward neuron: the l_p norms of its rows in the widening layers and of its
    column in the narrowing one."""
    return sum(_row_norms(up, p) for up in ffn.ups) + _row_norms(ffn.down, p, out=False)


def prune_neurons(ffn: FeedForward, keep: float, scores: Tensor, multiple: int = 1) -> Tensor:
    """Keep the `keep` share of the block's feed-forward neurons with the highest `scores` (the count moved
    to the nearest `multiple`, see `kept_count`); returns the kept neurons' indices (before pruning)."""
    return keep_neurons(ffn, kept_count(_width(ffn.down, out=False), keep, multiple), scores)


def keep_neurons(ffn: FeedForward, count: int, scores: Tensor) -> Tensor:
    """Keep the `count` feed-forward neurons with the highest `scores` (one per neuron); returns their
    indices (before pruning). What `prune_neurons` does with a share, for widths chosen block by block."""
    width = _width(ffn.down, out=False)
    if tuple(scores.shape) != (width,):
        raise ConfigError(
            f"neuron scores must have one value per neuron ({width}), got {tuple(scores.shape)}"
        )
    if not 1 <= count <= width:
        raise ConfigError(f"a block keeps between 1 and its {width} neurons, got {count}")
    kept = _top(scores.detach().float().cpu(), count)
    for up in ffn.ups:
        _keep(up, kept, out=True)
    _keep(ffn.down, kept, out=False)
    return kept


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of blocks: the ModuleList each of whose entries holds an attention module."""
    attentions = [block.module for block in attention_blocks(model)]
    for module in model.modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module)
            and all(any(a is m for a in attentions for m in entry.modules()) for entry in module)
        ):
            return module
    raise ConfigError(f"{type(model).__name__} has no list of transformer blocks that keiryo can find")


def remove_layers(model: nn.Module, indices: list[int]) -> None:
    """Remove whole blocks (by index) in place; renumber the rest (each attention's `layer_idx` is its slot
    in the KV cache) and say the new depth in the config (layer count and per-layer lists)."""
    layers = transformer_layers(model)
    count = len(layers)
    drop = set(indices)
    if not drop <= set(range(count)) or len(drop) >= count:
        raise ConfigError(
            f"can remove 0 to {count - 1} of the {count} blocks by index, got {sorted(indices)}"
        )
    config = getattr(model, "config", None)
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise ConfigError(
            "this GPT-2 config scales attention by the layer index: its blocks cannot be renumbered"
        )
    kept = [i for i in range(count) if i not in drop]
    survivors = [layers[i] for i in kept]
    for new_index, block in enumerate(survivors):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    layers._modules.clear()
    for i, block in enumerate(survivors):
        layers.add_module(str(i), block)
    if config is None:
        return
    config.num_hidden_layers = len(kept)
    for attr in PER_LAYER_CONFIG:  # a value per block (Qwen2's sliding/full attention, SmolLM3's RoPE)
        value = getattr(config, attr, None)
        if isinstance(value, list) and len(value) == count:
            setattr(config, attr, [value[i] for i in kept])


def update_config(model: nn.Module) -> None:
    """Say the pruned shape in the config, so that save_pretrained writes it: where every block has the
    same number of heads (and of feed-forward neurons), as a config can only say one."""
    config = model.config
    shapes = {(b.heads, b.kv_heads, b.head_dim) for b in attention_blocks(model)}
    if len(shapes) == 1:
        heads, kv_heads, head_dim = shapes.pop()
        config.num_attention_heads = heads
        if hasattr(config, "num_key_value_heads"):
            config.num_key_value_heads = kv_heads
        config.head_dim = head_dim
    widths = {_width(ffn.down, out=False) for ffn in feed_forwards(model)}
    if len(widths) == 1:
        attr = next((a for a in CONFIG_INTERMEDIATE if hasattr(config, a)), "intermediate_size")
        setattr(config, attr, widths.pop())


# --- layers -------------------------------------------------------------------------------------------------


def _is_conv1d(layer: object) -> bool:
    """transformers' Conv1D (GPT-2): a Linear with its weight stored transposed, (in, out)."""
    return isinstance(layer, nn.Module) and type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")


def _is_layer(layer: object) -> bool:
    return isinstance(layer, nn.Linear) or _is_conv1d(layer)


def _width(layer: nn.Module, out: bool) -> int:
    if _is_conv1d(layer):
        return layer.weight.shape[1 if out else 0]
    return layer.out_features if out else layer.in_features


def _row_norms(layer: nn.Module, p: int, out: bool = True) -> Tensor:
    """The l_p norm of each output (or input) channel's weights."""
    weight = layer.weight.detach().float()
    if _is_conv1d(layer):
        weight = weight.t()
    return weight.norm(p=p, dim=1) if out else weight.norm(p=p, dim=0)


@torch.no_grad()
def _keep(layer: nn.Module, index: Tensor, out: bool) -> None:
    """Keep only the output (or input) channels at `index` of a Linear or Conv1D, in place."""
    index = index.to(layer.weight.device)
    dim = (1 if out else 0) if _is_conv1d(layer) else (0 if out else 1)
    layer.weight = nn.Parameter(layer.weight.index_select(dim, index).contiguous())
    if out and getattr(layer, "bias", None) is not None:
        layer.bias = nn.Parameter(layer.bias.index_select(0, index).contiguous())
    if _is_conv1d(layer):
        layer.nf = layer.weight.shape[1]
    elif out:
        layer.out_features = len(index)
    else:
        layer.in_features = len(index)


def kept_count(count: int, keep: float, multiple: int = 1) -> int:
    """How many of `count` remain when `keep` of them stay (at least one; pruned counts round down), with
    `multiple` > 1 moved to the nearest multiple of it (ties down; at least one multiple, at most `count`):
    widths that int4 groups, GGUF blocks and vector units divide."""
    kept = max(1, count - int(count * (1 - keep) + 1e-9))
    if multiple > 1:
        kept = min(count, max(multiple, multiple * math.ceil(kept / multiple - 0.5)))
    return kept


def _top(score: Tensor, count: int) -> Tensor:
    """Indices of the `count` highest scores, in ascending index order (so kept channels keep their order)."""
    return torch.sort(torch.topk(score, count).indices).values


def _output_projection(model: nn.Module, attention: nn.Module) -> nn.Module | None:
    """The layer reading the heads: a child of the attention (o_proj, out_lin), or for BERT/ViT the
    `output.dense` beside it in the parent (`attention.self`, or `.attention`, and `.output`)."""
    for name in OUT_NAMES:
        layer = getattr(attention, name, None)
        if _is_layer(layer):
            return layer
    for parent in model.modules():
        if any(child is attention for child in parent.children()):
            layer = getattr(getattr(parent, "output", None), "dense", None)
            return layer if _is_layer(layer) else None
    return None


def _head_dim(attention: nn.Module, model: nn.Module) -> int | None:
    for attr in ("head_dim", "attention_head_size"):
        value = getattr(attention, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    return hidden // heads if isinstance(heads, int) and isinstance(hidden, int) and heads else None
