"""The example-input convention: a Tensor, a tuple of positional arguments or a dict of keyword arguments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from keiryo import inputs
from keiryo.errors import ConfigError


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return {"last_hidden_state": h, "logits": h.sum(-1)}


def test_call_passes_tensor_tuple_and_dict_the_way_pytorch_does() -> None:
    model = TwoInputs()
    ids = torch.randint(0, 10, (3, 5))
    mask = torch.ones(3, 5)
    mask[:, -1] = 0
    by_tuple = inputs.call(model, (ids, mask))
    by_dict = inputs.call(model, {"input_ids": ids, "attention_mask": mask})
    torch.testing.assert_close(by_tuple["logits"], by_dict["logits"])
    assert not torch.equal(inputs.call(model, ids)["logits"], by_tuple["logits"])  # the mask was used
    assert inputs.output_name(by_dict) == "logits"
    assert inputs.forward(model, (ids, mask)).shape == (3, 5)


def test_batch_helpers_slice_every_batch_first_tensor() -> None:
    example = {
        "input_ids": torch.arange(12).view(4, 3),
        "attention_mask": torch.ones(4, 3),
        "scale": torch.tensor(2.0),
    }
    assert inputs.batch_size(example) == 4
    part = inputs.take(example, 1, 3)
    assert part["input_ids"].tolist() == [[3, 4, 5], [6, 7, 8]] and part["scale"].item() == 2.0
    grown = inputs.resize_batch((torch.arange(3).float(),), 7)
    assert grown[0].tolist() == [0, 1, 2, 0, 1, 2, 0]
    joined = inputs.concat([inputs.take(example, 0, 2), inputs.take(example, 2)])
    assert torch.equal(joined["input_ids"], example["input_ids"])
    moved = inputs.to_device(example, "cpu", torch.float16)
    assert moved["input_ids"].dtype == torch.int64 and moved["attention_mask"].dtype == torch.float16


def test_outputs_name_the_field_they_compare() -> None:
    x = torch.randn(2, 3)
    assert inputs.output_name(x) == "output"
    assert inputs.output_name((None, x)) == "output[1]"
    assert inputs.main_output((None, x)) is x
    assert inputs.output_name({"hidden": x}) == "hidden"
    with pytest.raises(Exception, match="holds no tensor"):
        inputs.output_name({"n": 3})


def test_split_batch_reads_pairs_and_hugging_face_dicts() -> None:
    x, y = torch.randn(4, 2), torch.arange(4)
    assert inputs.split_batch((x, y))[1] is y
    features, labels = inputs.split_batch({"input_ids": x, "labels": y})
    assert labels is y and list(features) == ["input_ids"]
    assert inputs.split_batch(x) == (x, None)


def test_bad_examples_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="pass a Tensor"):
        inputs.check_example("nope")
    with pytest.raises(ConfigError, match="holds no tensor"):
        inputs.check_example((1, 2))
    assert "input_ids (2, 3) int64" in inputs.describe({"input_ids": torch.zeros(2, 3, dtype=torch.long)})
