"""One-line summaries of results, as the command line prints them: the quantize step's candidates, the
accuracy-budget search's candidates and a parallel run's figures. Plain strings, so a script can print or log
the same lines."""

from __future__ import annotations

from typing import Any

from keiryo.report import human_bytes


def candidate_lines(choice: Any) -> list[str]:
    """One line per kernel candidate the quantize step measured, then the line saying which it chose.

    `choice` is what `keiryo.compress.quantize.report_of` returns for a quantized model.
    """
    lines = []
    for c in choice.candidates:
        timing = ", ".join(f"b{b} {ms:.3f} ms ({c.speedup[b]:.2f}×)" for b, ms in c.p50_ms.items())
        cosine = f"cosine {c.cosine:.4f}" if c.cosine is not None else "cosine -"
        name = c.backend + (f" {c.granularity}" if c.granularity else "")
        note = f" · {c.note}" if c.note else ""
        lines.append(f"  candidate {name}: {cosine}, {timing or 'not timed'}{note}")
    lines.append(f"chosen: {choice.message}")
    return lines


def tried_line(candidate: Any) -> str:
    """The line for one candidate of `keiryo.optimize.optimize` (its `on_candidate` callback's argument)."""
    return (
        f"  tried {candidate.name:<24} val {candidate.val_accuracy:.2%}  test {candidate.test_accuracy:.2%}"
    )


def parallel_lines(par: dict[str, Any], strategy: str) -> tuple[str, list[str]]:
    """(the worker's own line, the run's lines) of a parallel run; only rank 0 prints the run's lines."""
    same = "same on all workers" if par["weights_identical"] else "DIFFERENT across workers"
    own = f"rank {par['rank']}/{par['workers']}: weights sha256 {par['fingerprint']} ({same})"
    memory = " · ".join(
        f"worker {i}: {human_bytes(m['params'] + m['grads'] + m['optimizer'])}"
        for i, m in enumerate(par["memory"])
    )
    lines = [f"{strategy} on {par['workers']} workers · params+grads+optimizer per worker: {memory}"]
    if strategy == "pipeline":
        stages = ", ".join(human_bytes(b) for b in par["stage_param_bytes"])
        lines.append(
            f"stages split before {', '.join(par['split_points'])} · parameters per stage: {stages} · "
            f"{par['schedule']} with {par['microbatches']} micro-batches, bubble {par['bubble']:.0%}"
        )
    return own, lines
