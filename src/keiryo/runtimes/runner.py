"""A program of another runtime (ONNX Runtime, OpenVINO, ExecuTorch) as an `nn.Module` that keiryo measures
like any model: it takes the model's inputs (a Tensor, positional arguments or keyword arguments, see
`keiryo.inputs`) and returns torch tensors shaped as the model's main output.

Every runtime is handed the model through one flat form, `Flat`: the example's tensors as positional inputs
in a fixed order, one output (the main one). `Signature` records that order and the output's form, and is
what the artifact's JSON sidecar holds, so a loaded artifact takes the same calls without the model's code.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from keiryo import inputs
from keiryo.errors import ArtifactError, ConfigError, check_bytes
from keiryo.fileio import atomic_write_bytes
from keiryo.inputs import Example

SIDECAR_FORMAT = "keiryo-runtime"
SIDECAR_VERSION = 1


@dataclass(frozen=True)
class InputSpec:
    """One tensor the program takes: its name, where the model's call passes it, its dtype and rank."""

    name: str
    position: int | None  # index among the positional arguments, None for a keyword argument
    dtype: str
    rank: int
    batched: bool  # whether its first dimension is the batch


@dataclass(frozen=True)
class Signature:
    """How a model's call maps onto the program's flat inputs, and how its one output is handed back."""

    inputs: tuple[InputSpec, ...]
    output: str  # "output" (a Tensor), "output[i]" (from a sequence) or the key of a dict/ModelOutput
    output_is_dict: bool

    @cached_property
    def _plan(self) -> tuple[tuple[int | None, str, torch.dtype, int], ...]:
        """(position, name, dtype, rank) of each input: what `flatten` reads on every call."""
        return tuple((s.position, s.name, getattr(torch, s.dtype), s.rank) for s in self.inputs)

    @cached_property
    def batch_index(self) -> int | None:
        """The index of the first batched input among the flat ones (None: no input is batched)."""
        return next((i for i, s in enumerate(self.inputs) if s.batched), None)

    def flatten(self, args: tuple, kwargs: dict) -> list[Tensor]:
        """The call's tensors in the program's order, cast to the dtypes it was built with (on the hot path
        of every call, ~1 µs: nothing is copied or converted that is already as it must be)."""
        flat = []
        for position, name, dtype, rank in self._plan:
            if position is not None and position < len(args):
                value = args[position]
            else:
                value = kwargs.get(name)
            if not isinstance(value, Tensor):
                raise ConfigError(
                    f"this runtime program takes '{name}' as a tensor ({self.describe()}); "
                    f"got {type(value).__name__}"
                )
            if value.dim() != rank:
                raise ConfigError(
                    f"'{name}' has {value.dim()} dimensions; the program takes {rank} ({self.describe()})"
                )
            if value.dtype is not dtype:  # dtypes are singletons
                value = value.to(dtype)
            if value.requires_grad:
                value = value.detach()
            if not value.is_cpu or not value.is_contiguous():
                value = value.cpu().contiguous()
            flat.append(value)
        return flat

    def wrap(self, output: Tensor) -> Tensor | dict[str, Tensor]:
        """The output in the model's form: a dict keyed by its name when the model returned a dict."""
        return {self.output: output} if self.output_is_dict else output

    def describe(self) -> str:
        return ", ".join(f"{s.name} {s.dtype} rank {s.rank}" for s in self.inputs)

    def to_json(self) -> dict:
        return {**asdict(self), "inputs": [asdict(s) for s in self.inputs]}

    @classmethod
    def from_json(cls, data: dict) -> Signature:
        specs = tuple(InputSpec(**s) for s in data["inputs"])
        return cls(specs, str(data["output"]), bool(data["output_is_dict"]))


class Flat(nn.Module):
    """The model called with its example's tensors as flat positional inputs, returning its main output:
    the one form every runtime converts (other example values are held as constants)."""

    def __init__(self, model: nn.Module, example: Example) -> None:
        super().__init__()
        self.model = model
        self.args, self.kwargs = inputs.args_kwargs(example)
        self.slots = [("arg", i) for i, v in enumerate(self.args) if isinstance(v, Tensor)]
        self.slots += [("kwarg", k) for k, v in self.kwargs.items() if isinstance(v, Tensor)]

    def forward(self, *tensors: Tensor) -> Tensor:
        args, kwargs = list(self.args), dict(self.kwargs)
        for (kind, key), value in zip(self.slots, tensors, strict=True):
            if kind == "arg":
                args[key] = value
            else:
                kwargs[key] = value
        return inputs.main_output(self.model(*args, **kwargs))

    def example(self, example: Example) -> tuple[Tensor, ...]:
        """An example of the same form as the flat inputs, in their order."""
        args, kwargs = inputs.args_kwargs(example)
        return tuple(args[key] if kind == "arg" else kwargs[key] for kind, key in self.slots)


@dataclass(frozen=True)
class Conversion:
    """What each runtime's `build` converts: the flat model, its example in flat form (a batch of 2), their
    signature, the precision asked for, static int8's calibration samples (flat, one sample each) and the
    thread count."""

    flat: Flat
    example: tuple[Tensor, ...]
    sig: Signature
    precision: str
    calibration: list[tuple[Tensor, ...]]
    threads: int


