"""Knowledge distillation: a frozen teacher's softened outputs (and hidden features) train a smaller student.

The loss of Hinton et al. 2015: `alpha · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha) · CE`.
The T² keeps the soft term's gradients the same size whatever T is. The teacher runs in eval mode under
`no_grad` and is never updated. Everything here is a `keiryo.train` loss function; the loop is `train.py`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keiryo.errors import ConfigError
from keiryo.train import LossFn

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
        teacher.eval()  # batch-norm statistics and dropout must not change
        out = teacher(inputs).float()
        out = F.softmax(out / temperature, dim=-1) if loss == "kl" else out
        total = out if total is None else total + out
    return total / len(teachers)


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


def soft_target_loss(
    teacher: nn.Module | Sequence[nn.Module], temperature: float = 4.0, alpha: float = 0.9, loss: str = "kl"
) -> LossFn:
    """A `keiryo.train` loss: alpha · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha) · CE.

    `teacher` may be a list (an ensemble: averaged soft targets); it runs in eval mode under no_grad.
    With loss="mse" or "cosine" the teacher term compares raw outputs (regression, embeddings) instead.
    """
    check_options(temperature, alpha, loss)
    teachers = _as_list(teacher)

    def loss_fn(model: nn.Module, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        outputs = model(inputs)
        teacher_out = teacher_targets(teachers, inputs, temperature, loss)
        return combine(outputs, targets, teacher_out, temperature, alpha, loss), outputs

    return loss_fn
