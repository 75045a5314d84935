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
    """The checkpoint every script reads unless told otherwise: $MODEL_PATH, else the default."""
    return os.environ.get("MODEL_PATH") or DEFAULT_MODEL_PATH


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
