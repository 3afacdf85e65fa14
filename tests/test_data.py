"""Tests for keiryo.data: built-in digits, users' files, seeded splits, loaders and one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset

from keiryo.data import (
    DataSplits,
    check_model_fits,
    digits,
    example_inputs,
    load_data,
    make_loader,
    probe_model,
    split_tensors,
    tensors_of,
)
from keiryo.datafiles import load_csv, load_image_folder, load_tensor_file
from keiryo.errors import ConfigError, DataError, KeiryoError, ModelError


@pytest.fixture(scope="module")
def digit_splits() -> DataSplits:
    return digits(seed=0)


def _all_inputs(splits: DataSplits) -> torch.Tensor:
    return torch.cat([tensors_of(d)[0] for d in (splits.train, splits.val, splits.test)])


def _row_keys(inputs: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in inputs}


def _data_error(call, *args, **kwargs) -> str:
    """Run `call`, expect a DataError, and check its message is one line."""
    with pytest.raises(DataError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message and message
    return message


# ---- digits and splits ------------------------------------------------------------------------------------


def test_digits_shapes_dtypes_and_sizes(digit_splits: DataSplits) -> None:
    s = digit_splits
    assert s.name == "digits" and s.num_classes == 10 and s.input_shape == (1, 8, 8)
    assert s.classes == [str(i) for i in range(10)]
    assert (len(s.train), len(s.val), len(s.test)) == (1257, 270, 270)
    x, y = tensors_of(s.train)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (1, 8, 8)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) == 1.0
    assert set(y.tolist()) == set(range(10))


def test_digits_split_is_stratified(digit_splits: DataSplits) -> None:
    _, y_train = tensors_of(digit_splits.train)
    _, y_test = tensors_of(digit_splits.test)
    test_share = torch.bincount(y_test, minlength=10).float() / torch.bincount(y_train, minlength=10)
    assert float(test_share.min()) > 0.18 and float(test_share.max()) < 0.25  # 15/70 = 0.214 everywhere


def test_same_seed_same_split_other_seed_other_split(digit_splits: DataSplits) -> None:
    again, other = digits(seed=0), digits(seed=1)
    for name in ("train", "val", "test"):
        assert torch.equal(tensors_of(getattr(again, name))[0], tensors_of(getattr(digit_splits, name))[0])
        assert torch.equal(tensors_of(getattr(again, name))[1], tensors_of(getattr(digit_splits, name))[1])
    assert not torch.equal(tensors_of(other.test)[0], tensors_of(digit_splits.test)[0])


def test_splits_are_disjoint_and_cover_everything() -> None:
    inputs = torch.arange(200, dtype=torch.float32).reshape(100, 2)
    targets = torch.arange(100) % 3
    train, val, test = split_tensors(inputs, targets, seed=5, val_fraction=0.2, test_fraction=0.1)
    ids = [set((d.tensors[0][:, 0] / 2).long().tolist()) for d in (train, val, test)]
    assert [len(i) for i in ids] == [70, 20, 10]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert ids[0] | ids[1] | ids[2] == set(range(100))
    for d in (train, val, test):  # each input keeps its own target
        assert torch.equal(d.tensors[1], (d.tensors[0][:, 0] / 2).long() % 3)


def test_digits_splits_cover_the_whole_set(digit_splits: DataSplits) -> None:
    from sklearn.datasets import load_digits

    everything = _all_inputs(digit_splits)
    assert len(everything) == 1797
    expected = torch.from_numpy(load_digits().images / 16.0).float().unsqueeze(1)
    assert _row_keys(everything) == _row_keys(expected)


def test_bad_fractions_raise_config_error() -> None:
    x, y = torch.randn(10, 2), torch.arange(10) % 2
    for val, test in [(0.5, 0.5), (-0.1, 0.1), (0.0, 1.0), (0.49, 0.49)]:
        with pytest.raises(ConfigError) as info:
            split_tensors(
                x[:2] if val == 0.49 else x, y[:2] if val == 0.49 else y, val_fraction=val, test_fraction=test
            )
        assert "\n" not in str(info.value)
    train, val_set, test_set = split_tensors(x, y, val_fraction=0.0, test_fraction=0.0)
    assert (len(train), len(val_set), len(test_set)) == (10, 0, 0)


# ---- other sources ----------------------------------------------------------------------------------------


def test_load_data_from_tensors_dataset_loader_and_splits() -> None:
    x, y = torch.randn(40, 3, dtype=torch.float64), torch.arange(40) % 4
    splits = load_data((x, y), seed=1)
    assert splits.num_classes == 4 and splits.input_shape == (3,) and splits.classes is None
    assert sum(len(d) for d in (splits.train, splits.val, splits.test)) == 40
    assert tensors_of(splits.train)[0].dtype == torch.float32
    from_loader = load_data(DataLoader(TensorDataset(x, y), batch_size=8), seed=1)
    assert torch.equal(tensors_of(from_loader.test)[0], tensors_of(splits.test)[0])
    assert load_data(splits) is splits
    assert load_data("digits", seed=3).num_classes == 10


class _Squares(Dataset):
    """A plain map-style dataset whose items are (tensor, int)."""

    def __len__(self) -> int:
        return 30

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((2, 2), float(i)), i % 3


def test_load_data_splits_a_plain_dataset_by_index() -> None:
    splits = load_data(_Squares(), val_fraction=0.2, test_fraction=0.2)
    assert splits.num_classes == 3 and splits.input_shape == (2, 2) and splits.name == "_Squares"
    assert [len(d) for d in (splits.train, splits.val, splits.test)] == [18, 6, 6]
    x, y = tensors_of(splits.train)
    assert torch.equal(y, x[:, 0, 0].long() % 3)
    seen = torch.cat([tensors_of(d)[0][:, 0, 0] for d in (splits.train, splits.val, splits.test)])
    assert sorted(seen.long().tolist()) == list(range(30))


def test_regression_targets_stay_float() -> None:
    x, y = torch.randn(20, 2), torch.randn(20)
    splits = load_data((x, y))
    assert splits.num_classes is None
    assert tensors_of(splits.train)[1].dtype == torch.float32


def test_example_inputs_repeats_rows_when_needed(digit_splits: DataSplits) -> None:
    batch = example_inputs(digit_splits, 16)
    assert batch.shape == (16, 1, 8, 8)
    assert torch.equal(batch, tensors_of(digit_splits.test)[0][:16])
    small = load_data(
        (torch.arange(10.0).reshape(10, 1), torch.arange(10) % 2), val_fraction=0.1, test_fraction=0.2
    )
    big = example_inputs(small, 5)
    test_x = tensors_of(small.test)[0]
    assert len(test_x) == 2 and torch.equal(big, test_x[[0, 1, 0, 1, 0]])


def test_unknown_sources_raise_data_error(tmp_path: Path) -> None:
    assert "'nope.npz' does not exist" in _data_error(load_data, "nope.npz")
    assert "digits" in _data_error(load_data, "digitz")
    (tmp_path / "a.txt").write_text("1,2\n")
    assert "a.txt" in _data_error(load_data, tmp_path / "a.txt")
    assert "int" in _data_error(load_data, 42)
    assert issubclass(DataError, KeiryoError)


# ---- npz and pt -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keys", [("x", "y"), ("X", "y"), ("inputs", "targets"), ("data", "labels"), ("features", "labels")]
)
def test_npz_round_trip(tmp_path: Path, keys: tuple[str, str]) -> None:
    x = np.random.default_rng(0).random((30, 4))
    y = np.arange(30) % 3
    path = tmp_path / "a.npz"
    np.savez(path, **{keys[0]: x, keys[1]: y})
    inputs, targets = load_tensor_file(path)
    assert inputs.dtype == torch.float32 and targets.dtype == torch.int64
    assert torch.allclose(inputs, torch.from_numpy(x).float()) and targets.tolist() == y.tolist()
    splits = load_data(path)
    assert splits.name == "a.npz" and splits.num_classes == 3 and splits.input_shape == (4,)


def test_npz_string_labels_become_classes(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    np.savez(path, x=np.arange(4.0).reshape(4, 1), y=np.array(["dog", "cat", "dog", "emu"]))
    splits = load_data(path, val_fraction=0.0, test_fraction=0.0)
    assert splits.classes == ["cat", "dog", "emu"] and splits.num_classes == 3
    x, y = tensors_of(splits.train)
    assert sorted(zip(x[:, 0].tolist(), y.tolist(), strict=True)) == [(0.0, 1), (1.0, 0), (2.0, 1), (3.0, 2)]


@pytest.mark.parametrize("form", ["dict", "tuple", "list"])
def test_pt_round_trip(tmp_path: Path, form: str) -> None:
    x, y = torch.randn(12, 1, 3, 3, dtype=torch.float64), torch.randn(12).double()
    path = tmp_path / "t.pt"
    content = {"inputs": x, "targets": y} if form == "dict" else (x, y) if form == "tuple" else [x, y]
    torch.save(content, path)
    inputs, targets = load_tensor_file(path)
    assert inputs.dtype == torch.float32 and targets.dtype == torch.float32
    assert torch.allclose(inputs, x.float()) and torch.allclose(targets, y.float())
    assert load_data(path).num_classes is None


def test_pth_integer_floats_are_classes(tmp_path: Path) -> None:
    path = tmp_path / "t.pth"
    torch.save({"x": torch.randn(6, 2), "y": torch.tensor([0.0, 1.0, 2.0, 1.0, 0.0, 2.0])}, path)
    _, targets = load_tensor_file(path)
    assert targets.dtype == torch.int64 and targets.tolist() == [0, 1, 2, 1, 0, 2]


def test_tensor_file_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", a=np.ones(3), b=np.ones(3))
    message = _data_error(load_tensor_file, tmp_path / "a.npz")
    assert "a.npz" in message and "no inputs array" in message and "found: a, b" in message
    np.savez(tmp_path / "b.npz", x=np.ones((3, 2)))
    assert "no targets array" in _data_error(load_tensor_file, tmp_path / "b.npz")
    torch.save({"x": torch.ones(100, 2), "y": torch.ones(90)}, tmp_path / "x.pt")
    assert (
        "x.pt'" in (m := _data_error(load_tensor_file, tmp_path / "x.pt"))
        and "100 inputs but 90 targets" in m
    )
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    assert "bad.npz' is not a valid .npz file" in _data_error(load_tensor_file, tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"\x00" * 64)
    assert "junk.npz' is not a valid .npz file" in _data_error(load_tensor_file, tmp_path / "junk.npz")
    (tmp_path / "bad.pt").write_bytes(b"not a torch file at all")
    assert "bad.pt' is not a valid .pt file" in _data_error(load_tensor_file, tmp_path / "bad.pt")
    assert "missing.pt' does not exist" in _data_error(load_tensor_file, tmp_path / "missing.pt")
    np.savez(tmp_path / "c.npz", x=np.array(["a", "b"]), y=np.array([0, 1]))
    assert "c.npz': inputs are not numbers" in _data_error(load_tensor_file, tmp_path / "c.npz")
    torch.save(torch.ones(3), tmp_path / "one.pt")
    assert "one.pt': expected a dict" in _data_error(load_tensor_file, tmp_path / "one.pt")


class _Evil:
    """An object that would run code if unpickled."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pt_with_pickled_objects_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.save({"x": torch.ones(2, 2), "y": _Evil()}, tmp_path / "evil.pt")
    message = _data_error(load_tensor_file, tmp_path / "evil.pt")
    assert "evil.pt' holds a pickled 'print' (refused" in message
    assert "unpickled!" not in capsys.readouterr().out


