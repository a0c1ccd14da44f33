"""Every ``pluto`` command and every one of its long options is named in the README or in
``docs/``, and so is every ``PLUTO_*`` environment variable the code names: a flag or a
variable added without a word in the docs fails here."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from pluto.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def documentation() -> str:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return "\n".join(page.read_text() for page in pages)


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...],
             ) -> Iterator[tuple[str, list[str]]]:
    """(``pluto sub command``, its long options) for every command, subcommands included."""
    options: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))
        else:
            options += [o for o in action.option_strings if o.startswith("--") and o != "--help"]
    yield " ".join(path), options


COMMANDS = dict(commands(build_parser(), ("pluto",)))


def test_the_walk_finds_the_commands() -> None:
    assert {"pluto sidecar", "pluto server", "pluto checkpoints fork", "pluto keys create",
            "pluto operator"} <= set(COMMANDS)
    assert "--spool-dir" in COMMANDS["pluto sidecar"]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_and_option_is_documented(command: str) -> None:
    docs = documentation()
    assert command in docs, f"`{command}` is not in README.md or docs/"
    missing = [option for option in COMMANDS[command] if option not in docs]
    assert not missing, f"`{command}` options not in README.md or docs/: {missing}"


#: Where the code that reads (or sets, for the pods it mutates) the environment lives.
PACKAGES = ("pluto", "sidecar", "server", "operator")


def environment_variables() -> set[str]:
    named: set[str] = set()
    for package in PACKAGES:
        for source in (ROOT / package).rglob("*.py"):
            named |= set(re.findall(r"""["'](PLUTO_[A-Z0-9_]+)["']""", source.read_text()))
    return named


def test_each_environment_variable_is_documented() -> None:
    named = environment_variables()
    assert {"PLUTO_URL", "PLUTO_RUN_ID", "PLUTO_SIDECAR_SOCKET"} <= named
    docs = documentation()
    missing = sorted(name for name in named if name not in docs)
    assert not missing, f"environment variables not in README.md or docs/: {missing}"
