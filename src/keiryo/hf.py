"""Hugging Face models from a local directory as keiryo models: `build_model("hf:PATH")`, offline.

`load_hf` wraps a transformers model in `HFModel`, whose forward takes token ids as one tensor (B, 2, L)
— input_ids and attention_mask stacked — or a list of texts, which go through the directory's own tokenizer.
An encoder returns its sentence embedding (mean pooling over the mask, L2-normalised where the directory is a
sentence-transformers model, as all-MiniLM is); a sequence classifier returns its logits. So `measure`,
`compare`, `quantize`, `prune`, `distill` and `save`/`load` treat it like any other model.

BERT-style self-attention (separate query/key/value Linears) is rebuilt as `FusedSelfAttention` with one
`qkv` Linear and an int `num_heads` (the layout keiryo's pruner removes whole heads from); the arithmetic is
the same. Nothing is downloaded: transformers runs with `local_files_only=True` and no remote code.

A folder is data, never code: one that asks for its own Python (`auto_map` in config.json or
tokenizer_config.json) is refused before transformers is called, with or without --trust-code. Weights are
read from safetensors (whose header is checked first) or from `.bin` files that hold nothing but tensors
(torch.load with weights_only=True); the model the config describes is sized on the meta device and checked
against `KEIRYO_MAX_BYTES` before anything is allocated. A broken file is one ArtifactError naming it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keiryo.data import DataSplits, split_tensors
from keiryo.errors import ArtifactError, ConfigError, ModelError, TrustError, check_bytes, one_line

HF_PREFIX = "hf:"
TASKS = ("embedding", "classifier")
POOLINGS = ("mean", "cls", "max")
MAX_JSON_BYTES = 64 << 20  # a config or tokenizer config; real ones are kilobytes
MAX_HEADER_BYTES = 100 << 20  # a safetensors header (the format's own limit)
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}  # fmt: skip


def is_hf_spec(spec: object) -> bool:
    """Whether a model spec names a Hugging Face directory ("hf:PATH")."""
    return isinstance(spec, str) and spec.startswith(HF_PREFIX)


def hf_factory(spec: str) -> tuple[str, Any]:
    """(the spec to record, with the path made absolute; the factory) for `build_model("hf:PATH")`."""
    directory = model_dir(spec[len(HF_PREFIX) :])
    return f"{HF_PREFIX}{directory}", functools.partial(load_hf, str(directory))


def model_dir(path: str | os.PathLike) -> Path:
    """The absolute model directory, checked to hold a config.json."""
    directory = Path(path).expanduser().resolve()
    if not str(path).strip():
        raise ModelError("model 'hf:' needs a directory: use hf:PATH (a folder with config.json)")
    if not directory.is_dir():
        raise ModelError(f"Hugging Face model directory '{directory}' does not exist")
    if not (directory / "config.json").is_file():
        raise ModelError(f"'{directory}' has no config.json, so it is not a Hugging Face model directory")
    return directory


def read_json(path: Path, what: str) -> Any:
    """A JSON file of a model folder, or one ArtifactError naming it (too big, unreadable, not JSON)."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise ArtifactError(f"{what} '{path}' is {size} bytes, too big for a JSON config")
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"{what} '{path}' is not valid JSON: {one_line(exc)}") from exc


def check_no_remote_code(directory: Path) -> dict:
    """The folder's config.json, after refusing a folder that asks transformers to run its own Python."""
    config = read_json(directory / "config.json", "Hugging Face config")
    if not isinstance(config, dict):
        raise ArtifactError(f"Hugging Face config '{directory / 'config.json'}' is not a JSON object")
    for name in ("config.json", "tokenizer_config.json"):
        data = config if name == "config.json" else _optional_json(directory / name)
        if isinstance(data, dict) and "auto_map" in data:
            raise TrustError(
                f"Hugging Face folder '{directory}' asks to run its own Python code (auto_map in {name}); "
                "keiryo never runs a folder's code, not even with --trust-code: use a model that "
                "transformers ships (e.g. BERT), or load it yourself and pass the torch.nn.Module"
            )
    return config


def _optional_json(path: Path) -> Any:
    return read_json(path, "Hugging Face file") if path.is_file() else None


def check_weights(directory: Path) -> None:
    """Refuse weight files that are broken, hold pickled Python objects, or unpack beyond the limit."""
    safetensors = sorted(directory.glob("*.safetensors"))
    check_bytes(sum(_safetensors_bytes(path) for path in safetensors), f"the weights in '{directory}'")
    if safetensors:
        return  # transformers prefers them; .bin files beside them are not read
    from keiryo.fileio import safe_torch_load

    for path in sorted(directory.glob("pytorch_model*.bin")):
        check_bytes(path.stat().st_size, f"weights '{path}'")
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not a zip checkpoint (legacy, or corrupt): torch.load says which
            safe_torch_load(path, what="weights")
            continue
        if unsafe:
            raise ArtifactError(
                f"weights '{path}' hold pickled Python objects ({', '.join(unsafe[:3])}), not just tensors; "
                "refusing to unpickle them: convert the folder to safetensors"
            )