# ---- csv --------------------------------------------------------------------------------------------------


def test_csv_numeric_labels(tmp_path: Path) -> None:
    path = tmp_path / "n.csv"
    path.write_text("f1,f2,label\n1,2,0\n3.5,4,1\n\n5,6,2\n")
    inputs, targets, classes = load_csv(path)
    assert inputs.dtype == torch.float32 and inputs.tolist() == [[1, 2], [3.5, 4], [5, 6]]
    assert targets.dtype == torch.int64 and targets.tolist() == [0, 1, 2] and classes is None


def test_csv_label_column_choice(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("Target,a,b\n1,10,20\n0,30,40\n")
    inputs, targets, _ = load_csv(path)
    assert inputs.tolist() == [[10, 20], [30, 40]] and targets.tolist() == [1, 0]
    inputs, targets, _ = load_csv(path, label_column="b")
    assert inputs.tolist() == [[1, 10], [0, 30]] and targets.tolist() == [20, 40]
    last = tmp_path / "last.csv"
    last.write_text("a,b,kind\n1,2,7\n")
    assert load_csv(last)[1].tolist() == [7]


def test_csv_string_labels_and_regression(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text("x,y\n1,cat\n2,dog\n3,cat\n4, ant\n")
    _, targets, classes = load_csv(path)
    assert classes == ["ant", "cat", "dog"] and targets.tolist() == [1, 2, 1, 0]
    splits = load_data(path, val_fraction=0.25, test_fraction=0.0)
    assert splits.classes == ["ant", "cat", "dog"] and splits.num_classes == 3 and splits.name == "s.csv"
    reg = tmp_path / "r.csv"
    reg.write_text("a,b,target\n1,2,0.5\n3,4,1.25\n")
    _, targets, classes = load_csv(reg)
    assert targets.dtype == torch.float32 and targets.tolist() == [0.5, 1.25] and classes is None
    assert load_data(reg, val_fraction=0.0, test_fraction=0.0).num_classes is None


def test_csv_errors(tmp_path: Path) -> None:
    bad = tmp_path / "a.csv"
    bad.write_text("f1,f2,label\n" + "1,2,0\n" * 5 + "1,abc,0\n")
    message = _data_error(load_csv, bad)
    assert message.endswith("a.csv' line 7: column 'f2' is not a number ('abc')")
    (tmp_path / "empty.csv").write_text("")
    assert "empty.csv' is empty" in _data_error(load_csv, tmp_path / "empty.csv")
    (tmp_path / "head.csv").write_text("a,label\n")
    assert "head.csv' has a header but no data rows" in _data_error(load_csv, tmp_path / "head.csv")
    (tmp_path / "ragged.csv").write_text("a,b,label\n1,2,3\n1,2\n")
    assert "ragged.csv' line 3: expected 3 values, found 2" in _data_error(load_csv, tmp_path / "ragged.csv")
    (tmp_path / "col.csv").write_text("a,b\n1,2\n")
    assert "col.csv': no column 'zz'" in _data_error(load_csv, tmp_path / "col.csv", label_column="zz")
    (tmp_path / "one.csv").write_text("label\n1\n")
    assert "one.csv'" in _data_error(load_csv, tmp_path / "one.csv")
    (tmp_path / "bin.csv").write_bytes(b"a,b\n\xff\xfe\x00,1\n")
    assert "bin.csv' is not a valid .csv file" in _data_error(load_csv, tmp_path / "bin.csv")
    assert "gone.csv' does not exist" in _data_error(load_data, tmp_path / "gone.csv")


# ---- image folders ----------------------------------------------------------------------------------------


def _write_images(root: Path, mode: str, size: tuple[int, int] = (4, 3)) -> None:
    for name, value in (("cat", 0), ("dog", 255)):
        (root / name).mkdir(parents=True)
        for i in range(3):
            color = value if mode == "L" else (value, 128, i * 10)
            Image.new(mode, size, color).save(root / name / f"{i}.png")


def test_image_folder_grayscale(tmp_path: Path) -> None:
    _write_images(tmp_path / "imgs", "L")
    inputs, targets, classes = load_image_folder(tmp_path / "imgs")
    assert classes == ["cat", "dog"] and targets.tolist() == [0, 0, 0, 1, 1, 1]
    assert inputs.shape == (6, 1, 3, 4) and inputs.dtype == torch.float32  # PIL size is (width, height)
    assert float(inputs[:3].max()) == 0.0 and float(inputs[3:].min()) == 1.0
    splits = load_data(tmp_path / "imgs", val_fraction=0.0, test_fraction=0.34)
    assert splits.classes == ["cat", "dog"] and splits.num_classes == 2 and splits.input_shape == (1, 3, 4)
    assert splits.name == "imgs" and sorted(tensors_of(splits.test)[1].tolist()) == [0, 1]


def test_image_folder_rgb_and_mixed_modes_and_resize(tmp_path: Path) -> None:
    _write_images(tmp_path / "rgb", "RGB")
    inputs, _, _ = load_image_folder(tmp_path / "rgb")
    assert inputs.shape == (6, 3, 3, 4)
    assert torch.allclose(inputs[4, :, 0, 0], torch.tensor([1.0, 128 / 255, 10 / 255]))
    Image.new("L", (4, 3), 51).save(tmp_path / "rgb" / "cat" / "gray.png")  # one gray image among colour
    inputs, _, _ = load_image_folder(tmp_path / "rgb", image_size=(5, 2))
    assert inputs.shape == (7, 3, 5, 2)
    assert torch.allclose(inputs[3, :, 2, 1], torch.full((3,), 0.2))  # cat/gray.png sorts after cat/2.png


def test_image_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    Image.new("L", (2, 2)).save(tmp_path / "flat" / "a.png")
    assert "'" + str(tmp_path / "flat") + "': no class sub-folders" in _data_error(
        load_image_folder, tmp_path / "flat"
    )
    _write_images(tmp_path / "bad", "L")
    (tmp_path / "bad" / "dog" / "broken.png").write_bytes(b"not really a png")
    assert "cannot read image 'dog/broken.png'" in _data_error(load_image_folder, tmp_path / "bad")
    _write_images(tmp_path / "sizes", "L")
    Image.new("L", (5, 5)).save(tmp_path / "sizes" / "dog" / "big.png")
    message = _data_error(load_image_folder, tmp_path / "sizes")
    assert "sizes'" in message and "dog/big.png" in message and "image_size" in message
    assert load_image_folder(tmp_path / "sizes", image_size=(3, 4))[0].shape == (7, 1, 3, 4)
    assert load_data(tmp_path / "sizes", image_size=(2, 2)).input_shape == (1, 2, 2)
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    assert "class folder 'cat' has no" in _data_error(load_image_folder, tmp_path / "noimg")
    assert "does not exist" in _data_error(load_image_folder, tmp_path / "absent")


# ---- loaders ----------------------------------------------------------------------------------------------


def _order(loader: DataLoader) -> list[int]:
    return [int(v) for batch in loader for v in batch[0][:, 0]]


def test_make_loader_order_depends_only_on_seed_and_epoch() -> None:
    data = TensorDataset(torch.arange(50.0).reshape(50, 1), torch.zeros(50, dtype=torch.long))
    first = _order(make_loader(data, 8, shuffle=True, seed=1, epoch=3))
    assert first == _order(make_loader(data, 8, shuffle=True, seed=1, epoch=3))
    assert first != _order(make_loader(data, 8, shuffle=True, seed=1, epoch=4))
    assert first != _order(make_loader(data, 8, shuffle=True, seed=2, epoch=3))
    assert sorted(first) == list(range(50))
    assert _order(make_loader(data, 8)) == list(range(50))
    loader = make_loader(data, 8, drop_last=True)
    assert len(loader) == 6 and loader.num_workers == 0
    with pytest.raises(ConfigError):
        make_loader(data, 0)


class _TwoInputs(torch.nn.Module):
    """A model of two inputs (token ids and a mask, as Hugging Face encoders take) with 3 classes."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).float()
        return {"logits": self.head((self.embed(input_ids) * mask).sum(1) / mask.sum(1))}


def _dict_samples(n: int = 40) -> list[dict]:
    torch.manual_seed(0)
    return [
        {"input_ids": torch.randint(0, 20, (6,)), "attention_mask": torch.ones(6, dtype=torch.long),
         "labels": torch.tensor(i % 3)}
        for i in range(n)
    ]  # fmt: skip


def test_a_loader_of_dicts_with_labels_splits_and_loads_like_tensors():
    """Hugging Face datasets yield dicts; `labels` is the target, the rest are the model's keyword inputs."""
    samples = _dict_samples()
    splits = load_data(DataLoader(samples, batch_size=8), seed=0)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 40 and splits.num_classes == 3
    assert splits.input_shape == (6,)
    batch = example_inputs(splits, 5)
    assert set(batch) == {"input_ids", "attention_mask"} and batch["input_ids"].shape == (5, 6)
    inputs, targets = tensors_of(splits.train)
    assert inputs["input_ids"].shape == (len(splits.train), 6) and targets.dtype == torch.int64
    assert set(next(iter(make_loader(splits.train, 4)))) == {"input_ids", "attention_mask", "labels"}
    assert load_data(samples, seed=0).num_classes == 3  # a plain list of dict samples too
    check_model_fits(_TwoInputs(), splits)
    as_lists = [{**s, "input_ids": s["input_ids"].tolist(), "labels": int(s["labels"])} for s in samples]
    listed = load_data(as_lists, seed=0)  # Hugging Face datasets without set_format("torch") give lists
    assert listed.input_shape == (6,) and example_inputs(listed, 3)["input_ids"].shape == (3, 6)
    assert tensors_of(listed.train)[0]["input_ids"].dtype == torch.int64
    assert next(iter(make_loader(listed.train, 4)))["input_ids"].shape == (4, 6)
    check_model_fits(_TwoInputs(), listed)
    unlabelled = [{k: v for k, v in s.items() if k != "labels"} for s in samples]
    assert "no targets" in _data_error(load_data, unlabelled)


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_a_pair_whose_inputs_are_a_tuple_or_dict_of_tensors(form):
    ids, mask = torch.randint(0, 20, (30, 5)), torch.ones(30, 5, dtype=torch.long)
    labels = torch.arange(30) % 3
    given = (ids, mask) if form == "tuple" else {"input_ids": ids, "attention_mask": mask}
    splits = load_data((given, labels), seed=1)
    assert sum(len(d) for d in (splits.train, splits.val, splits.test)) == 30
    inputs, targets = tensors_of(splits.test)
    rows = [
        int(torch.nonzero((ids == r).all(1))[0])
        for r in (inputs[0] if form == "tuple" else inputs["input_ids"])
    ]
    assert torch.equal(labels[rows], targets)  # each sample keeps its own label
    x, y = next(iter(make_loader(splits.train, 4)))
    assert len(x) == 2 if form == "tuple" else set(x) == {"input_ids", "attention_mask"}
    assert len(y) == 4
    batch = example_inputs(splits, 7)
    assert (batch[0] if form == "tuple" else batch["input_ids"]).shape == (7, 5)
    check_model_fits(_TwoInputs(), splits)
    two_classes = _TwoInputs()
    two_classes.head = torch.nn.Linear(4, 2)
    with pytest.raises(DataError, match=r"class labels 0\.\.2 but the model has 2"):
        check_model_fits(two_classes, splits)
    assert "differ in their number of samples" in _data_error(load_data, ((ids, mask[:10]), labels))


def test_probe_model_takes_any_example_and_names_a_misfit():
    model = _TwoInputs()
    ids = torch.randint(0, 20, (3, 5))
    out = probe_model(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "x")
    assert out.shape == (1, 3)
    with pytest.raises(ModelError, match="input_ids") as info:
        probe_model(
            model, {"input_ids": ids, "attention_mask": torch.ones(3, 4, dtype=torch.long)}, "data 'x'"
        )
    assert "\n" not in str(info.value)
