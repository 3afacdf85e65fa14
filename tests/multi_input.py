"""A Hugging Face-shaped model and data set for the measurement tests, with no download: ids and a mask in,
a dict of outputs out; samples as dicts with a `labels` key."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset


class TwoInputs(nn.Module):
    """ids and a mask in, a dict with `last_hidden_state` and `logits` out (as a Hugging Face classifier)."""

    def __init__(self, vocab: int = 20, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, classes)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return {"last_hidden_state": h, "logits": self.head(h.mean(1))}


class DictSamples(Dataset):
    """Samples as Hugging Face datasets give them: dicts of ids (python lists), a mask and an int label."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {
            "input_ids": self.ids[i].tolist(),
            "attention_mask": torch.ones(self.ids.shape[1]),
            "labels": int(self.labels[i]),
        }


def tiny_bert(vocab: int, hidden: int, layers: int, heads: int, positions: int, seed: int = 0) -> nn.Module:
    """A raw transformers `BertModel` from a small config (random weights, no download), seeded, in eval
    mode; the feed-forward is twice the width."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * hidden, max_position_embeddings=positions,
    )  # fmt: skip
    return transformers.BertModel(config).eval()
