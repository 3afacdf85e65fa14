"""Hidden-feature distillation (FitNets): named student layers learn to match named teacher layers.

Forward hooks ("taps") keep the outputs of the matched layers; a student's go through learned projections to
the teacher's shape. The student and its projections train together as one `Distillee` module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keiryo.errors import ConfigError


def feature_mse(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
    """Mean over the matched layer pairs of the MSE between (projected) student and teacher features."""
    terms = [F.mse_loss(s.float(), t.float()) for s, t in zip(student_feats, teacher_feats, strict=True)]
    return torch.stack(terms).mean()


def make_projection(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module:
    """A learned map from a student feature to the teacher's shape (FitNets' regressor); identity if equal.

    Shapes include the batch dimension (that of one probe batch, the same for both).
    Images of the same size get a 1x1 conv, vectors and token sequences a Linear on the last dimension,
    anything else is flattened, mapped by a Linear and reshaped to the teacher's feature shape.
    """
    s, t = tuple(student_shape), tuple(teacher_shape)
    if s[1:] == t[1:]:
        return nn.Identity()
    if len(s) == len(t) == 4 and s[2:] == t[2:]:
        return nn.Conv2d(s[1], t[1], kernel_size=1, bias=False)
    if len(s) == len(t) and s[1:-1] == t[1:-1]:
        return nn.Linear(s[-1], t[-1])
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(s[1:]), math.prod(t[1:])), nn.Unflatten(1, t[1:]))


def feature_pairs(features: dict[str, str] | Sequence[str] | None) -> list[tuple[str, str]]:
    """(student layer, teacher layer) name pairs from a {student: teacher} dict or a list of shared names."""
    if features is None:
        return []
    if isinstance(features, str):
        return [(features, features)]
    if isinstance(features, dict):
        pairs = list(features.items())
    else:
        pairs = [(name, name) for name in features]
    if not pairs or not all(isinstance(s, str) and isinstance(t, str) for s, t in pairs):
        raise ConfigError(f"features must be layer names or a {{student: teacher}} dict, got {features!r}")
    return pairs


class Taps:
    """Forward hooks that keep the outputs of named layers; a student's go through its projections first.

    Projecting inside the hook means the projection runs inside the student's forward, so anything that
    wraps the training module (compile, data parallel) sees the projection's parameters being used.
    """

    def __init__(self, model: nn.Module, names: list[str], role: str) -> None:
        self.names = names
        self.kept: dict[int, Tensor] = {}
        self.projections: list[nn.Module] | None = None  # set after the probe has measured the shapes
        self.handles = [
            _layer(model, name, role).register_forward_hook(_Keep(self, i, name, role))
            for i, name in enumerate(names)
        ]

    def clear(self) -> None:
        """Forget kept outputs (they hold autograd graphs, and must not travel when the taps are pickled)."""
        self.kept.clear()

    def remove(self) -> None:
        self.clear()
        for handle in self.handles:
            handle.remove()


class _Keep:
    """One forward hook (a class, so that it pickles with the model): keep the layer's output in the taps."""

    def __init__(self, taps: Taps, index: int, name: str, role: str) -> None:
        self.taps, self.index, self.name, self.role = taps, index, name, role

    def __call__(self, module: nn.Module, args: tuple, output: object) -> None:
        if not isinstance(output, Tensor):
            found = type(output).__name__
            raise ConfigError(
                f"{self.role} layer '{self.name}' returns a {found}, not a tensor; pick another"
            )
        projections = self.taps.projections
        self.taps.kept[self.index] = output if projections is None else projections[self.index](output)


def student_taps(model: nn.Module) -> Taps:
    """The student's taps, found through whatever wraps the training module (DDP, compile, a copy)."""
    for module in model.modules():
        if isinstance(module, Distillee):
            return module.taps
    raise ConfigError("hidden-feature distillation needs the model that distill() trains")


def _layer(model: nn.Module, name: str, role: str) -> nn.Module:
    layers = dict(model.named_modules())
    if name not in layers or not name:
        known = [n for n in layers if n]
        shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
        raise ConfigError(f"the {role} has no layer '{name}' (layers: {shown})")
    return layers[name]


class Distillee(nn.Module):
    """The student plus its feature projections, so that the training loop's optimizer updates both.

    Its forward is the student's; `distill` returns the bare student and drops the projections.
    """

    def __init__(self, student: nn.Module, projections: list[nn.Module], taps: Taps) -> None:
        super().__init__()
        self.student = student
        self.projections = nn.ModuleList(projections)
        self.taps = taps  # travels with the module, so a worker's copy keeps its own features
        taps.projections = list(self.projections)

    def forward(self, *args, **kwargs):
        return self.student(*args, **kwargs)
