"""Knowledge distillation: a frozen teacher's softened outputs (and hidden features) train a smaller student.

The loss of Hinton et al. 2015: `alpha · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha) · CE`.
The T² keeps the soft term's gradients the same size whatever T is. The teacher runs in eval mode under
`no_grad` and is never updated. Everything here is a `keiryo.train` loss function; the loop is `train.py`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from keiryo import devices
from keiryo.data import DataSplits, load_data, tensors_of
from keiryo.errors import ConfigError
from keiryo.loop import LossFn, train

OUTPUT_LOSSES = ("kl", "mse", "cosine")


# --- loss terms ---------------------------------------------------------------------------------------------


def soft_target_kl(student_logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    """T² · KL(teacher_probs ‖ softmax(student/T)), averaged over the batch.

    `teacher_probs` are already softened (softmax of teacher/T, or the mean of an ensemble's).
    """
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_student, teacher_probs.float(), reduction="batchmean")
    return kl * temperature**2


def output_mse(student_out: Tensor, teacher_out: Tensor) -> Tensor:
    """Mean squared error between outputs: for regression heads and embeddings."""
    return F.mse_loss(student_out.float(), teacher_out.float())


def output_cosine(student_out: Tensor, teacher_out: Tensor) -> Tensor:
    """1 − cosine similarity of each output vector with the teacher's, averaged: for embeddings."""
    s, t = student_out.float().flatten(1), teacher_out.float().flatten(1)
    return (1.0 - F.cosine_similarity(s, t, dim=1)).mean()


def task_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """The hard-label term, as `train.classification_loss` computes it: CE for classes, MSE for floats."""
    if targets.is_floating_point():
        return F.mse_loss(outputs.float().reshape(targets.shape), targets.float())
    return F.cross_entropy(outputs.float(), targets)


def check_options(temperature: float, alpha: float, loss: str = "kl") -> None:
    """Reject a temperature ≤ 0, an alpha outside [0, 1] or an unknown loss, in one line."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature!r}")
    if math.isinf(temperature):
        raise ConfigError(f"temperature must be finite, got {temperature!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha!r}")
    if loss not in OUTPUT_LOSSES:
        raise ConfigError(f"unknown distillation loss '{loss}' (choose {', '.join(OUTPUT_LOSSES)})")


def _as_list(teacher: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    teachers = [teacher] if isinstance(teacher, nn.Module) else list(teacher)
    if not teachers or not all(isinstance(t, nn.Module) for t in teachers):
        raise ConfigError("teacher must be a torch.nn.Module or a non-empty list of them")
    return teachers


@torch.no_grad()
def teacher_targets(
    teachers: Sequence[nn.Module], inputs: Tensor, temperature: float, loss: str = "kl"
) -> Tensor:
    """What the student learns from: the mean of softmax(teacher/T) for "kl", the mean output otherwise.

    Averaging probabilities (not logits) is how an ensemble's soft targets are defined (Hinton et al.).
    """
    total = None
    for teacher in teachers:
        _place(teacher, inputs.device)
        teacher.eval()  # batch-norm statistics and dropout must not change
        out = teacher(inputs).float()
        out = F.softmax(out / temperature, dim=-1) if loss == "kl" else out
        total = out if total is None else total + out
    return total / len(teachers)


def _place(teacher: nn.Module, device: torch.device) -> None:
    """Move a teacher to the inputs' device if it is elsewhere (a parallel worker has its own device)."""
    first = next(teacher.parameters(), None)
    if first is not None and first.device != device:
        teacher.to(device)


def check_shapes(student_out: Tensor, teacher_out: Tensor) -> None:
    """Teacher and student must produce outputs of the same shape for their outputs to be compared."""
    if tuple(student_out.shape) != tuple(teacher_out.shape):
        raise ConfigError(
            f"teacher outputs have shape {tuple(teacher_out.shape)} but the student's "
            f"{tuple(student_out.shape)}; they must match"
        )


def combine(
    student_out: Tensor, targets: Tensor, teacher_out: Tensor, temperature: float, alpha: float, loss: str
) -> Tensor:
    """alpha · (teacher term) + (1 − alpha) · (task term on the labels); a zero-weight term is skipped."""
    check_shapes(student_out, teacher_out)
    total = student_out.new_zeros((), dtype=torch.float32)
    if alpha > 0:
        if loss == "kl":
            soft = soft_target_kl(student_out, teacher_out, temperature)
        elif loss == "mse":
            soft = output_mse(student_out, teacher_out)
        else:
            soft = output_cosine(student_out, teacher_out)
        total = total + alpha * soft
    if alpha < 1:
        total = total + (1 - alpha) * task_loss(student_out, targets)
    return total


class DistillLoss:
    """The training loop's loss for distillation: teacher term + label term (+ weighted hidden-feature term).

    A class rather than a closure so that it pickles, and so reaches parallel workers with the model. With
    a `cache`, the loop's inputs are row indices into it and the teacher does not run at all.
    """

    def __init__(
        self,
        teachers: list[nn.Module],
        temperature: float,
        alpha: float,
        loss: str,
        teacher_taps: _Taps | None = None,
        cache: TeacherCache | None = None,
        feature_weight: float = 1.0,
    ) -> None:
        self.teachers, self.temperature, self.alpha, self.loss = teachers, temperature, alpha, loss
        self.teacher_taps, self.cache, self.feature_weight = teacher_taps, cache, feature_weight

    def __call__(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        pairs = len(self.teacher_taps.names) if self.teacher_taps is not None else 0
        if self.cache is not None:  # `inputs` are row indices into the cache
            rows, device = inputs.cpu(), targets.device
            inputs = devices.move_batch(self.cache.inputs[rows], device)
        outputs = model(inputs)  # the taps keep the student's (projected) features
        if self.cache is not None:
            teacher_out = devices.move_batch(self.cache.outputs[rows], device)
            teacher_feats = [devices.move_batch(f[rows], device) for f in self.cache.features]
        else:
            teacher_out = teacher_targets(self.teachers, inputs, self.temperature, self.loss)
            teacher_feats = [self.teacher_taps.kept[i] for i in range(pairs)]
        total = combine(outputs, targets, teacher_out, self.temperature, self.alpha, self.loss)
        if pairs and self.feature_weight > 0:
            student_taps = _student_taps(model)
            student_feats = [student_taps.kept[i] for i in range(pairs)]
            total = total + self.feature_weight * feature_mse(student_feats, teacher_feats)
        return total, outputs


def soft_target_loss(
    teacher: nn.Module | Sequence[nn.Module], temperature: float = 4.0, alpha: float = 0.9, loss: str = "kl"
) -> LossFn:
    """A `keiryo.train` loss: alpha · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha) · CE.

    `teacher` may be a list (an ensemble: averaged soft targets); it runs in eval mode under no_grad.
    With loss="mse" or "cosine" the teacher term compares raw outputs (regression, embeddings) instead.
    """
    check_options(temperature, alpha, loss)
    return DistillLoss(_as_list(teacher), temperature, alpha, loss)


# --- hidden features ----------------------------------------------------------------------------------------


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


class _Taps:
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

    def __init__(self, taps: _Taps, index: int, name: str, role: str) -> None:
        self.taps, self.index, self.name, self.role = taps, index, name, role

    def __call__(self, module: nn.Module, args: tuple, output: object) -> None:
        if not isinstance(output, Tensor):
            found = type(output).__name__
            raise ConfigError(
                f"{self.role} layer '{self.name}' returns a {found}, not a tensor; pick another"
            )
        projections = self.taps.projections
        self.taps.kept[self.index] = output if projections is None else projections[self.index](output)


def _student_taps(model: nn.Module) -> _Taps:
    """The student's taps, found through whatever wraps the training module (DDP, compile, a copy)."""
    for module in model.modules():
        if isinstance(module, _Distillee):
            return module.taps
    raise ConfigError("hidden-feature distillation needs the model that distill() trains")


def _layer(model: nn.Module, name: str, role: str) -> nn.Module:
    layers = dict(model.named_modules())
    if name not in layers or not name:
        known = [n for n in layers if n]
        shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
        raise ConfigError(f"the {role} has no layer '{name}' (layers: {shown})")
    return layers[name]


class _Distillee(nn.Module):
    """The student plus its feature projections, so that the training loop's optimizer updates both.

    Its forward is the student's; `distill` returns the bare student and drops the projections.
    """

    def __init__(self, student: nn.Module, projections: list[nn.Module], taps: _Taps) -> None:
        super().__init__()
        self.student = student
        self.projections = nn.ModuleList(projections)
        self.taps = taps  # travels with the module, so a worker's copy keeps its own features
        taps.projections = list(self.projections)

    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)


# --- teacher-output cache -----------------------------------------------------------------------------------


class _Indexed(Dataset):
    """(index, target) items: the loss looks the input and the teacher's cached outputs up by the index.

    Targets stay the real labels, so the loop's accuracy figures keep their meaning.
    """

    def __init__(self, targets: Tensor, offset: int) -> None:
        self.targets, self.offset = targets, offset

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return torch.tensor(self.offset + i), self.targets[i]


@dataclass
class TeacherCache:
    """The teacher's view of every training and validation sample, computed once (rows = global index)."""

    inputs: Tensor
    outputs: Tensor  # soft targets ("kl") or raw outputs ("mse", "cosine")
    features: list[Tensor]  # one per matched layer pair


@torch.no_grad()
def _cache(
    teachers, taps, splits: DataSplits, temperature, loss, device, precision
) -> tuple[TeacherCache, DataSplits]:
    """Run the teacher once over train+val; return the cache and splits of `_Indexed` items pointing into it.

    Only right when the data is not augmented: every epoch must see exactly the inputs cached here.
    """
    train_x, train_y = tensors_of(splits.train)
    if len(splits.val):
        val_x, val_y = tensors_of(splits.val)
    else:
        val_x, val_y = train_x[:0], train_y[:0]
    inputs = torch.cat([train_x, val_x])
    outputs, features = [], [[] for _ in taps.names]
    for start in range(0, len(inputs), 256):
        batch = inputs[start : start + 256].to(device)
        with devices.autocast(device, precision):
            outputs.append(teacher_targets(teachers, batch, temperature, loss).float().cpu())
        for i, store in enumerate(features):
            store.append(taps.kept[i].float().cpu())
    cache = TeacherCache(inputs, torch.cat(outputs), [torch.cat(f) for f in features])
    indexed = replace(splits, train=_Indexed(train_y, 0), val=_Indexed(val_y, len(train_x)))
    return cache, indexed


# --- distillation -------------------------------------------------------------------------------------------


def distill(
    teacher: nn.Module | Sequence[nn.Module],
    student: nn.Module,
    data: object,
    temperature: float = 4.0,
    alpha: float = 0.9,
    *,
    features: dict[str, str] | Sequence[str] | None = None,
    feature_weight: float = 1.0,
    loss: str = "kl",
    cache_teacher: bool = False,
    **train_options,
) -> nn.Module:
    """Train `student` on `data` to match a frozen teacher (or an ensemble); returns the trained student.

    `features` matches hidden layers by name ({student layer: teacher layer}) with learned projections;
    `loss` "mse"/"cosine" distils regression or embedding outputs; `cache_teacher` runs the teacher once per
    sample (only for data without augmentation). `train_options` go to `keiryo.loop.train` (epochs, lr,
    device, precision, checkpoint, ...). After pruning, `distill(unpruned, pruned, data)` is the fine-tuning.
    """
    check_options(temperature, alpha, loss)
    if isinstance(feature_weight, bool) or not isinstance(feature_weight, (int, float)) or feature_weight < 0:
        raise ConfigError(f"feature_weight must be a number ≥ 0, got {feature_weight!r}")
    teachers = _as_list(teacher)
    if any(t is student for t in teachers):
        raise ConfigError("the student must be a different model from the teacher (copy it first)")
    pairs = feature_pairs(features)
    if pairs and len(teachers) > 1:
        raise ConfigError(
            f"hidden-feature distillation takes one teacher, got an ensemble of {len(teachers)}"
        )
    splits = data if isinstance(data, DataSplits) else load_data(data, seed=train_options.get("seed", 0))
    if loss == "kl" and splits.num_classes is None:
        raise ConfigError(
            "loss 'kl' needs class outputs but the data has regression targets (use mse or cosine)"
        )
    device = devices.resolve_device(train_options.get("device", "auto"))
    precision = train_options.get("precision", "fp32")
    was_training = [t.training for t in teachers]
    for t in teachers:
        t.to(device).eval()
    student_taps = _Taps(student.to(device), [s for s, _ in pairs], "student")
    teacher_taps = _Taps(teachers[0], [t for _, t in pairs], "teacher")
    try:
        projections = _probe(teachers, student, student_taps, teacher_taps, splits, device, train_options)
        model = _Distillee(student, projections, student_taps)
        cache = None
        if cache_teacher:
            cache, splits = _cache(teachers, teacher_taps, splits, temperature, loss, device, precision)
        student_taps.clear()
        teacher_taps.clear()
        loss_fn = DistillLoss(teachers, temperature, alpha, loss, teacher_taps, cache, feature_weight)
        train(model, splits, loss_fn=loss_fn, **train_options)
    finally:
        student_taps.remove()
        teacher_taps.remove()
        for t, mode in zip(teachers, was_training, strict=True):
            t.train(mode)
    return student.eval()


@torch.no_grad()
def _probe(teachers, student, student_taps, teacher_taps, splits, device, train_options) -> list[nn.Module]:
    """Run one small batch through everyone: check that output shapes match, and size the projections.

    The student runs in eval mode, so its batch-norm statistics are untouched before training starts.
    """
    if len(splits.train) == 0:
        raise ConfigError(f"data '{splits.name}' has no training samples")
    inputs, _ = tensors_of(Subset(splits.train, range(min(8, len(splits.train)))))
    inputs = inputs.to(device)
    was_training = student.training
    student.eval()
    student_out = student(inputs)
    student.train(was_training)
    for t in teachers:  # the first teacher's forward also fills the teacher's taps
        check_shapes(student_out, t(inputs))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train_options.get("seed", 0))
        return [
            make_projection(student_taps.kept[i].shape, teacher_taps.kept[i].shape).to(device)
            for i in range(len(teacher_taps.names))
        ]
