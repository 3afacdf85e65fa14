"""Knowledge distillation: a frozen teacher's softened outputs (and hidden features) train a smaller student.

The loss of Hinton et al. 2015: `alpha · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha) · CE`.
The T² keeps the soft term's gradients the same size whatever T is. The teacher runs in eval mode under
`no_grad` and is never updated. Everything here is a loss function for the one training loop,
`keiryo.loop.fit`; `distill(teacher, student, data, Distill(...), TrainConfig(...))` runs it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from keiryo import devices
from keiryo import inputs as model_io
from keiryo.compress.distill_features import (
    Distillee,
    Taps,
    feature_mse,
    feature_pairs,
    make_projection,
    student_taps,
)
from keiryo.data import DataSplits, example_inputs, make_loader
from keiryo.errors import ConfigError
from keiryo.holdout import split_for_training
from keiryo.loop import LossFn, TrainConfig, fit
from keiryo.progress import TrainingProgress

OUTPUT_LOSSES = ("kl", "mse", "cosine")


@dataclass
class Distill:
    """How the student learns from the teacher (the training settings are a separate `TrainConfig`).

    `temperature` softens both distributions; `alpha` weighs the teacher term (1 − alpha goes to the labels);
    `loss` "kl" (classes), "mse" or "cosine" (regression heads, embeddings). `features` matches hidden layers
    by name ({student layer: teacher layer}, or shared names) through learned projections, weighted by
    `feature_weight`. `cache_teacher` runs the teacher once per sample (only for data without augmentation).
    """

    temperature: float = 4.0
    alpha: float = 0.9
    loss: str = "kl"
    features: dict[str, str] | list[str] | None = None
    feature_weight: float = 1.0
    cache_teacher: bool = False

    def __post_init__(self) -> None:
        t, alpha = self.temperature, self.alpha
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ConfigError(f"temperature must be > 0, got {t!r}")
        if math.isinf(t):
            raise ConfigError(f"temperature must be finite, got {t!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {alpha!r}")
        if self.loss not in OUTPUT_LOSSES:
            raise ConfigError(f"unknown distillation loss '{self.loss}' (choose {', '.join(OUTPUT_LOSSES)})")
        weight = self.feature_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ConfigError(f"feature_weight must be a number ≥ 0, got {weight!r}")
        feature_pairs(self.features)  # its checks, now


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
    """The hard-label term, as `loop.classification_loss` computes it: CE for classes, MSE for floats."""
    if targets.is_floating_point():
        return F.mse_loss(outputs.float().reshape(targets.shape), targets.float())
    return F.cross_entropy(outputs.float(), targets)


def _as_list(teacher: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    teachers = [teacher] if isinstance(teacher, nn.Module) else list(teacher)
    if not teachers or not all(isinstance(t, nn.Module) for t in teachers):
        raise ConfigError("teacher must be a torch.nn.Module or a non-empty list of them")
    return teachers


@torch.no_grad()
def teacher_targets(
    teachers: Sequence[nn.Module], inputs: model_io.Example, temperature: float, loss: str = "kl"
) -> Tensor:
    """What the student learns from: the mean of softmax(teacher/T) for "kl", the mean output otherwise.

    Averaging probabilities (not logits) is how an ensemble's soft targets are defined (Hinton et al.).
    """
    device = model_io.tensors(inputs)[0].device
    total = None
    for teacher in teachers:
        _place(teacher, device)
        teacher.eval()  # batch-norm statistics and dropout must not change
        out = model_io.forward(teacher, inputs).float()
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


def combine(student_out: Tensor, targets: Tensor, teacher_out: Tensor, config: Distill) -> Tensor:
    """alpha · (teacher term) + (1 − alpha) · (task term on the labels); a zero-weight term is skipped."""
    check_shapes(student_out, teacher_out)
    total = student_out.new_zeros((), dtype=torch.float32)
    if config.alpha > 0:
        if config.loss == "kl":
            soft = soft_target_kl(student_out, teacher_out, config.temperature)
        elif config.loss == "mse":
            soft = output_mse(student_out, teacher_out)
        else:
            soft = output_cosine(student_out, teacher_out)
        total = total + config.alpha * soft
    if config.alpha < 1:
        total = total + (1 - config.alpha) * task_loss(student_out, targets)
    return total


class DistillLoss:
    """The training loop's loss for distillation: teacher term + label term (+ weighted hidden-feature term).

    A class rather than a closure so that it pickles, and so reaches parallel workers with the model. With
    a `cache`, the loop's inputs are row indices into it and the teacher does not run at all.
    """

    def __init__(
        self,
        teachers: list[nn.Module],
        config: Distill,
        teacher_taps: Taps | None = None,
        cache: TeacherCache | None = None,
    ) -> None:
        self.teachers, self.config, self.teacher_taps, self.cache = teachers, config, teacher_taps, cache

    def __call__(self, model: nn.Module, inputs: model_io.Example, targets: Tensor) -> tuple[Tensor, Tensor]:
        config = self.config
        pairs = len(self.teacher_taps.names) if self.teacher_taps is not None else 0
        if self.cache is not None:  # `inputs` are row indices into the cache
            rows, device = inputs.cpu(), targets.device
            inputs = model_io.to_device(model_io.index(self.cache.inputs, rows), device)
        outputs = model_io.forward(model, inputs)  # the taps keep the student's (projected) features
        if self.cache is not None:
            teacher_out = devices.move_batch(self.cache.outputs[rows], device)
            teacher_feats = [devices.move_batch(f[rows], device) for f in self.cache.features]
        else:
            teacher_out = teacher_targets(self.teachers, inputs, config.temperature, config.loss)
            teacher_feats = [self.teacher_taps.kept[i] for i in range(pairs)]
        total = combine(outputs, targets, teacher_out, config)
        if pairs and config.feature_weight > 0:
            taps = student_taps(model)
            student_feats = [taps.kept[i] for i in range(pairs)]
            total = total + config.feature_weight * feature_mse(student_feats, teacher_feats)
        return total, outputs


def soft_target_loss(teacher: nn.Module | Sequence[nn.Module], config: Distill | None = None) -> LossFn:
    """A training-loop loss: alpha · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha) · CE.

    `teacher` may be a list (an ensemble: averaged soft targets); it runs in eval mode under no_grad.
    With `config.loss` "mse" or "cosine" the teacher term compares raw outputs (regression, embeddings).
    Hidden features need `distill` (they train projections with the student).
    """
    config = config or Distill()
    if config.features:
        raise ConfigError("hidden-feature distillation trains projections: use distill(), not a loss alone")
    return DistillLoss(_as_list(teacher), config)


class _LabelsUnused(Dataset):
    """The same samples with float targets, for a run whose loss never reads the labels (alpha = 1 with
    mse/cosine): the loop then judges epochs by the validation loss, which is the distillation loss, instead
    of a label accuracy that measures nothing the student is trained for."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[model_io.Example, Tensor]:
        inputs, target = model_io.split_batch(self.dataset[i])
        return inputs, torch.zeros(()) if target is None else torch.as_tensor(target).float()


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

    inputs: model_io.Example
    outputs: Tensor  # soft targets ("kl") or raw outputs ("mse", "cosine")
    features: list[Tensor]  # one per matched layer pair