def signature(model: nn.Module, example: Example) -> Signature:
    """The flat inputs of `model` called on `example` (named after its forward's arguments) and its output."""
    flat = Flat(model, example)
    n = inputs.batch_size(example)
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        params = []
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    specs = []
    for (kind, key), tensor in zip(flat.slots, flat.example(example), strict=True):
        if kind == "kwarg":
            name, position = str(key), None
        else:
            name, position = (positional[key] if key < len(positional) else f"input_{key}"), key
        batched = tensor.dim() > 0 and tensor.shape[0] == n
        dtype = str(tensor.dtype).removeprefix("torch.")
        specs.append(InputSpec(name, position, dtype, tensor.dim(), batched))
    with torch.inference_mode():
        output = inputs.call(model.eval(), example)
    name = inputs.output_name(output)
    return Signature(tuple(specs), name, isinstance(output, Mapping))


def dynamic_shapes(sig: Signature, max_batch: int | None = None) -> tuple:
    """`torch.export` dynamic shapes for `Flat`'s varargs: the first dimension of each batched input."""
    batch = torch.export.Dim("batch", min=1, max=max_batch or 1 << 16)
    return (tuple({0: batch} if s.batched else None for s in sig.inputs),)


class Program(Protocol):
    """What a runtime hands a Runner: runs flat inputs, and gives its artifact's files (suffix -> bytes)."""

    suffix: str  # the artifact's file suffix: ".onnx", ".xml", ".pte"
    max_batch: int | None  # the largest batch one run takes (None: any); larger calls run in chunks

    def run(self, flat: list[Tensor]) -> Tensor: ...

    def artifact(self) -> dict[str, bytes]: ...  # the main file's suffix first: {".xml": ..., ".bin": ...}


class Runner(nn.Module):
    """A runtime's program as a keiryo model (see the module docstring). `runtime` and `precision` say what
    runs it; `save(path)` writes the artifact and its JSON sidecar; `file_bytes()` is the artifact's size."""

    def __init__(self, program: Program, sig: Signature, runtime: str, precision: str) -> None:
        super().__init__()
        self.program, self.signature = program, sig
        self.runtime, self.precision = runtime, precision

    def forward(self, *args: object, **kwargs: object) -> Tensor | dict[str, Tensor]:
        sig = self.signature
        flat = sig.flatten(args, kwargs)
        step, index = self.program.max_batch, sig.batch_index
        if not step or index is None or (n := flat[index].shape[0]) <= step:
            return sig.wrap(self.program.run(flat))
        batched = [s.batched for s in sig.inputs]
        chunks = []
        for start in range(0, n, step):
            part = [t[start : start + step] if b else t for t, b in zip(flat, batched, strict=True)]
            chunks.append(self.program.run(part))
        return sig.wrap(torch.cat(chunks))

    @property
    def suffix(self) -> str:
        """The artifact's file suffix: ".onnx", ".xml" (OpenVINO IR, with a .bin beside it) or ".pte"."""
        return self.program.suffix

    def file_bytes(self) -> int:
        """Bytes of the artifact on disk (all its files; not the small sidecar)."""
        return sum(len(data) for data in self.program.artifact().values())

    def save(self, path: str | Path) -> Path:
        """Write the artifact at `path` (its suffix is the runtime's: .onnx, .xml + .bin, .pte) and
        `<path>.json` beside it, each file atomically (`fileio.atomic_write_bytes`), the sidecar last."""
        path = Path(path)
        if path.suffix != self.program.suffix:
            raise ConfigError(f"a {self.runtime} artifact is a {self.program.suffix} file; got '{path.name}'")
        if path.is_dir():
            raise ConfigError(f"'{path}' is a folder; give a file path such as {path / 'model'}{self.suffix}")
        meta = {
            "format": SIDECAR_FORMAT,
            "version": SIDECAR_VERSION,
            "runtime": self.runtime,
            "precision": self.precision,
            "artifact": path.name,
            "signature": self.signature.to_json(),
        }
        files = {path.with_suffix(suffix): data for suffix, data in self.program.artifact().items()}
        for file, data in files.items():
            atomic_write_bytes(data, file)
        # the sidecar last: once it is there, the artifact is whole
        atomic_write_bytes(json.dumps(meta, indent=2).encode(), sidecar(path))
        return path

    def extra_repr(self) -> str:
        return f"runtime={self.runtime}, precision={self.precision}, inputs=({self.signature.describe()})"


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def read_sidecar(path: str | Path) -> tuple[Path, dict]:
    """The artifact path and its sidecar's contents, from either file's path; one-line ArtifactError when
    either is missing or the sidecar is not keiryo's."""
    path = Path(path)
    if path.suffix == ".json":
        meta_path, artifact = path, path.with_suffix("")
    else:
        meta_path, artifact = sidecar(path), path
    for file in (artifact, meta_path):
        if not file.is_file():
            raise ArtifactError(f"runtime artifact '{file}' does not exist (save writes it and a .json)")
    check_bytes(meta_path.stat().st_size, f"runtime sidecar '{meta_path}'")
    try:
        meta = json.loads(meta_path.read_text())
        ok = isinstance(meta, dict) and meta.get("format") == SIDECAR_FORMAT
        sig = Signature.from_json(meta["signature"]) if ok else None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise ArtifactError(f"'{meta_path}' is not a keiryo runtime sidecar (or it is corrupt)")
    if meta.get("version") != SIDECAR_VERSION:
        version = meta.get("version")
        raise ArtifactError(f"'{meta_path}' is version {version}; this keiryo reads {SIDECAR_VERSION}")
    meta["signature"] = sig
    return artifact, meta
