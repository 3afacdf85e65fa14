"""Hugging Face models from a local directory as keiryo models: `build_model("hf:PATH")`, offline.

Every family loads: a causal LM (GPT-2, Llama, Qwen2, Mistral...), an image classifier (ResNet, ConvNeXT,
ViT...) or any other base model comes back as transformers' own object, called with its usual inputs
(`(ids, mask)`, `{"pixel_values": ...}`); keiryo's example-input convention (`keiryo.inputs`) carries them.
A transformers object made in memory is saved by its class and config (`config_spec`, factory "hf-config")
and rebuilt by `from_config`, so `keiryo.save`/`load` need no folder and unpickle no code.

A text encoder becomes an `HFModel`, whose forward takes token ids as one tensor (B, 2, L) — input_ids and
attention_mask stacked — or a list of texts, which go through the directory's own tokenizer. It returns the
sentence embedding (mean pooling over the mask, L2-normalised where the directory is a sentence-transformers
model, as all-MiniLM is) or, for a sequence classifier, the logits. BERT-style self-attention (separate
query/key/value Linears) is rebuilt as `FusedSelfAttention` with one `qkv` Linear and an int `num_heads`
(the layout keiryo's pruner removes whole heads from); the arithmetic is the same. Nothing is downloaded:
transformers runs with `local_files_only=True` and no remote code.

Reading the folder (what is refused before transformers sees it) is `keiryo.hf_files`; texts, text data and
embedding quality are `keiryo.hf_text`; writing a model back as a folder is `keiryo.hf_export`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keiryo import hf_files
from keiryo.attention import qkv_attention
from keiryo.errors import ArtifactError, ConfigError, ModelError, TrustError, one_line
from keiryo.hf_files import check_model_size, check_no_remote_code, check_weights, model_dir, optional_json

HF_PREFIX = "hf:"
HF_CONFIG = "hf-config"  # the factory of a transformers model object saved without a folder: its config
AUTO_CLASSES = {
    "embedding": "AutoModel",
    "classifier": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
    "image-classifier": "AutoModelForImageClassification",
    "base": "AutoModel",
}
TASKS = tuple(AUTO_CLASSES)
ARCHITECTURE_TASKS = (
    ("ForSequenceClassification", "classifier"),
    ("ForCausalLM", "causal-lm"),
    ("LMHeadModel", "causal-lm"),
    ("ForImageClassification", "image-classifier"),
)
POOLINGS = ("mean", "cls", "max")


def is_hf_spec(spec: object) -> bool:
    """Whether a model spec names a Hugging Face directory ("hf:PATH")."""
    return isinstance(spec, str) and spec.startswith(HF_PREFIX)


def hf_factory(spec: str) -> tuple[str, Any]:
    """(the spec to record, with the path made absolute; the factory) for `build_model("hf:PATH")`."""
    directory = model_dir(spec[len(HF_PREFIX) :])
    return f"{HF_PREFIX}{directory}", functools.partial(load_hf, str(directory))


# --- the model ----------------------------------------------------------------------------------------------


class FusedSelfAttention(nn.Module):
    """BERT self-attention with query, key and value in one `qkv` Linear and an int `num_heads`.

    The head size is read from `qkv` at every call, so the module keeps working after whole heads are
    pruned (set `num_heads` to the new count). Encoder self-attention only (no cache, no cross-attention).
    """

    def __init__(self, hidden: int, all_head_size: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(hidden, 3 * all_head_size)

    @classmethod
    def from_hf(cls, attention: nn.Module) -> FusedSelfAttention:
        """The fused twin of a BertSelfAttention-like module, with its weights."""
        q, k, v = attention.query, attention.key, attention.value
        fused = cls(q.in_features, q.out_features, attention.num_attention_heads, attention.dropout.p)
        with torch.no_grad():
            fused.qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            fused.qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
        return fused

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs: Any):
        if kwargs.get("encoder_hidden_states") is not None or kwargs.get("cache") is not None:
            raise ModelError("FusedSelfAttention is encoder self-attention: no cross-attention or cache")
        dropout = self.dropout if self.training else 0.0
        return qkv_attention(self.qkv, hidden_states, self.num_heads, dropout, attention_mask), None


class HFModel(nn.Module):
    """A transformers model whose forward takes (B, 2, L) token ids (or texts) and returns one vector each.

    Float token ids are accepted (data files store inputs as float32, exact for any vocabulary below 2²⁴).
    Padding on the right is trimmed to the batch's longest sequence before the model runs.
    """

    def __init__(
        self, model: nn.Module, source: str, task: str, pooling: str, normalize: bool, max_length: int
    ):
        super().__init__()
        self.model = model
        self.source = source  # the directory; its tokenizer is looked up, not stored (deep copies stay cheap)
        self.task = task
        self.pooling = pooling
        self.normalize = normalize
        self.max_length = max_length

    def forward(self, tokens: Tensor | Sequence[str] | Mapping[str, Tensor]) -> Tensor:
        ids, mask = self._ids_and_mask(tokens)
        length = max(int(mask.sum(1).max()), 1) if len(mask) else mask.shape[1]
        ids, mask = ids[:, :length], mask[:, :length]
        out = self.model(input_ids=ids, attention_mask=mask)
        if self.task == "classifier":
            return out.logits
        hidden = out.last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "max":
            pooled = hidden.masked_fill(weights == 0, torch.finfo(hidden.dtype).min).amax(1)
        else:
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def _ids_and_mask(self, tokens: Any) -> tuple[Tensor, Tensor]:
        if isinstance(tokens, Mapping):
            ids = tokens["input_ids"]
            mask = tokens.get("attention_mask", torch.ones_like(ids))
            return ids.long(), mask.long()
        if isinstance(tokens, (list, tuple)) and all(isinstance(t, str) for t in tokens):
            tokens = self.tokenize(tokens)
        if not isinstance(tokens, Tensor) or tokens.dim() != 3 or tokens.shape[1] != 2:
            shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ModelError(
                f"a Hugging Face model takes token ids as a (batch, 2, length) tensor (input_ids, "
                f"attention_mask), a dict of them, or a list of texts; got {shape}"
            )
        tokens = tokens.round().long() if tokens.is_floating_point() else tokens.long()
        return tokens[:, 0], tokens[:, 1]

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Texts → (N, 2, L) token ids and attention mask by the directory's tokenizer, padded alike."""
        tokenizer = hf_files.tokenizer_for(self.source)
        encoded = tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return torch.stack([encoded["input_ids"], encoded["attention_mask"]], dim=1).long()

    @torch.inference_mode()
    def encode(self, texts: Sequence[str] | Tensor, batch_size: int = 64) -> Tensor:
        """Embeddings (or logits) of texts or token ids, batch by batch, in eval mode."""
        tokens = self.tokenize(texts) if not isinstance(texts, Tensor) else texts
        was_training = self.training
        self.eval()
        out = torch.cat([self(tokens[i : i + batch_size]).float() for i in range(0, len(tokens), batch_size)])
        self.train(was_training)
        return out


