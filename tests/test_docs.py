"""The docs say what the code does: a generated config table, every command in the contract."""

import subprocess
import sys
from pathlib import Path

import typer

from cectl.cli import app

ROOT = Path(__file__).resolve().parents[1]


def test_the_config_table_in_docs_matches_the_config_dataclasses():
    check = subprocess.run([sys.executable, ROOT / "docs" / "config_table.py", "--check"])
    assert check.returncode == 0, "stale: run `python docs/config_table.py`"


def test_every_command_and_option_is_in_the_command_line_contract():
    contract = (ROOT / "docs" / "cli.md").read_text()
    sections = [part.partition("\n") for part in contract.split("\n### ")[1:]]
    commands = []
    for name, command in typer.main.get_command(app).commands.items():
        subcommands = getattr(command, "commands", {})
        commands += [(f"{name} {sub}", c) for sub, c in subcommands.items()] or [(name, command)]
    assert len(commands) > 10
    missing = []
    for name, command in commands:
        group, _, sub = name.rpartition(" ")
        [body] = [heading + body for heading, _, body in sections
                  if f"cectl {name}" in heading or group and f"cectl {group}" in heading
                  and f"`{sub}" in heading] or [""]
        options = [opt for param in command.params for opt in param.opts if opt[0] == "-"]
        if not body:
            missing.append(f"cectl {name}")
        missing += [f"cectl {name} {option}" for option in options if option not in body]
    assert missing == []
