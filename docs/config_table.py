"""The table of job config keys in docs/train.md, generated from cectl.config's dataclasses.

    python docs/config_table.py           # rewrite the table in docs/train.md
    python docs/config_table.py --check   # exit 1 if the table is stale

Each row: the key, its type (an enum's choices), its default and the comment on its line
in cectl/schema.py. tests/test_docs.py fails when the table and the code disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import inspect
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cectl.schema import JobConfig  # noqa: E402

DOC = Path(__file__).with_name("train.md")
BEGIN, END = "<!-- config-table:begin -->", "<!-- config-table:end -->"
COMMENT = re.compile(r"^\s+(\w+):[^#\n]*#\s*(.+)$", re.M)


def _type(kind: object) -> str:
    if inspect.isclass(kind) and issubclass(kind, enum.Enum):
        return " \\| ".join(member.value for member in kind)
    return getattr(kind, "__name__", str(kind))


def _default(value: object) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if value == "":
        return '`""`'
    whole = isinstance(value, int) and not isinstance(value, bool)
    return f"`{value:_}`" if whole else f"`{value}`"


def table() -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    hints = {f.name: f for f in dataclasses.fields(JobConfig)}
    for section, section_field in hints.items():
        cls = section_field.default_factory
        comments = dict(COMMENT.findall(inspect.getsource(cls)))
        defaults = cls()
        types = inspect.get_annotations(cls, eval_str=True)
        for f in dataclasses.fields(cls):
            rows.append(f"| `{section}.{f.name}` | {_type(types[f.name])} | "
                        f"{_default(getattr(defaults, f.name))} | {comments.get(f.name, '')} |")
    return "\n".join(rows)


def render(text: str) -> str:
    """`text` with the table between the markers replaced by the current one."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return f"{text[:start]}\n{table()}\n{text[end:]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = DOC.read_text()
    if args.check:
        sys.exit(0 if render(text) == text else 1)
    DOC.write_text(render(text))


if __name__ == "__main__":
    main()
