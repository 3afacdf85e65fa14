"""Knowledge distillation on digits: a cnn teacher's soft targets against labels alone, for an 8x smaller mlp.

Run: python benchmarks/distill.py            (about 2-3 minutes on 2 quiet CPU cores; --quick: a smoke run)

For each of 5 seeds: train the teacher (keiryo's residual cnn) on the training split, then train the same
student (an mlp, hidden=[256], 7.8x fewer parameters) from the same initial weights twice on the same
batches: on the labels alone, and distilled (T=4, alpha=0.9). Once on the full training split and once on
10% of it (drawn per seed), and then distilled at T = 1, 2, 4, 8, 20 for the temperature table in the spirit
of Hinton et al. 2015, Table 1.
The split (train/val/test) is the fixed seed-0 split; seeds change the initial weights, shuffles and the 10%.
Errors are counted on the 270-image test split. The teacher's outputs are cached (the data is not augmented),
and the last table measures what that saves, as a ratio of interleaved timings.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import Subset

from keiryo.compress.distill import Distill, distill
from keiryo.data import DataSplits, load_data
from keiryo.loop import TrainConfig, fit
from keiryo.metrics import accuracy, count_parameters
from keiryo.models import build_model, kwargs_for_data

OUT = Path(__file__).parent / "out"
SEEDS = (0, 1, 2, 3, 4)
TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 20.0)
# hidden=[256]: small enough (7.8x fewer parameters than the teacher) and wide enough to over-fit 1,257
# images on labels alone, which is where soft targets help (Hinton et al.); hidden=[128] gained ~1 error.
STUDENT = {"hidden": [256]}


def quiet(**options) -> TrainConfig:
    """Training settings for every run here: on the CPU, no progress bar."""
    return TrainConfig(progress=False, device="cpu", **options)


def errors(model: torch.nn.Module, splits: DataSplits) -> int:
    return round((1.0 - accuracy(model, splits.test)) * len(splits.test))


def build(name: str, splits: DataSplits, seed: int, **extra) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(name, **{**kwargs_for_data(name, splits.input_shape, splits.num_classes), **extra})


def fraction(splits: DataSplits, part: float, seed: int) -> DataSplits:
    """The same splits with a seeded random `part` of the training samples (validation and test unchanged)."""
    order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(seed)).tolist()
    return replace(splits, train=Subset(splits.train, order[: round(part * len(splits.train))]))


def run_seed(splits: DataSplits, seed: int, cfg: dict) -> dict[str, object]:
    """Teacher, then for each setting the student on labels alone and distilled from the same start."""
    teacher = build("cnn", splits, seed)
    fit(teacher, splits, quiet(epochs=cfg["teacher_epochs"], seed=seed))
    out: dict[str, object] = {"teacher": errors(teacher, splits)}
    settings = [("full", splits, cfg["epochs"]), ("10%", fraction(splits, 0.1, seed), cfg["epochs"] * 5)]
    for name, data, epochs in settings:  # 10%: 5x the epochs, so both settings take about as many steps
        start = build("mlp", splits, 100 + seed, **STUDENT)
        alone = copy.deepcopy(start)
        fit(alone, data, quiet(epochs=epochs, seed=seed))
        out[f"alone {name}"] = errors(alone, splits)
        for t in TEMPERATURES if name == "full" else (cfg["temperature"],):
            student = copy.deepcopy(start)
            config = Distill(temperature=t, alpha=cfg["alpha"], cache_teacher=True)
            distill(teacher, student, data, config, quiet(epochs=epochs, seed=seed))
            out[f"distilled {name} T={t:g}"] = errors(student, splits)
    out["params"] = (count_parameters(teacher)[0], count_parameters(start)[0])
    out["teacher_model"] = teacher
    return out


def cache_saving(splits: DataSplits, teacher: torch.nn.Module, repeats: int) -> float:
    """Median ratio of a distillation epoch's time without / with the teacher cache, timed interleaved."""
    ratios = []
    for _ in range(repeats):
        times = {}
        for cached in (False, True):
            student = build("mlp", splits, 0, **STUDENT)
            started = time.perf_counter()
            distill(teacher, student, splits, Distill(cache_teacher=cached), quiet(epochs=2))
            times[cached] = time.perf_counter() - started
        ratios.append(times[False] / times[True])
    return statistics.median(ratios)


