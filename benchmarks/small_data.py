"""Small data with keiryo's defaults vs the 10-line PyTorch loop a user would write (issue 14.6).

scikit-learn's breast cancer (398 training samples) and wine (124), standardized, split 70/30 with a seeded
stratified split; the same small MLP (30 or 13 → 32 → classes) trained three ways, test accuracy per seed:

- plain: AdamW lr 1e-3, batches of 32, 100 epochs on all the training data;
- keiryo: `keiryo.train(model, (x, y))` with default settings (15% held out, a budget of at least 1,000
  steps, early stopping after 10 epochs without a better validation accuracy, best weights kept);
- old defaults: what keiryo did before (70/15/15 split of the user's data, 10 epochs, last weights).

Run: python benchmarks/small_data.py --seeds 10
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Iterable

import torch
from sklearn.datasets import load_breast_cancer, load_wine
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

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


def mlp(features: int, classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", in_features=features, hidden=[32], num_classes=classes)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| data | training | test accuracy, mean ± sd | per seed |")
    print("|---|---|---|---|")
    for name in DATASETS:
        for way, accs in run(name, range(args.seeds)).items():
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            seeds = " ".join(f"{a:.3f}" for a in accs)
            print(f"| {name} | {way} | {statistics.mean(accs):.3f} ± {spread:.3f} | {seeds} |", flush=True)


if __name__ == "__main__":
    main()
