"""Text for Hugging Face models: texts as a model's example inputs (any text model from hf:PATH), data to
distil or measure an encoder on (token ids and the model's own outputs), text files, and how closely one
model's sentence embeddings follow another's (cosine, nearest-neighbour agreement).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keiryo import hf_files
from keiryo.data import DataSplits, split_tensors
from keiryo.errors import ConfigError, ModelError
from keiryo.fileio import atomic_torch_save
from keiryo.hf import HFModel
from keiryo.inputs import Example


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


def text_example(model: nn.Module, texts: Sequence[str], max_length: int = 128) -> Example:
    """The texts as the model's example inputs: an HFModel's (N, 2, L) token ids, or for a raw transformers
    text model (a causal LM, a base encoder) {"input_ids", "attention_mask"} from its folder's tokenizer."""
    if isinstance(model, HFModel):
        return model.tokenize(texts)
    where = str(getattr(model, "name_or_path", "") or "")
    folder = Path(where)
    text_model = getattr(model, "main_input_name", None) == "input_ids"
    if not where or not text_model or not (folder / "config.json").is_file():
        raise ModelError(
            f"cannot turn texts into inputs for a {type(model).__name__}: it is not a text model loaded from "
            "a Hugging Face folder (hf:PATH); pass its example inputs (e.g. (input_ids, attention_mask))"
        )
    tokenizer = hf_files.tokenizer_for(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # decoders (GPT-2, Llama) ship without one
    encoded = tokenizer(
        list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def write_text_data(model: nn.Module, texts: Sequence[str], path: str | os.PathLike) -> Path:
    """Save {"inputs": token ids, "targets": the model's outputs}: a data file that `--data` reads. Only text
    encoders (HFModel) have one output per text to learn from; other models are refused in one line."""
    if not isinstance(model, HFModel):
        raise ModelError(
            f"a text data file holds one embedding or class score per text, which a {type(model).__name__} "
            "does not give: write one for text encoders (hf:PATH of a BERT-style model), or measure this "
            "model on its example inputs (keiryo.hf_text.text_example)"
        )
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