def mean_std(values: list[float], digits: int = 1) -> str:
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(results: list[dict], splits: DataSplits, cfg: dict, saving: float) -> str:
    n = len(splits.test)
    teacher_params, student_params = results[0]["params"]
    t = f"T={cfg['temperature']:g}"
    teacher_acc = [1 - r["teacher"] / n for r in results]
    lines = [
        "# Distillation on digits",
        "",
        f"Teacher `cnn` ({teacher_params:,} parameters, {cfg['teacher_epochs']} epochs) → student "
        f"`mlp` hidden={STUDENT['hidden']} ({student_params:,} parameters, "
        f"{teacher_params / student_params:.1f}× fewer). {len(results)} seeds, mean ± std; errors are "
        f"counted on the {n} test images. Student runs: {cfg['epochs']} epochs on the full training split "
        f"({len(splits.train)} images), {cfg['epochs'] * 5} on 10% of it; distilled with {t}, "
        f"alpha={cfg['alpha']:g}, teacher outputs cached.",
        "",
        "| training data | model | test errors | test accuracy | % of teacher accuracy | "
        "errors saved by distillation (paired) |",
        "|---|---|---|---|---|---|",
    ]
    for setting in ("full", "10%"):
        alone = [r[f"alone {setting}"] for r in results]
        dist = [r[f"distilled {setting} {t}"] for r in results]
        lines.append(
            f"| {setting} | teacher (cnn, full data) | {mean_std([r['teacher'] for r in results])} | "
            f"{mean_std([100 * a for a in teacher_acc], 2)}% | 100% | |"
        )
        for label, errs in (("student, labels alone", alone), (f"student, distilled ({t})", dist)):
            acc = [1 - e / n for e in errs]
            kept = [100 * a / ta for a, ta in zip(acc, teacher_acc, strict=True)]
            saved = (
                mean_std([a - d for a, d in zip(alone, dist, strict=True)]) if "distilled" in label else ""
            )
            lines.append(
                f"| {setting} | {label} | {mean_std(errs)} | {mean_std([100 * a for a in acc], 2)}% | "
                f"{mean_std(kept)}% | {saved} |"
            )
    lines += [
        "",
        "Targets (5 seeds; a gain is errors of labels alone − errors distilled, paired by seed):",
        "",
    ]
    for setting in ("full", "10%"):
        alone = [r[f"alone {setting}"] for r in results]
        dist = [r[f"distilled {setting} {t}"] for r in results]
        gains = [a - d for a, d in zip(alone, dist, strict=True)]
        spread = max(statistics.stdev(alone), statistics.stdev(dist))
        gain_ok = statistics.mean(gains) > statistics.stdev(gains) and statistics.mean(gains) > spread
        kept = min(1 - statistics.mean(dist) / n, 1.0) / statistics.mean(teacher_acc)
        lines.append(
            f"- {setting}: distilled beats labels alone by more than one std: "
            f"{'met' if gain_ok else 'NOT met'} (mean gain {statistics.mean(gains):.1f} errors; std of the "
            f"paired gains {statistics.stdev(gains):.1f}, larger std of the two groups {spread:.1f}); "
            f"keeps {kept:.1%} of the teacher's accuracy ({'met' if kept >= 0.97 else 'NOT met'}: ≥ 97%)"
        )
    lines += [
        "",
        "## Temperature (full training split)",
        "",
        "Cf. Hinton et al. 2015 on MNIST: teacher 67, student alone 146, distilled 74 test errors.",
        "",
        "| T | teacher errors | student alone errors | distilled student errors |",
        "|---|---|---|---|",
    ]
    for temp in TEMPERATURES:
        lines.append(
            f"| {temp:g} | {mean_std([r['teacher'] for r in results])} | "
            f"{mean_std([r['alone full'] for r in results])} | "
            f"{mean_std([r[f'distilled full T={temp:g}'] for r in results])} |"
        )
    lines += [
        "",
        "## Teacher cache",
        "",
        f"A distillation epoch on the full split takes {saving:.1f}× as long without `cache_teacher=True` as "
        "with it (median of interleaved runs): the teacher's forward is paid once per image, not per epoch.",
        "",
        f"Command: `python benchmarks/distill.py` (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, few epochs: a smoke run")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    cfg = {"teacher_epochs": 8, "epochs": 100, "temperature": 4.0, "alpha": 0.9}
    seeds = SEEDS
    if args.quick:
        cfg.update(teacher_epochs=2, epochs=4)
        seeds = SEEDS[:2]
    splits = load_data("digits", seed=0)
    started = time.perf_counter()
    results = []
    for seed in seeds:
        results.append(run_seed(splits, seed, cfg))
        shown = {k: v for k, v in results[-1].items() if k not in ("params", "teacher_model")}
        print(f"seed {seed} ({time.perf_counter() - started:.0f}s): {shown}", file=sys.stderr, flush=True)
    saving = cache_saving(splits, results[0]["teacher_model"], repeats=1 if args.quick else 3)
    text = report(results, splits, cfg, saving)
    print(text)
    if not args.quick:
        OUT.mkdir(exist_ok=True)
        (OUT / "distill.md").write_text(text)
    print(f"({time.perf_counter() - started:.0f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
