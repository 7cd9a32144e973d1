"""Every ``python -m segm...`` / ``python -m algm...`` command in the docs and job scripts parses with the
current click commands, so the documentation cannot drift from the code."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import click
import pytest

from segm.cli import expand_multi_value_options

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = ["README.md", "TRAINING.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "jobs").glob("*.sbatch"))]
COMMAND = re.compile(r"-m ((?:segm|algm)\.[\w.]+)([^\n`|;&)]*)")
FLAG_BUNDLE = re.compile(r"\"?\$\{?(?:REDUCTION|EXTRA|@)(?::-[^}]*)?\}?\"?")
VARIABLE = re.compile(r"\$\{?\w+(?::-[^}]*)?\}?")


def doc_commands() -> list[tuple[str, str, str]]:
    """(file, module, argument string) of every documented command, shell line continuations joined."""
    found = []
    for name in DOC_FILES:
        text = (ROOT / name).read_text().replace("\\\n", " ")
        for match in COMMAND.finditer(text):
            if match.group(2).strip():  # a bare module name is a reference, not an invocation
                found.append((name, match.group(1), match.group(2)))
    return found


def command_of(module: str) -> click.Command:
    """The click command ``python -m module`` runs (a package runs its ``__main__``)."""
    imported = importlib.import_module(module)
    if not hasattr(imported, "main") and hasattr(imported, "__path__"):
        imported = importlib.import_module(f"{module}.__main__")
    cmd = getattr(imported, "main", None)
    assert isinstance(cmd, click.Command), f"{module} has no click command 'main'"
    return cmd


def parse(module: str, argument_string: str) -> None:
    """Parse like the shell would (variables become '1'; the flag bundles $REDUCTION, $EXTRA and "$@", checked
    separately, are dropped), then let click parse and validate the arguments."""
    args = FLAG_BUNDLE.sub(" ", argument_string.split("#")[0])
    args = VARIABLE.sub("1", args)
    cmd = command_of(module)
    with cmd.make_context(module, expand_multi_value_options(shlex.split(args))):
        pass


@pytest.mark.parametrize("source,module,arguments", doc_commands())
def test_documented_command_parses(source, module, arguments):
    try:
        parse(module, arguments)
    except click.UsageError as err:
        pytest.fail(f"{source}: python -m {module}{arguments}\n{err.format_message()}")


def test_docs_contain_the_main_commands():
    modules = {module for _, module, _ in doc_commands()}
    assert {"segm.train", "segm.eval.miou", "segm.speedtest", "segm.flops", "segm.calibrate", "segm.vis"} <= modules


@pytest.mark.parametrize("module", ["segm.train", "segm.eval.miou", "segm.speedtest", "segm.flops"])
def test_job_settings_flags_parse(module):
    settings = (ROOT / "jobs" / "settings.sh").read_text()
    reductions = re.findall(r'REDUCTION="([^"]*)"', settings)
    assert len(reductions) == 12
    required = {"segm.train": "--log-dir x --dataset ade20k --backbone vit_small_patch16_384 --decoder linear",
                "segm.eval.miou": "x ade20k", "segm.speedtest": "", "segm.flops": ""}[module]
    for flags in reductions:
        parse(module, f"{required} {flags}")
