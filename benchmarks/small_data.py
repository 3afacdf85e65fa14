"""Small data with keiryo's defaults vs the 10-line PyTorch loop a user would write (issue 14.6).

scikit-learn's breast cancer (398 training samples) and wine (124), standardized, split 70/30 with a seeded
stratified split; the same small MLP (30 or 13 → 32 → classes) trained three ways, test accuracy per seed:

- plain: AdamW lr 1e-3, batches of 32, 100 epochs on all the training data;
- keiryo: `keiryo.train(model, (x, y))` with default settings (15% held out, a budget of at least 1,000
  steps, early stopping after 10 epochs without a better validation accuracy, best weights kept);
- old defaults: what keiryo did before (70/15/15 split of the user's data, 10 epochs, last weights).

Distillation on breast-cancer: a teacher MLP (30 → 256 → 256 → 2, `keiryo.train` defaults) and the same
small student (30 → 32 → 2) per seed, trained (a) by the plain loop on labels, (b) by `keiryo.train`
defaults on labels, (c) by `keiryo.distill(teacher, student, data)` with `Distill()` and `TrainConfig()`
defaults. The teacher is trained with the same seed, so it holds out the same 15% that distill validates on.

Run: python benchmarks/small_data.py --seeds 5   (writes benchmarks/out/small_data.md)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from sklearn.datasets import load_breast_cancer, load_wine
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from keiryo.compress.distill import Distill, distill
from keiryo.data import load_data
from keiryo.loop import TrainConfig
from keiryo.models import build_model
from keiryo.training import train

DATASETS = {"breast-cancer": load_breast_cancer, "wine": load_wine}


def load(name: str, seed: int) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test): standardized on the training part, stratified 70/30 by `seed`."""
    x, y = DATASETS[name](return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(x_train)

    def as_float(a):
        return torch.tensor(scaler.transform(a), dtype=torch.float32)

    return as_float(x_train), torch.tensor(y_train), as_float(x_test), torch.tensor(y_test)


OUT = Path(__file__).resolve().parent / "out" / "small_data.md"
TEACHER_HIDDEN = (256, 256)

SETUP = """scikit-learn's breast-cancer (398 train / 171 test) and wine (124 / 54), standardized, stratified
70/30 split per seed ({seeds}); test accuracy. `plain` is the 10-line AdamW loop (lr 1e-3, batch 32,
100 epochs, all the training data); `keiryo` is `keiryo.train(model, (x, y))` with default settings;
`old defaults` a 70/15/15 split of the user's data, 10 epochs, last weights. Model: features → 32 → classes.
"""

DISTILL_SETUP = """Teacher: MLP 30 → {hidden} → 2 trained with `keiryo.train` defaults; student: the same
30 → 32 → 2 MLP (same initial weights per seed) trained on labels by the plain loop, by `keiryo.train`
defaults, and by `keiryo.distill(teacher, student, (x, y))` with `Distill()` and `TrainConfig()` defaults.
The last row is distill with `Distill(alpha=0)` (no teacher term): it gives the same weights as
`keiryo.train` on labels (same split, step budget, early stopping and kept epoch; tests/test_distill.py
checks it), so the gap between the two rows above it is what the teacher's soft targets add.
"""


def mlp(features: int, classes: int, seed: int, hidden: tuple[int, ...] = (32,)) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", in_features=features, hidden=list(hidden), num_classes=classes)


def plain_adamw(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> None:
    """What a user writes without keiryo: AdamW, batches of 32, 100 epochs, all the data."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(100):
        for xb, yb in torch.utils.data.DataLoader(list(zip(x, y, strict=True)), batch_size=32, shuffle=True):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()


def score(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def run(name: str, seeds: Iterable[int]) -> dict[str, list[float]]:
    """Test accuracy per seed for each way of training (tests/test_loop.py asserts on it)."""
    out: dict[str, list[float]] = {"plain": [], "keiryo": [], "old defaults": []}
    for seed in seeds:
        x, y, x_test, y_test = load(name, seed)
        features, classes = x.shape[1], int(y.max()) + 1
        for way in out:
            model = mlp(features, classes, seed)
            if way == "plain":
                plain_adamw(model, x, y, seed)
            elif way == "keiryo":
                train(model, (x, y), config=TrainConfig(progress=False, device="cpu", seed=seed))
            else:
                old = TrainConfig(epochs=10, patience=None, progress=False, device="cpu", seed=seed)
                train(model, load_data((x, y), seed=seed), config=old)
            out[way].append(score(model, x_test, y_test))
    return out


def run_distillation(seeds: Iterable[int]) -> dict[str, list[float]]:
    """Breast-cancer test accuracy per seed: the teacher, and the small student four ways."""
    out: dict[str, list[float]] = {
        "teacher (keiryo.train defaults)": [],
        "student, plain loop on labels": [],
        "student, keiryo.train defaults on labels": [],
        "student, keiryo.distill defaults": [],
        "student, keiryo.distill alpha=0 (labels only, same pipeline)": [],
    }
    for seed in seeds:
        x, y, x_test, y_test = load("breast-cancer", seed)
        features, classes = x.shape[1], int(y.max()) + 1
        defaults = TrainConfig(progress=False, device="cpu", seed=seed)
        teacher = mlp(features, classes, seed, hidden=TEACHER_HIDDEN)
        train(teacher, (x, y), config=defaults)
        plain, labels, distilled, no_teacher = (mlp(features, classes, seed) for _ in range(4))
        plain_adamw(plain, x, y, seed)
        train(labels, (x, y), config=defaults)
        distill(teacher, distilled, (x, y), train=defaults)
        distill(teacher, no_teacher, (x, y), Distill(alpha=0.0), defaults)
        for accs, model in zip(out.values(), (teacher, plain, labels, distilled, no_teacher), strict=True):
            accs.append(score(model, x_test, y_test))
    return out


def rows(name: str, results: dict[str, list[float]]) -> list[str]:
    lines = []
    for way, accs in results.items():
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        seeds = " ".join(f"{a:.3f}" for a in accs)
        lines.append(f"| {name} | {way} | {statistics.mean(accs):.3f} ± {spread:.3f} | {seeds} |")
    return lines


def cpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (lscpu failed)"
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")]
    return names[0] if names else "unknown"


def verdict(label: str, ours: list[float], reference: list[float], test_size: int) -> str:
    """'met' when the mean is at least the reference's; the gap also as test samples over all seeds."""
    a, b = statistics.mean(ours), statistics.mean(reference)
    samples = round((sum(ours) - sum(reference)) * test_size)
    met = "met" if a >= b else "not met"
    return f"- {label}: {a:.3f} vs {b:.3f} ({samples:+d} test samples in all) — **{met}**"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    header = ["| data | training | test accuracy, mean ± sd | per seed |", "|---|---|---|---|"]
    print("\n".join(header), flush=True)
    results = {}
    for name in DATASETS:
        results[name] = run(name, range(args.seeds))
        print("\n".join(rows(name, results[name])), flush=True)
    distilled = run_distillation(range(args.seeds))
    print("\n".join(rows("breast-cancer", distilled)), flush=True)
    seeds = f"seeds 0..{args.seeds - 1}"
    ways = list(distilled.values())
    test_size = len(load("breast-cancer", 0)[3])
    text = [
        "# Small data with keiryo's defaults (issue 14.6)",
        "",
        f"CPU: {cpu_model()}; 1 thread per run; torch {torch.__version__}.",
        f"Command: `python {' '.join(['benchmarks/small_data.py', *sys.argv[1:]])}`",
        "",
        SETUP.format(seeds=seeds).rstrip(),
        "",
        *header,
        *rows("breast-cancer", results["breast-cancer"]),
        *rows("wine", results["wine"]),
        "",
        "## Distillation on breast-cancer",
        "",
        DISTILL_SETUP.format(hidden=" → ".join(map(str, TEACHER_HIDDEN))).rstrip(),
        "",
        *header,
        *rows("breast-cancer", distilled),
        "",
        "## Targets (issue 14.6: defaults against the 10-line loop a user would write)",
        "",
        verdict(
            "breast-cancer, keiryo.train defaults ≥ plain loop",
            results["breast-cancer"]["keiryo"],
            results["breast-cancer"]["plain"],
            test_size,
        ),
        verdict("distilled student (defaults) ≥ plain loop on labels", ways[3], ways[1], test_size),
        "",
        "For information (not a target): the distilled student against `keiryo.train` defaults on labels,",
        "and the teacher against that student; a teacher no better than the student has little to add.",
        "",
        verdict(
            "distilled student (defaults) ≥ keiryo.train defaults on labels", ways[3], ways[2], test_size
        ),
        verdict("teacher ≥ student, keiryo.train defaults on labels", ways[0], ways[2], test_size),
        "",
    ]
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text("\n".join(text))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