def load_hf(
    path: str,
    task: str | None = None,
    layers: int | list[int] | None = None,
    intermediate_size: int | None = None,
    max_length: int = 128,
    pooling: str | None = None,
) -> nn.Module:
    """The model in a local Hugging Face directory, offline, in eval mode.

    `task` (default: from the config's architecture) "causal-lm" (GPT-2, Llama, Qwen2, Mistral...),
    "image-classifier" (ResNet, ConvNeXT, ViT...) and "base" (any other AutoModel) give transformers' own
    model, which takes its usual inputs (`(ids, mask)`, `pixel_values`); "embedding" and "classifier" (text
    encoders) give an `HFModel`. For those, `layers` keeps that many encoder layers, evenly spaced (or the
    listed indices), and `intermediate_size` keeps the feed-forward neurons of largest weight norm: the
    student of the same config.
    """
    directory = model_dir(path)
    check_no_remote_code(directory)  # before transformers sees the folder
    check_weights(directory)
    transformers = hf_files.transformers_module()
    try:
        config = transformers.AutoConfig.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # transformers reading a user's config: any failure is the file's
        raise ArtifactError(f"cannot read '{directory / 'config.json'}': {one_line(exc)}") from exc
    task = task or task_of(config)
    if task not in TASKS:
        raise ConfigError(f"unknown task '{task}' for a Hugging Face model (choose {', '.join(TASKS)})")
    wrapped = task in ("embedding", "classifier")
    if not wrapped and (layers, intermediate_size, pooling) != (None, None, None):
        raise ConfigError(f"layers, intermediate_size and pooling apply to text encoders, not a {task} model")
    auto = getattr(transformers, AUTO_CLASSES[task])
    check_model_size(lambda: auto.from_config(config, trust_remote_code=False), f"'{directory}/config.json'")
    options = {"attn_implementation": "sdpa"} if wrapped else {}  # conv models have no attention to choose
    try:
        model = auto.from_pretrained(
            str(directory), config=config, local_files_only=True, trust_remote_code=False, **options
        )
    except Exception as exc:  # transformers reading a user's weights: any failure is the files'
        raise ArtifactError(f"cannot load the model in '{directory}': {one_line(exc)}") from exc
    if not wrapped:
        return model.eval()
    if task == "embedding" and getattr(model, "pooler", None) is not None:
        model.pooler = None  # sentence embeddings pool the tokens themselves; the CLS pooler is never used
    if layers is not None:
        _keep_layers(model, layers)
    if intermediate_size is not None:
        _narrow_feed_forward(model, intermediate_size)
    _fuse_attention(model)
    pool, normalize = _sentence_transformers_head(directory)
    pool = pooling or pool
    if pool not in POOLINGS:
        raise ConfigError(f"unknown pooling '{pool}' (choose {', '.join(POOLINGS)})")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ConfigError(f"max_length must be a whole number ≥ 1, got {max_length!r}")
    return HFModel(model, str(directory), task, pool, normalize, max_length).eval()


