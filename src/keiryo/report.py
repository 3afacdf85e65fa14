"""Render a `measuring.Report` as a terminal table, markdown or JSON; every command prints through here."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import asdict
from html import escape
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from keiryo.fileio import atomic_write_bytes
from keiryo.measuring import Metrics, Report
from keiryo.units import human_bytes, human_count


def _ratio(value: float | None, *, higher_is_better: bool) -> str:
    if value is None:
        return "-"
    text = f"{value:.2f}×"
    good = value >= 1 if higher_is_better else value <= 1
    return text if good or abs(value - 1) < 0.02 else f"{text} (worse)"


def rows(report: Report) -> list[dict[str, Any]]:
    """One dict of display strings per model, in a fixed column order."""
    batches = sorted({b for r in report.rows for b in r.latency})
    out = []
    for r in report.rows:
        row: dict[str, Any] = {
            "model": r.name,
            "params": human_count(r.params),
            "non-zero": "all"
            if r.params is not None and r.nonzero_params == r.params
            else human_count(r.nonzero_params),
            "size": human_bytes(r.bytes),
            "FLOPs/sample": human_count(r.flops),
        }
        for b in batches:
            lat = r.latency.get(b)
            row[f"p50 b{b}"] = f"{lat.p50_ms:.3f} ms" if lat else "-"
        if batches:
            big = r.latency.get(batches[-1])
            row[f"samples/s b{batches[-1]}"] = f"{big.throughput:,.0f}" if big else "-"
        row["accuracy"] = f"{r.accuracy:.2%}" if r.accuracy is not None else "-"
        if len(report.rows) == 1:  # nothing to compare against: no agreement or ratio columns
            out.append(row)
            continue
        row["agreement"] = _agreement(r)
        if r is not report.baseline:
            row["smaller"] = _ratio(
                1 / report.size_ratio(r) if report.size_ratio(r) else None, higher_is_better=True
            )
            for b in batches:
                row[f"speed-up b{b}"] = _ratio(report.speedup(r, b), higher_is_better=True)
        else:
            row["smaller"] = "baseline"
            for b in batches:
                row[f"speed-up b{b}"] = "baseline"
        out.append(row)
    return out


def _agreement(r: Metrics) -> str:
    a = r.agreement
    if a is None:
        return "-"
    text = (
        f"top1 {a.top1:.1%} cos {a.cosine:.4f}"
        if a.top1 is not None
        else f"cos {a.cosine:.4f} max|Δ| {a.max_error:.2g}"
    )
    return text if a.output == "output" else f"{text} ({a.output})"


def table(report: Report, title: str | None = None) -> Table:
    """A rich table; slower or bigger results are marked '(worse)'."""
    data = rows(report)
    t = Table(title=title, caption=f"latency: median of {_runs(report)} runs, {report.threads} threads")
    for column in data[0]:
        t.add_column(column, justify="left" if column == "model" else "right")
    for row in data:
        t.add_row(*[f"[red]{v}[/red]" if "(worse)" in str(v) else str(v) for v in row.values()])
    return t


def _runs(report: Report) -> int:
    return next((lat.runs for r in report.rows for lat in r.latency.values()), 0)


def print_report(report: Report, title: str | None = None, console: Console | None = None) -> None:
    """Print the table to the terminal."""
    (console or Console()).print(table(report, title))


def markdown(report: Report) -> str:
    """A GitHub-flavoured markdown table of the same columns."""
    data = rows(report)
    header = list(data[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(row[c]) for c in header) + " |" for row in data]
    return "\n".join(lines) + "\n"


def to_json(report: Report) -> str:
    """Raw numbers (not display strings), with ratios to the baseline, for scripts and benchmarks."""
    out = {"threads": report.threads, "models": []}
    for r in report.rows:
        entry = asdict(r)
        entry["latency"] = {
            str(b): {**asdict(lat), "throughput": lat.throughput} for b, lat in r.latency.items()
        }
        entry["size_ratio"] = report.size_ratio(r)
        entry["speedup"] = {str(b): report.speedup(r, b) for b in r.latency}
        out["models"].append(entry)
    return json.dumps(out, indent=2)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, accuracy) points that no other point beats on both at once."""
    front = []
    for i, (cost, acc) in enumerate(points):
        dominated = any(
            c <= cost and a >= acc and (c < cost or a > acc) for j, (c, a) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return front


def plot_tradeoffs(report: Report, path: str | Path) -> Path | None:
    """Accuracy against latency (largest batch) and against file size, Pareto front marked; PNG."""
    rows = [r for r in report.rows if r.accuracy is not None and r.latency and r.bytes]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = max(rows[0].latency)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = (
        (axes[0], [r.latency[batch].p50_ms for r in rows], f"latency at batch {batch} (ms, p50)"),
        (axes[1], [r.bytes / 1024 for r in rows], "model file (KiB)"),
    )
    for ax, costs, label in panels:
        accs = [r.accuracy * 100 for r in rows]
        front = pareto_front(list(zip(costs, accs, strict=True)))
        ax.scatter(costs, accs, color="tab:blue", zorder=3)
        ordered = sorted(front, key=lambda i: costs[i])
        ax.plot(
            [costs[i] for i in ordered],
            [accs[i] for i in ordered],
            color="tab:red",
            linestyle="--",
            label="Pareto front",
            zorder=2,
        )
        for r, c, a in zip(rows, costs, accs, strict=True):
            ax.annotate(r.name, (c, a), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(buffer.getvalue(), path)
    return path


def html(report: Report, title: str, image: Path | None = None, notes: list[str] | None = None) -> str:
    """A self-contained HTML page: the table, the notes and the plot embedded as base64."""
    data = rows(report)
    head = "".join(f"<th>{escape(c)}</th>" for c in data[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in row.values()) + "</tr>" for row in data
    )
    img = ""
    if image is not None and image.exists():
        encoded = base64.b64encode(image.read_bytes()).decode()
        img = f'<img alt="trade-offs" src="data:image/png;base64,{encoded}">'
    items = "".join(f"<li>{escape(n)}</li>" for n in notes or [])
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child"
        "{text-align:left}th{background:#f3f3f3}img{max-width:100%;margin-top:1em}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{escape(title)}</h1><table><tr>{head}</tr>{body}</table>"
        f"<p>latency: median of {_runs(report)} runs, {report.threads} threads; "
        "ratios against the first row.</p>"
        f"<ul>{items}</ul>{img}</body></html>"
    )


def write_reports(report: Report, out_dir: str | Path, title: str, notes: list[str] | None = None) -> None:
    """report.md, report.html (self-contained), metrics.json and tradeoffs.png in `out_dir`, atomically."""
    out = Path(out_dir)
    image = plot_tradeoffs(report, out / "tradeoffs.png")
    md = f"# {title}\n\n" + markdown(report)
    if notes:
        md += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    if image is not None:
        md += f"\n![accuracy against latency and size]({image.name})\n"
    atomic_write_bytes(md.encode(), out / "report.md")
    atomic_write_bytes(html(report, title, image, notes).encode(), out / "report.html")
    atomic_write_bytes(to_json(report).encode(), out / "metrics.json")
