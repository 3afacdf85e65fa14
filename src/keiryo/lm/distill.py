"""Distillation for causal LMs: a student (a pruned copy, or a smaller model of the same vocabulary) learns
the teacher's next-token distributions on calibration text.

The loss is keiryo's distillation loss (`compress.distill.combine`: alpha · T² · KL(teacher ‖ student) at
temperature T, plus (1 − alpha) · next-token cross-entropy on the text), taken per token. The teacher runs
once over the calibration windows before training (`cache_teacher`, on by default), keeping each token's
`top_k` most likely next tokens and their probabilities at T (the dropped tail is a few percent of the mass;
`top_k=None` keeps the whole distribution, exact but vocabulary-sized); during training only the student
runs. Training is keiryo's one loop (`loop.fit`): AdamW, cosine schedule, progress bar; the input
embedding (tied to the output head in most small LMs) stays frozen unless `train_embeddings`, which halves
the optimizer's memory and keeps the vocabulary the teacher's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from keiryo import devices
from keiryo.compress.distill import Distill, check_shapes, combine, teacher_targets
from keiryo.data import DataSplits
from keiryo.errors import ConfigError, check_whole, is_finite
from keiryo.loop import TrainConfig, fit


@dataclass
class LMDistill:
    """How a causal LM student learns from its teacher: `temperature` and `alpha` as in `Distill`; `steps`
    optimizer steps of `batch_size` windows at learning rate `lr`; the teacher cached (`cache_teacher`) as its
    `top_k` next tokens per position (None: all of them). `precision`: the training loop's autocast ("bf16"
    runs the student's matrix products in bfloat16: faster on CPUs with bf16 units, slower without)."""

    temperature: float = 1.0
    alpha: float = 1.0
    steps: int = 200
    batch_size: int = 4
    lr: float = 1e-4
    top_k: int | None = 64
    cache_teacher: bool = True
    train_embeddings: bool = False
    precision: str = "fp32"
    progress: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        self.soft()  # Distill's checks of temperature and alpha
        devices.check_precision(self.precision)
        check_whole("steps", self.steps, 1)
        check_whole("batch size", self.batch_size, 1)
        if self.top_k is not None:
            check_whole("top_k (None keeps the whole distribution)", self.top_k, 1)
        if not is_finite(self.lr) or self.lr <= 0:
            raise ConfigError(f"learning rate must be a finite number > 0, got {self.lr}")

    def soft(self) -> Distill:
        """The output-distillation config this is, for keiryo's distillation loss."""
        return Distill(temperature=self.temperature, alpha=self.alpha, loss="kl")


@dataclass
class TeacherCache:
    """The teacher's softened next-token probabilities at every position of every window but the last:
    `probs` (count, length − 1, k) at token ids `index` (same shape), or the whole vocabulary (`index`
    None)."""

    probs: Tensor
    index: Tensor | None
    vocab: int

    def targets(self, rows: Tensor) -> Tensor:
        """Dense (rows × positions, vocab) probabilities of `rows` (zero outside the kept top-k)."""
        probs = self.probs[rows].flatten(0, 1).float()
        if self.index is None:
            return probs
        dense = probs.new_zeros(probs.shape[0], self.vocab)
        return dense.scatter_(1, self.index[rows].flatten(0, 1).long(), probs)


@torch.no_grad()
def cache_teacher(teacher: nn.Module, windows: Tensor, config: LMDistill) -> TeacherCache:
    """Run the teacher once over `windows` and keep what `config` says of its next-token distributions."""
    probs, index = [], []
    vocab = None
    for start in range(0, len(windows), config.batch_size):
        p = teacher_targets([teacher], windows[start : start + config.batch_size], config.temperature)[:, :-1]
        vocab = p.shape[-1]
        if config.top_k is None or config.top_k >= vocab:
            probs.append(p.cpu())
        else:
            top = torch.topk(p, config.top_k, dim=-1)
            probs.append(top.values.cpu())
            index.append(top.indices.to(torch.int32).cpu())
    return TeacherCache(torch.cat(probs), torch.cat(index) if index else None, vocab)


class LMDistillLoss:
    """The training loop's loss: the loop's inputs are window indices; the student's logits for every
    position but the last against the teacher's (cached or computed now) and the next tokens."""

    def __init__(
        self, teacher: nn.Module, windows: Tensor, config: LMDistill, cache: TeacherCache | None
    ) -> None:
        self.teacher, self.windows, self.config, self.cache = teacher, windows, config, cache
        self.soft = config.soft()

    def __call__(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        rows = inputs.cpu().long()
        device = targets.device
        ids = self.windows[rows].to(device)
        logits = model(ids, use_cache=False).logits[:, :-1]
        student = logits.flatten(0, 1)
        if self.cache is not None:
            teacher = self.cache.targets(rows).to(device)
        else:
            teacher = teacher_targets([self.teacher], ids, self.config.temperature)[:, :-1].flatten(0, 1)
        check_shapes(student, teacher)
        return combine(student, ids[:, 1:].flatten(), teacher, self.soft), student.detach()


class Settings(Protocol):
    """What `fit_config` reads of a config (LMDistill, Reconstruct)."""

    batch_size: int
    lr: float
    seed: int
    precision: str
    progress: bool


def fit_config(config: Settings, epochs: int) -> TrainConfig:
    """The training loop's settings for learning from a teacher on calibration text: `config`'s batch size,
    learning rate, seed, precision and progress; every window trains (no validation split, no early stop)
    and nothing decays towards zero (the weights start as the teacher's, not at random)."""
    return TrainConfig(
        epochs=epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=0.0,
        validation=0.0,
        patience=None,
        seed=config.seed,
        precision=config.precision,
        progress=config.progress,
    )


def distill(
    teacher: nn.Module, student: nn.Module, windows: Tensor, config: LMDistill | None = None
) -> nn.Module:
    """Train `student` in place to match `teacher`'s next-token distributions on `windows` (calibration token
    ids, (count, length)); returns the student in eval mode. The teacher is frozen and never changes.

    After `compress(model, Structured(...), calibration)`, `distill(original, pruned, calibration)` heals the
    pruned model; a smaller model built from a config (same vocabulary) is distilled the same way.
    """
    config = config or LMDistill()
    if teacher is student:
        raise ConfigError("the student must be a different model from the teacher (copy it first)")
    if not isinstance(windows, Tensor) or windows.dim() != 2 or windows.shape[1] < 2 or len(windows) == 0:
        raise ConfigError("distillation text must be token ids as (count, length ≥ 2) windows")
    windows = windows.long().cpu()
    train = fit_config(config, epochs=1)
    device = devices.resolve_device(train.device)
    was_training = teacher.training
    teacher.to(device).eval()
    embedding = student.get_input_embeddings()
    frozen = [] if config.train_embeddings else [p for p in embedding.parameters() if p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(False)
    try:
        cache = cache_teacher(teacher, windows.to(device), config) if config.cache_teacher else None
        # `steps` batches in one epoch: the windows, cycled, in an order the loop shuffles by seed
        count = config.steps * config.batch_size
        rows = torch.arange(count) % len(windows)
        samples, empty = TensorDataset(rows, torch.zeros(count)), TensorDataset(rows[:0], torch.zeros(0))
        splits = DataSplits(samples, empty, empty, None, (windows.shape[1],), "calibration windows")
        fit(student, splits, train, loss_fn=LMDistillLoss(teacher, windows, config, cache))
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)
        teacher.train(was_training)
    return student.eval()