def task_of(config: Any) -> str:
    """The task a config's architecture names: a head it ends with, else a text encoder's embedding (a
    vocabulary), else the base model."""
    archs = config.architectures or []
    for suffix, task in ARCHITECTURE_TASKS:
        if any(a.endswith(suffix) for a in archs):
            return task
    return "embedding" if hasattr(config, "vocab_size") else "base"


def config_spec(model: nn.Module) -> dict | None:
    """The spec that rebuilds a transformers model object from its config alone ({"factory": HF_CONFIG,
    "kwargs": {"architecture", "config"}}), or None for anything else (remote-code classes included)."""
    config = getattr(model, "config", None)
    if not type(model).__module__.startswith("transformers.") or not hasattr(config, "to_json_string"):
        return None
    plain = json.loads(config.to_json_string(use_diff=False))
    return {"factory": HF_CONFIG, "kwargs": {"architecture": type(model).__name__, "config": plain}}


def from_config(architecture: str, config: dict) -> nn.Module:
    """A transformers model class (named, never imported from elsewhere) built from a config dict, randomly
    initialised; `keiryo.load` loads its weights. A config asking for its own code (auto_map) is refused."""
    if "auto_map" in config:
        raise TrustError(
            f"the config of '{architecture}' asks to run its own Python code (auto_map); keiryo never runs "
            "a model's code, not even with --trust-code"
        )
    transformers = hf_files.transformers_module()
    cls = getattr(transformers, architecture, None) if architecture.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ArtifactError(f"'{architecture}' is not a model class that transformers ships")
    try:
        built = cls.config_class.from_dict(config)
    except Exception as exc:  # transformers reading a file's config: any failure is the file's
        raise ArtifactError(f"the config of '{architecture}' is not valid: {one_line(exc)}") from exc
    check_model_size(lambda: cls(built), f"the config of '{architecture}'")
    with hf_files.no_init_weights():
        return cls(built).eval()