def _samples(dataset: Dataset) -> list[tuple[model_io.Example, Tensor]]:
    """A dataset's (inputs, targets) batches of 256, whatever form its samples take."""
    batches = []
    for batch in make_loader(dataset, 256):
        inputs, targets = model_io.split_batch(batch)
        if targets is None:
            raise ConfigError("cache_teacher needs labelled samples (inputs, target)")
        batches.append((inputs, targets))
    return batches


@torch.no_grad()
def _cache(
    teachers: list[nn.Module], taps: Taps, splits: DataSplits, config: Distill, train: TrainConfig
) -> tuple[TeacherCache, DataSplits]:
    """Run the teacher once over train+val; return the cache and splits of `_Indexed` items pointing into it.

    Only right when the data is not augmented: every epoch must see exactly the inputs cached here.
    """
    device = devices.resolve_device(train.device)
    train_batches, val_batches = _samples(splits.train), _samples(splits.val) if len(splits.val) else []
    inputs, outputs, features = [], [], [[] for _ in taps.names]
    for batch, _ in train_batches + val_batches:
        inputs.append(batch)
        with devices.autocast(device, train.precision):
            soft = teacher_targets(
                teachers, model_io.to_device(batch, device), config.temperature, config.loss
            )
        outputs.append(soft.float().cpu())
        for i, store in enumerate(features):
            store.append(taps.kept[i].float().cpu())
    cache = TeacherCache(model_io.concat(inputs), torch.cat(outputs), [torch.cat(f) for f in features])
    train_y = torch.cat([y for _, y in train_batches])
    val_y = torch.cat([y for _, y in val_batches]) if val_batches else train_y[:0]
    indexed = replace(splits, train=_Indexed(train_y, 0), val=_Indexed(val_y, len(train_y)))
    return cache, indexed


