"""The README stays a short user guide, and every command it or a docstring shows parses.

Each `python source/...` (and `benchmarks/...`) example in README.md and in the docstrings of
the scripts, and each `make TARGET ARGS="..."` / `torchrun ... source/...` example of the
README, runs as typed with `--help` appended. Plain `--help` is not enough: argparse prints the
help and exits 0 the moment it meets `--help`, so `--no-such-option --help` passes. The runner
below defers the help action until the whole command line has parsed, so an unknown option, a
bad value or a missing required argument fails the example (exit 2); only then is the help
printed. Parsing reads no data, so examples that name data the test machine lacks are checked
too. Examples of one script run in one process (torch is imported once per script).
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import ROOT

README = ROOT / "README.md"
README_MAX_LINES = 300
SCRIPT_DIRS = ("source", "benchmarks")
# A script path followed by ":" or "," is prose about the script, not a command.
SCRIPT = r"(?:source|benchmarks)/[\w/]+\.py(?=\s|$|`)"
# `python` (any prefix: .venv/bin/python, python3) or `torchrun [its options]`, then a script.
COMMAND = re.compile(
    rf"(?:\S*python3?|torchrun(?:\s+--?[\w-]+(?:[ =](?!source/|benchmarks/)\S+)?)*)\s+({SCRIPT})([^`]*)"
)
MAKE = re.compile(r"\bmake\s+([\w-]+)\s+ARGS=\"([^\"]*)\"")
# Where the shell, not the script, takes over: comments, redirection, pipes, chaining.
SHELL_END = re.compile(r"\s(?:#|>|\||&&|;)|`")

# Runs in a subprocess: argv[1] a JSON list of [script, arguments], argv[2] the file for the
# JSON list of outcomes ([exit code, stderr] each). One process for many scripts: torch and
# the other heavy imports load once.
RUNNER = r"""
import argparse, contextlib, io, json, os, runpy, sys

examples, out = json.loads(sys.argv[1]), sys.argv[2]
path = list(sys.path)
helped = []


class Parsed(BaseException):
    "Raised once a command line with --help has parsed: the script's work never starts."


def deferred_help(self, parser, namespace, values, option_string=None):
    helped.append(parser)


original = argparse.ArgumentParser.parse_args


def parse_args(self, args=None, namespace=None):
    result = original(self, args, namespace)  # unknown options and bad values exit 2 here
    if any(p is self for p in helped):
        self.format_help()  # the help text itself must format
        raise Parsed
    return result


argparse._HelpAction.__call__ = deferred_help
argparse.ArgumentParser.parse_args = parse_args
outcomes = []
for script, argv in examples:
    helped.clear()
    sys.path[:] = [os.path.dirname(os.path.abspath(script)), *path]  # as `python script` has it
    sys.argv = [script, *argv, "--help"]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(script, run_name="__main__")
        code = "the script returned without parsing its command line"
    except Parsed:
        code = 0
    except SystemExit as exit:
        code = exit.code
    outcomes.append([code, err.getvalue()[-2000:]])
with open(out, "w") as f:
    json.dump(outcomes, f)