def _sentence_transformers_head(directory: Path) -> tuple[str, bool]:
    """(pooling, normalize) from a sentence-transformers directory's files; ("mean", False) otherwise."""
    pooling, normalize = "mean", False
    options = optional_json(directory / "1_Pooling" / "config.json")
    if isinstance(options, dict):
        pooling = next((p for p in ("cls", "max") if options.get(f"pooling_mode_{p}_token")), "mean")
    modules = optional_json(directory / "modules.json")
    if isinstance(modules, list):
        types = [str(m.get("type", "")) for m in modules if isinstance(m, dict)]
        normalize = any(t.endswith("Normalize") for t in types)
    return pooling, normalize


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of encoder layers of a BERT-style model (`encoder.layer`)."""
    base = getattr(model, "base_model", model)
    found = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(found, nn.ModuleList):
        raise ModelError(
            f"{type(model).__name__} has no encoder.layer list: layer and width changes need a "
            "BERT-style encoder"
        )
    return found


def _keep_layers(model: nn.Module, layers: int | list[int]) -> None:
    """Keep `layers` encoder layers evenly spaced from first to last (an int) or the listed indices."""
    blocks = encoder_layers(model)
    total = len(blocks)
    if isinstance(layers, int) and not isinstance(layers, bool):
        if not 1 <= layers <= total:
            raise ConfigError(f"layers must be between 1 and {total} (the model's layer count), got {layers}")
        keep = [round(i * (total - 1) / (layers - 1)) for i in range(layers)] if layers > 1 else [total - 1]
    elif isinstance(layers, list) and layers and all(isinstance(i, int) and 0 <= i < total for i in layers):
        keep = sorted(set(layers))
    else:
        raise ConfigError(f"layers must be a count or a list of indices in [0, {total}), got {layers!r}")
    kept = nn.ModuleList([blocks[i] for i in keep])
    for i, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = i
    model.base_model.encoder.layer = kept
    model.config.num_hidden_layers = len(kept)


@torch.no_grad()
def _narrow_feed_forward(model: nn.Module, size: int) -> None:
    """Keep the `size` feed-forward neurons of each layer with the largest in/out weight norm."""
    for block in encoder_layers(model):
        up, down = block.intermediate.dense, block.output.dense
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= up.out_features:
            raise ConfigError(f"intermediate_size must be between 1 and {up.out_features}, got {size!r}")
        score = up.weight.norm(dim=1) * down.weight.norm(dim=0)
        keep = score.topk(size).indices.sort().values
        new_up, new_down = nn.Linear(up.in_features, size), nn.Linear(size, down.out_features)
        new_up.weight.copy_(up.weight[keep])
        new_up.bias.copy_(up.bias[keep])
        new_down.weight.copy_(down.weight[:, keep])
        new_down.bias.copy_(down.bias)
        block.intermediate.dense, block.output.dense = new_up, new_down
    model.config.intermediate_size = size


def _fuse_attention(model: nn.Module) -> None:
    """Replace each BertSelfAttention-like module (query/key/value Linears) by a FusedSelfAttention."""
    for name, module in list(model.named_modules()):
        parts = [getattr(module, p, None) for p in ("query", "key", "value")]
        if all(isinstance(p, nn.Linear) for p in parts) and isinstance(
            getattr(module, "num_attention_heads", None), int
        ):
            if getattr(module, "is_decoder", False):
                continue  # decoders keep their own attention (caches, causal masks)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, FusedSelfAttention.from_hf(module))