# --- distillation -------------------------------------------------------------------------------------------


def distill(
    teacher: nn.Module | Sequence[nn.Module],
    student: nn.Module,
    data: object,
    config: Distill | None = None,
    train: TrainConfig | None = None,
) -> nn.Module:
    """Train `student` on `data` to match a frozen teacher (or an ensemble); returns the trained student.

    `config` says how it learns from the teacher (`Distill`), `train` the training loop's settings (epochs,
    lr, validation share, early stopping, device, precision, checkpoint, ...); `data` is split for training
    as `keiryo.loop.fit` splits it (a validation share, no test share; a DataSplits is used as it is).
    After pruning, `distill(unpruned, pruned, data)` is the fine-tuning. The student records the config as
    its `distillation` metadata.
    """
    config, train = config or Distill(), train or TrainConfig()
    teachers = _as_list(teacher)
    if any(t is student for t in teachers):
        raise ConfigError("the student must be a different model from the teacher (copy it first)")
    pairs = feature_pairs(config.features)
    if pairs and len(teachers) > 1:
        raise ConfigError(
            f"hidden-feature distillation takes one teacher, got an ensemble of {len(teachers)}"
        )
    splits, note = split_for_training(data, train.validation, train.seed)
    if note:  # said here, as the loop would: it receives the splits made here
        TrainingProgress(train.progress, 0, 0).line(note)
    if config.loss == "kl" and splits.num_classes is None:
        raise ConfigError(
            "loss 'kl' needs class outputs but the data has regression targets (use mse or cosine)"
        )
    if config.alpha == 1 and config.loss != "kl":
        splits = replace(splits, train=_LabelsUnused(splits.train), val=_LabelsUnused(splits.val))
    device = devices.resolve_device(train.device)
    was_training = [t.training for t in teachers]
    for t in teachers:
        t.to(device).eval()
    taps = Taps(student.to(device), [s for s, _ in pairs], "student")
    teacher_taps = Taps(teachers[0], [t for _, t in pairs], "teacher")
    try:
        projections = _probe(teachers, student, (taps, teacher_taps), splits, device, train.seed)
        model = Distillee(student, projections, taps)
        cache = None
        if config.cache_teacher:
            cache, splits = _cache(teachers, teacher_taps, splits, config, train)
        taps.clear()
        teacher_taps.clear()
        fit(model, splits, train, loss_fn=DistillLoss(teachers, config, teacher_taps, cache))
    finally:
        taps.remove()
        teacher_taps.remove()
        for t, mode in zip(teachers, was_training, strict=True):
            t.train(mode)
    metadata = getattr(student, "_keiryo_metadata", {})
    student._keiryo_metadata = {**metadata, "distillation": {"kind": "distill", **dataclasses.asdict(config)}}
    return student.eval()


@torch.no_grad()
def _probe(
    teachers: list[nn.Module],
    student: nn.Module,
    taps: tuple[Taps, Taps],
    splits: DataSplits,
    device: torch.device,
    seed: int,
) -> list[nn.Module]:
    """Run one small batch through everyone: check that output shapes match, and size the projections.

    The student runs in eval mode, so its batch-norm statistics are untouched before training starts.
    """
    if len(splits.train) == 0:
        raise ConfigError(f"data '{splits.name}' has no training samples")
    inputs = model_io.to_device(example_inputs(splits, 8), device)
    was_training = student.training
    student.eval()
    student_out = model_io.forward(student, inputs)
    student.train(was_training)
    for t in teachers:  # the first teacher's forward also fills the teacher's taps
        check_shapes(student_out, model_io.forward(t, inputs))
    student_taps_, teacher_taps = taps
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [
            make_projection(student_taps_.kept[i].shape, teacher_taps.kept[i].shape).to(device)
            for i in range(len(teacher_taps.names))
        ]
