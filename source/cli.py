"""Command-line pieces every script shares: the help formatter, boolean options, model paths.

Imports neither torch nor numpy, so the torch-free serving path (PREDICT_BACKEND=onnx) can use it.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_MODEL_PATH = "metadata/models/model.pth"

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after every option; the docstring's examples kept as written."""

    def _format_action_invocation(self, action):
        if isinstance(action, FlagAction):  # --flag [true|false], --no-flag (no value)
            positive = [s for s in action.option_strings if not s.startswith("--no-")]
            negative = [s for s in action.option_strings if s.startswith("--no-")]
            return ", ".join([f"{s} [{action.metavar}]" for s in positive] + negative)
        return super()._format_action_invocation(action)


def parse_bool(value: str | bool) -> bool:
    """'true'/'false' (and yes/no, on/off, 1/0) for options given a value."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def default_model_path() -> str:
    """The model every script reads unless told otherwise: $MODEL_URI (an MLflow URI such as
    models:/NAME@candidate, or a path), else $MODEL_PATH, else the default checkpoint."""
    return os.environ.get("MODEL_URI") or os.environ.get("MODEL_PATH") or DEFAULT_MODEL_PATH


def quiet_broken_pipe(main, argv=None) -> int:
    """Run `main(argv)`; a closed stdout (`... | head`) ends the script quietly, as `cat` does."""
    try:
        code = main(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at devnull so that raises nothing.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


class FlagAction(argparse.Action):
    """A boolean option that works as `--flag`, `--no-flag` and `--flag true|false`
    (argparse's BooleanOptionalAction, plus an explicit value).

    `extra` names further values an option accepts beside true and false, e.g. ("auto",)
    for `--resume auto`; they are stored as the lower-case string. Bare `--flag` stores
    True, `--no-flag` False, and the default stays as given (argparse.SUPPRESS included).
    """

    def __init__(self, option_strings, dest, default=None, extra=(), help=None, **kwargs):
        negatives = ["--no-" + s[2:] for s in option_strings if s.startswith("--")]
        self.extra = tuple(extra)
        values = "|".join(("true", "false", *self.extra))
        kwargs.setdefault("metavar", values)
        super().__init__(
            [*option_strings, *negatives], dest, nargs="?", default=default, help=help, **kwargs
        )

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string and option_string.startswith("--no-"):
            if values is not None:
                raise argparse.ArgumentError(self, f"{option_string} takes no value")
            value = False
        elif values is None:
            value = True
        elif str(values).strip().lower() in self.extra:
            value = str(values).strip().lower()
        else:
            try:
                value = parse_bool(values)
            except argparse.ArgumentTypeError as err:
                choices = ", ".join(("true", "false", *self.extra))
                raise argparse.ArgumentError(self, f"{err} (one of {choices})") from None
        setattr(namespace, self.dest, value)

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)