"""


@dataclass
class Example:
    script: str  # relative to the repo root
    args: tuple[str, ...]
    where: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return " ".join([self.script, *self.args])


def command_lines(text: str) -> list[str]:
    """Lines of `text` with shell continuations (a trailing backslash) joined."""
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def examples_in(text: str) -> list[tuple[str, list[str]]]:
    """(script, arguments) of every `python SCRIPT ...` / `torchrun ... SCRIPT ...` in text."""
    found = []
    for line in command_lines(text):
        for match in COMMAND.finditer(line):
            rest = SHELL_END.split(match.group(2), maxsplit=1)[0]
            # `...` and `[...]` stand for "more options" in prose, not for an argument.
            args = [a for a in shlex.split(rest) if a != "..." and not a.startswith("[")]
            found.append((match.group(1), args))
    return found


def make_targets() -> dict[str, str]:
    """Makefile target -> the script its recipe runs with $(ARGS)."""
    text = (ROOT / "Makefile").read_text()
    return dict(re.findall(rf"^([\w-]+):.*\n\t\$\(PYTHON\) ({SCRIPT}) \$\(ARGS\)", text, re.M))


def docstrings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    nodes = [
        n for n in ast.walk(tree) if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef)
    ]
    return [doc for n in nodes if (doc := ast.get_docstring(n))]


def collect() -> list[Example]:
    found: dict[tuple, Example] = {}

    def add(script: str, args: list[str], where: str) -> None:
        example = found.setdefault((script, tuple(args)), Example(script, tuple(args)))
        example.where.append(where)

    readme = README.read_text()
    for script, args in examples_in(readme):
        add(script, args, "README.md")
    targets = make_targets()
    for line in command_lines(readme):
        for target, args in MAKE.findall(line):
            if target in targets:
                add(targets[target], shlex.split(args), f"README.md (make {target})")
    for folder in SCRIPT_DIRS:
        for path in sorted((ROOT / folder).glob("*.py")):
            for doc in docstrings(path):
                for script, args in examples_in(doc):
                    add(script, args, f"{folder}/{path.name}")
    return sorted(found.values(), key=lambda e: e.id)


def run_examples(examples: list[tuple[str, list[str]]], out: Path) -> list:
    """[exit code, stderr] of each (script, arguments) with --help appended, in one process."""
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(examples), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if not out.exists():  # the runner itself died (an import error in the script, ...)
        return [[f"runner exit {proc.returncode}", proc.stderr[-2000:]]] * len(examples)
    return json.loads(out.read_text())


EXAMPLES = collect()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, list]:
    tmp = tmp_path_factory.mktemp("examples")
    scripts = sorted({e.script for e in EXAMPLES})
    # Two processes (the test machines have 2 cores), each taking every other script.
    chunks = [[e for e in EXAMPLES if e.script in scripts[i::2]] for i in range(2)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [
            pool.submit(run_examples, [(e.script, list(e.args)) for e in chunk], tmp / f"{i}.json")
            for i, chunk in enumerate(chunks)
        ]
    return {
        example.id: outcome
        for chunk, future in zip(chunks, futures, strict=True)
        for example, outcome in zip(chunk, future.result(), strict=True)
    }


def test_examples_are_found():
    ids = {e.id for e in EXAMPLES}
    assert len(EXAMPLES) >= 30
    assert "source/train.py --resume" in ids  # README and train.py's docstring
    assert "source/train.py --preset birds --data path/to/birds" in ids  # make train ARGS=...
    assert any(e.script.startswith("benchmarks/") for e in EXAMPLES)
    assert any(w == "source/config.py" for e in EXAMPLES for w in e.where)  # preset docstrings


def test_extraction_of_shell_lines():
    text = """
    make serve    # = .venv/bin/python source/serve.py
    python source/predict.py images/ --topk 3 --format csv > predictions.csv
    `python source/train.py --seed S`, then torchrun --nproc_per_node 4 source/train.py \\
        --preset birds ...
    X=1 .venv/bin/python benchmarks/speed.py --quick | head   # comment
    """
    assert examples_in(text) == [
        ("source/serve.py", []),
        ("source/predict.py", ["images/", "--topk", "3", "--format", "csv"]),
        ("source/train.py", ["--seed", "S"]),
        ("source/train.py", ["--preset", "birds"]),
        ("benchmarks/speed.py", ["--quick"]),
    ]


def test_the_runner_fails_an_unknown_option_and_a_bad_value(tmp_path):
    """What plain `--help` would let through: the check this file exists for can fail."""
    script = "source/predict.py"
    unknown, bad_value, good = run_examples(
        [
            (script, ["x.png", "--no-such-option"]),
            (script, ["x.png", "--topk", "three"]),
            (script, ["x.png", "--topk", "3"]),
        ],
        tmp_path / "out.json",
    )
    assert unknown[0] == 2 and "--no-such-option" in unknown[1]
    assert bad_value[0] == 2 and "three" in bad_value[1]
    assert good[0] == 0, good[1]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.id)
def test_example_parses(example, outcomes):
    code, stderr = outcomes[example.id]
    assert code == 0, f"`python {example.id}` (from {', '.join(example.where)}): {code}\n{stderr}"


# Scripts whose options are Config fields: their values are checked after parsing (types,
# choices, ranges), which `python source/config.py ARGS` does without training.
CONFIG_SCRIPTS = ("source/train.py", "source/config.py")


@pytest.mark.parametrize(
    "example",
    [e for e in EXAMPLES if e.script in CONFIG_SCRIPTS and "--help" not in e.args],
    ids=lambda e: e.id,
)
def test_training_example_has_a_valid_config(example, capsys):
    import config

    try:
        code = config.main(list(example.args))
    except SystemExit as exit:  # argparse: an unknown option or a missing value
        code = exit.code
    assert (
        code == 0
    ), f"`python {example.id}` ({', '.join(example.where)}): {capsys.readouterr().err}"


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move details to docs/"


def test_module_map_names_every_module():
    text = README.read_text()
    section = text.split("\n## Module map", 1)[1].split("\n## ", 1)[0]
    mapped = set(re.findall(r"^\| `(\w+)\.py` \|", section, re.M))
    modules = {p.stem for p in (ROOT / "source").glob("*.py")}
    assert not modules - mapped, f"README's module map lacks {sorted(modules - mapped)}"


def test_readme_links_resolve():
    for target in re.findall(r"\]\(((?!https?:|#)[^)#]+)", README.read_text()):
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