def _safetensors_bytes(path: Path) -> int:
    """The bytes a safetensors file's tensors take, from its header, checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (length,) = struct.unpack("<Q", raw)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"its header claims {length} bytes, the file has {size}")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        data = size - 8 - length
        total = 0
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if (
                not all(isinstance(v, int) and v >= 0 for v in [*shape, start, end])
                or not start <= end <= data
            ):
                raise ValueError(f"tensor '{name}' lies outside the file")
            if dtype in DTYPE_BYTES and math.prod(shape) * DTYPE_BYTES[dtype] != end - start:
                raise ValueError(f"tensor '{name}' has {end - start} bytes for shape {shape} of {dtype}")
            total += end - start
        return total
    except (OSError, ValueError, KeyError, TypeError, struct.error, RecursionError) as exc:
        raise ArtifactError(f"weights '{path}' are not a valid safetensors file: {one_line(exc)}") from exc


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ModelError(
            "Hugging Face models need the transformers package: pip install 'keiryo[hf]'"
        ) from exc
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _no_init_weights():
    """transformers' context that skips weight initialisation (where it lives differs between versions)."""
    for where in ("transformers.initialization", "transformers.modeling_utils"):
        with contextlib.suppress(ImportError, AttributeError):
            return importlib.import_module(where).no_init_weights()
    return contextlib.nullcontext()


def _check_model_size(auto: Any, config: Any, directory: Path) -> None:
    """Size the model the config describes on the meta device (nothing allocated) and check the limit."""
    try:
        with torch.device("meta"), _no_init_weights():
            probe = auto.from_config(config, trust_remote_code=False)
    except Exception as exc:  # transformers reading a foreign config: any failure is the folder's
        raise ArtifactError(
            f"cannot build the model that '{directory}/config.json' describes: {one_line(exc)}"
        ) from exc
    nbytes = sum(t.numel() * t.element_size() for t in [*probe.parameters(), *probe.buffers()])
    check_bytes(nbytes, f"the model in '{directory}'")


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
        b, n, _ = hidden_states.shape
        head_dim = self.qkv.out_features // 3 // self.num_heads
        qkv = self.qkv(hidden_states).reshape(b, n, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.to(q.dtype)  # an additive mask (eager implementation)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return out.transpose(1, 2).reshape(b, n, self.num_heads * head_dim), None


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
        tokenizer = tokenizer_for(self.source)
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


@functools.lru_cache(maxsize=8)
def tokenizer_for(directory: str):
    """The tokenizer saved in a model directory (loaded once per process)."""
    path = Path(directory)
    names = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "spiece.model", "vocab.json")
    if not any((path / name).is_file() for name in names):
        raise ConfigError(f"'{path}' has no tokenizer; pass token ids (a (batch, 2, length) tensor) instead")
    check_no_remote_code(path)
    try:
        return _transformers().AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # the tokenizer library reading a user's files: any failure is the files'
        raise ArtifactError(f"cannot load the tokenizer in '{path}': {one_line(exc)}") from exc


def load_hf(
    path: str,
    task: str | None = None,
    layers: int | list[int] | None = None,
    intermediate_size: int | None = None,
    max_length: int = 128,
    pooling: str | None = None,
) -> HFModel:
    """The model in a local Hugging Face directory as an `HFModel`, offline, in eval mode.

    `task` "embedding" | "classifier" (default: classifier when the config names a *ForSequenceClassification
    architecture). `layers` keeps that many encoder layers, evenly spaced (or the listed indices), and
    `intermediate_size` keeps the feed-forward neurons of largest weight norm: the student of the same config.
    """
    directory = model_dir(path)
    check_no_remote_code(directory)  # before transformers sees the folder
    check_weights(directory)
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # transformers reading a user's config: any failure is the file's
        raise ArtifactError(f"cannot read '{directory / 'config.json'}': {one_line(exc)}") from exc
    archs = config.architectures or []
    task = task or (
        "classifier" if any(a.endswith("ForSequenceClassification") for a in archs) else "embedding"
    )
    if task not in TASKS:
        raise ConfigError(f"unknown task '{task}' for a Hugging Face model (choose {', '.join(TASKS)})")
    auto = transformers.AutoModelForSequenceClassification if task == "classifier" else transformers.AutoModel
    _check_model_size(auto, config, directory)
    try:
        model = auto.from_pretrained(
            str(directory),
            config=config,
            local_files_only=True,
            trust_remote_code=False,
            attn_implementation="sdpa",
        )
    except Exception as exc:  # transformers reading a user's weights: any failure is the files'
        raise ArtifactError(f"cannot load the model in '{directory}': {one_line(exc)}") from exc
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


