"""The `keiryo` command: parse, call the public API, print. Errors are caught once, in `main`.

One module per command group (train; quantize, prune, distill, optimize; bench, export, hf; run, demo; env);
`options` holds the shared options and `outputs` the checks and staged writes that make a failed run lose
nothing.
"""

from __future__ import annotations

import os
import sys
import warnings

import typer

from keiryo.cli import bench, compress, deploy, env, lm, recipes, train
from keiryo.errors import KeiryoError, one_line
from keiryo.interrupts import SigintWatch, interrupted, uninstall

app = typer.Typer(
    name="keiryo",
    help="Faster PyTorch training and lighter models, with the measurements to prove both.\n\n"
    "Start with `keiryo demo`; every command takes --help with an example.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
COMMANDS = {
    "train": train.train,
    "bench": bench.bench,
    "prune": compress.prune,
    "export": bench.export,
    "optimize": compress.optimize,
    "distill": compress.distill,
    "hf": bench.hf_folder,
    "quantize": compress.quantize,
    "deploy": deploy.deploy_command,
    "run": recipes.run,
    "demo": recipes.demo,
    "env": env.env,
}
for _name, _command in COMMANDS.items():
    app.command(_name)(_command)
app.add_typer(lm.app, name="lm")

# Libraries' notes to their own developers (deprecations inside torch, exporter tips) would break the one-line
# output of a command; KEIRYO_DEBUG=1 shows them.
LIBRARY_WARNINGS = r"(torch|torchao|torch_pruning|onnx|onnxruntime|onnxscript)(\.|$)"


def _say(line: str) -> None:
    """One line on stderr, never wrapped (rich would wrap a long message at the terminal's width)."""
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run a command and return its exit code (the console script exits with it).

    User errors print one line (`error: ...`) and return 2; Ctrl-C prints `interrupted` and returns 130;
    anything else is a keiryo bug: one line and 1 (KEIRYO_DEBUG=1 shows the traceback instead).
    """
    watch = SigintWatch.install()  # None when `python -m keiryo` installed one already
    try:
        with warnings.catch_warnings():
            if not os.environ.get("KEIRYO_DEBUG"):
                warnings.filterwarnings("ignore", module=LIBRARY_WARNINGS)
            return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    finally:
        uninstall(watch)


def _dispatch(args: list[str]) -> int:
    command = typer.main.get_command(app)
    try:
        # typer's own `main` turns Ctrl-C into a silent exit 130; run the command here and say so instead.
        with command.make_context("keiryo", args) as ctx:
            command.invoke(ctx)
    except typer.Exit as exc:  # --help
        return exc.exit_code
    except typer.Abort:
        _say("interrupted")
        return 130
    except typer.TyperException as exc:  # usage errors: unknown command or option, bad option value
        if type(exc).__name__ == "NoArgsIsHelpError":  # plain `keiryo`: the help (typer has printed it)
            if exc.format_message().strip():
                print(exc.format_message(), file=sys.stderr)
            return 2
        context = getattr(exc, "ctx", None)
        where = context.command_path if context is not None else "keiryo"
        _say(f"error: {' '.join(exc.format_message().split())} (see: {where} --help)")
        return getattr(exc, "exit_code", 2)
    except Exception as exc:
        if interrupted():  # a Ctrl-C that a library turned into another error (see SigintWatch)
            _say("interrupted")
            return 130
        if isinstance(exc, KeiryoError):
            _say(f"error: {one_line(exc, limit=1000)}")
            return 2
        if os.environ.get("KEIRYO_DEBUG"):
            raise
        _say(f"error: unexpected {one_line(exc, limit=300)} (set KEIRYO_DEBUG=1 for the traceback)")
        return 1
    return 0
