"""`keiryo bench`, `export` and `hf`: measure model files side by side, export one, convert a Hugging Face
folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from keiryo import artifacts, data, hf_text, inputs, models, provenance, report
from keiryo.cli import lm
from keiryo.cli.options import MAX_BATCH, ModelOutOpt, RunsOpt, SeedOpt, ThreadsOpt, TrustCodeOpt, int_list
from keiryo.cli.outputs import (
    check_fits,
    check_output,
    console,
    data_path,
    same_path,
    save,
    size,
    staged,
    write_text,
)
from keiryo.errors import ConfigError
from keiryo.examples import example_inputs
from keiryo.export import check_target
from keiryo.export import export as export_model
from keiryo.hf import HFModel, task_of
from keiryo.measuring import compare
from keiryo.metrics import Timing


def bench(
    model_files: Annotated[
        list[Path],
        typer.Argument(
            help="Model files, or language models as hf:FOLDER / gguf:FILE; the first is the baseline."
        ),
    ],
    data_source: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="Data for accuracy and agreement (test split); for language models a text file "
            "or 'shakespeare' for perplexity.",
        ),
    ] = None,
    batch_sizes: Annotated[
        str | None,
        typer.Option(help="Comma-separated batch sizes to time (default 1,64; language models 1,8)."),
    ] = None,
    runs: Annotated[int, typer.Option(min=1, help="Timed runs per batch size (after warm-up).")] = 50,
    threads: Annotated[int | None, typer.Option(min=1, help="Intra-op threads (default: torch's).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write raw numbers as JSON.")] = None,
    markdown_out: Annotated[
        Path | None, typer.Option("--markdown", help="Also write a markdown table.")
    ] = None,
    trust_code: TrustCodeOpt = False,
    seed: SeedOpt = 0,
) -> None:
    """Measure model files side by side: size, FLOPs, latency, throughput, accuracy, agreement.

    Language models (hf:FOLDER, gguf:FILE) get `keiryo lm eval`'s table instead: perplexity on the --data
    text, prefill ms of a 128-token prompt, decode tokens/s, memory and file size.

    Example: keiryo bench teacher.pt student.pt --data digits --batch-sizes 1,64 --threads 2
    Example: keiryo bench gguf:SmolLM2-135M.gguf --data shakespeare
    """
    if any(lm.is_language_model(str(path)) for path in model_files):
        sizes = tuple(int_list(batch_sizes or "1,8", "--batch-sizes"))
        options = lm.EvalOptions(batch_sizes=sizes, rounds=min(runs, lm.EvalOptions.rounds))
        specs = [str(path) for path in model_files]
        lm.evaluate(specs, data_source, options, threads, (json_out, markdown_out))
        return
    sizes = int_list(batch_sizes or "1,64", "--batch-sizes")
    inputs = [*model_files, data_path(data_source)]
    for option, path in (("--json", json_out), ("--markdown", markdown_out)):
        if path is not None:
            check_output(path, option, inputs)
    if same_path(json_out, markdown_out):
        raise ConfigError("--json and --markdown are the same file; give each its own path")
    loaded = {}
    for path in model_files:
        name = path.stem if path.stem not in loaded else str(path)
        loaded[name] = artifacts.load(path, trust_code=trust_code)
    splits = data.load_data(data_source, seed=seed) if data_source else None
    for model in loaded.values():
        check_fits(model, splits)
    example = example_inputs(next(iter(loaded.values())), splits, max(sizes), seed, str(model_files[0]))
    with staged(json_out, markdown_out) as (json_tmp, markdown_tmp):
        result = compare(
            loaded, example, splits, Timing(runs=runs, batch_sizes=tuple(sizes), threads=threads)
        )
        report.print_report(result, title="keiryo bench", console=console)
        if json_out and json_tmp:
            write_text(report.to_json(result), json_tmp, json_out)
        if markdown_out and markdown_tmp:
            write_text(report.markdown(result), markdown_tmp, markdown_out)


def export(
    model_file: Annotated[Path, typer.Argument(help="A keiryo model file.")],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="The exported file (.onnx, .pt2, .safetensors) or folder (hf)."),
    ],
    format: Annotated[
        str,
        typer.Option(
            help="onnx | onnx-int8 (int8 by onnxruntime) | torch-export | safetensors | hf (a Hugging Face "
            "folder, for models from hf:PATH)."
        ),
    ] = "onnx",
    data_source: Annotated[
        str | None, typer.Option("--data", "-d", help="Data whose inputs check the export (else random).")
    ] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, max=MAX_BATCH, help="Batch size of the check and the timing.")
    ] = 64,
    trust_code: TrustCodeOpt = False,
    seed: SeedOpt = 0,
) -> None:
    """Export a model for deployment and verify the file: max error against PyTorch, and runtime latency.

    The check loads the written file afresh (onnxruntime, torch.export.load, a new copy of the architecture
    for safetensors) and compares its outputs with the model's; a file that does not reproduce it is not kept.

    Example: keiryo export cnn.pt --format onnx --out cnn.onnx --data digits
    Example: keiryo export pruned-llama.pt --format hf --out pruned-llama/
    """
    check_target(out, format)
    if format != "hf":  # a Hugging Face export is a folder, which check_target has checked
        check_output(out, inputs=[model_file, data_path(data_source)])
    model = artifacts.load(model_file, trust_code=trust_code)
    splits = data.load_data(data_source, seed=seed) if data_source else None
    check_fits(model, splits)
    # a Hugging Face folder can be checked on its weights alone; every other format runs example inputs
    weights_only = format == "hf" and splits is None and "input_shape" not in provenance.metadata_of(model)
    example = None if weights_only else example_inputs(model, splits, batch_size, seed, str(model_file))
    result = export_model(model, example, out, format)
    console.print(f"exported {model_file} → {result.path} ({format}, {report.human_bytes(result.bytes)})")
    console.print(
        f"max |exported − PyTorch| ({result.output}{'' if weights_only else ' on a fresh batch'}), "
        f"from the written file: {result.max_error:.2e}"
    )
    if result.runtime_p50_ms is not None and result.torch_p50_ms is not None:
        speed = result.torch_p50_ms / result.runtime_p50_ms
        console.print(
            f"latency at batch {batch_size}: {format} {result.runtime_p50_ms:.3f} ms, PyTorch "
            f"{result.torch_p50_ms:.3f} ms ({speed:.2f}× {'faster' if speed >= 1 else 'slower'} than PyTorch)"
        )


def hf_folder(
    model_dir: Annotated[Path, typer.Argument(help="A local Hugging Face model folder (config.json...).")],
    out: ModelOutOpt = Path("hf-model.pt"),
    texts: Annotated[
        Path | None, typer.Option(help="Text file, one text per line, to measure on (default: 8 samples).")
    ] = None,
    data_out: Annotated[
        Path | None,
        typer.Option("--data-out", help="Write the texts' token ids and outputs as a .pt file for --data."),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(
            help="embedding | classifier | causal-lm | image-classifier | base (default: from the config)."
        ),
    ] = None,
    layers: Annotated[
        int | None, typer.Option(min=1, help="Keep this many encoder layers, evenly spaced.")
    ] = None,
    intermediate_size: Annotated[
        int | None, typer.Option(min=1, help="Keep this many feed-forward neurons per layer.")
    ] = None,
    max_length: Annotated[int, typer.Option(min=1, help="Truncate texts to this many tokens.")] = 128,
    runs: RunsOpt = 30,
    threads: ThreadsOpt = None,
) -> None:
    """Turn a Hugging Face model folder into a keiryo model file, offline, and measure it on texts.

    The file works with every command that takes a model file; give them the --data-out file as --data:
    keiryo bench/prune/export MODEL --data TOKENS.pt, and
    keiryo distill --teacher MODEL --student hf:DIR -a layers=3 --loss cosine --data TOKENS.pt.

    Example: keiryo hf ./all-MiniLM-L6-v2 --texts sentences.txt --out minilm.pt --data-out sentences.pt
    """
    check_output(out, inputs=[texts])
    if data_out is not None:
        check_output(data_out, "--data-out", inputs=[texts])
        if same_path(out, data_out):
            raise ConfigError("--out and --data-out are the same file; give each its own path")
    options = {"task": task, "layers": layers, "intermediate_size": intermediate_size}
    kwargs = {key: value for key, value in options.items() if value is not None}
    lines = hf_text.read_texts(texts) if texts else list(hf_text.SAMPLE_TEXTS)
    model = models.build_model(f"hf:{model_dir}", max_length=max_length, **kwargs)
    tokens = hf_text.text_example(model, lines, max_length)
    kind = model.task if isinstance(model, HFModel) else task_of(model.config)
    length = inputs.tensors(tokens)[0].shape[-1]
    metadata = {"source": str(model_dir.resolve()), "task": kind, "sequence_length": length}
    with staged(out, data_out) as (staged_out, data_staged):
        save(model, staged_out, out, metadata)
        if data_out and data_staged:
            hf_text.write_text_data(model, lines, data_staged)
        timing = Timing(runs=runs, batch_sizes=(1, len(lines)), threads=threads)
        result = compare({model_dir.name: model}, tokens, timing=timing)
        report.print_report(result, title=f"keiryo hf ({kind}, {len(lines)} texts)", console=console)
    wrote = f" · data {data_out}" if data_out else ""
    console.print(f"saved {out} ({size(out)}){wrote}")