def _sentence_transformers_head(directory: Path) -> tuple[str, bool]:
    """(pooling, normalize) from a sentence-transformers directory's files; ("mean", False) otherwise."""
    pooling, normalize = "mean", False
    options = _optional_json(directory / "1_Pooling" / "config.json")
    if isinstance(options, dict):
        pooling = next((p for p in ("cls", "max") if options.get(f"pooling_mode_{p}_token")), "mean")
    modules = _optional_json(directory / "modules.json")
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


# --- text data and quality ----------------------------------------------------------------------------------


def text_data(model: HFModel, texts: Sequence[str], *, seed: int = 0, batch_size: int = 64) -> DataSplits:
    """Splits of (token ids, the model's own outputs): data to distil or measure an embedding model on."""
    if not isinstance(model, HFModel):
        raise ConfigError(f"text_data needs an HFModel (build_model('hf:PATH')), got {type(model).__name__}")
    if len(texts) < 3:
        raise ConfigError(f"text_data needs at least 3 texts to split, got {len(texts)}")
    tokens = model.tokenize(texts)
    targets = model.encode(tokens, batch_size)
    train, val, test = split_tensors(tokens, targets, seed=seed, val_fraction=0.1, test_fraction=0.1)
    return DataSplits(train, val, test, None, tuple(tokens.shape[1:]), "texts")


SAMPLE_TEXTS = (
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
)
"""A few sentences to measure on when the user gives none."""


def read_texts(path: str | os.PathLike) -> list[str]:
    """The non-empty lines of a UTF-8 text file: one text each."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"text file '{path}' does not exist")
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ConfigError(f"text file '{path}' has no lines of text")
    return texts


def write_text_data(model: HFModel, texts: Sequence[str], path: str | os.PathLike) -> Path:
    """Save {"inputs": token ids, "targets": the model's outputs}: a data file that `--data` reads."""
    from keiryo.fileio import atomic_torch_save

    tokens = model.tokenize(texts)
    atomic_torch_save({"inputs": tokens, "targets": model.encode(tokens)}, path)
    return Path(path)


@dataclass
class EmbeddingQuality:
    """How closely a model's sentence embeddings follow a reference model's on the same sentences."""

    cosine_mean: float  # mean cosine similarity of each sentence's two embeddings
    cosine_min: float
    top1_agreement: float  # fraction of sentences whose nearest neighbour (in the set) is the same
    top5_overlap: float  # mean share of the k nearest neighbours the two models have in common
    sentences: int


def embedding_quality(
    model: nn.Module, reference: nn.Module, inputs: Tensor | Sequence[str], *, k: int = 5
) -> EmbeddingQuality:
    """Cosine to the reference's embeddings and agreement of nearest-neighbour retrieval among `inputs`."""
    if isinstance(inputs, (list, tuple)):
        tokenizer_model = reference if isinstance(reference, HFModel) else model
        inputs = tokenizer_model.tokenize(inputs)
    mine, ref = _embed(model, inputs), _embed(reference, inputs)
    if mine.shape != ref.shape:
        raise ConfigError(f"embeddings differ in shape: {tuple(mine.shape)} vs reference {tuple(ref.shape)}")
    n = len(mine)
    if n <= k:
        raise ConfigError(f"nearest-neighbour agreement at k={k} needs more than {k} sentences, got {n}")
    cosine = F.cosine_similarity(mine, ref, dim=1, eps=1e-12)
    mine_nn, ref_nn = _neighbours(mine, k), _neighbours(ref, k)
    top1 = (mine_nn[:, 0] == ref_nn[:, 0]).float().mean()
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(mine_nn, ref_nn, strict=True))
    return EmbeddingQuality(
        cosine_mean=float(cosine.mean()),
        cosine_min=float(cosine.min()),
        top1_agreement=float(top1),
        top5_overlap=overlap / (n * k),
        sentences=n,
    )


def _embed(model: nn.Module, inputs: Tensor, batch_size: int = 64) -> Tensor:
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        out = torch.cat(
            [model(inputs[i : i + batch_size]).float() for i in range(0, len(inputs), batch_size)]
        )
    model.train(was_training)
    return out


def _neighbours(embeddings: Tensor, k: int) -> Tensor:
    """Indices of each row's k most cosine-similar other rows, nearest first."""
    unit = F.normalize(embeddings, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.topk(k, dim=1).indices
