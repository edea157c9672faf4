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


def test_every_command_is_in_the_command_line_contract():
    contract = (ROOT / "docs" / "cli.md").read_text()
    commands = []
    for name, command in typer.main.get_command(app).commands.items():
        commands += [f"{name} {sub}" for sub in getattr(command, "commands", {})] or [name]
    assert len(commands) > 10
    missing = [c for c in commands
               if f"cectl {c}" not in contract and f"`{c.split()[-1]}" not in contract]
    assert missing == []
