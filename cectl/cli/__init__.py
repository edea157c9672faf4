"""The `cectl` command line: a thin layer that parses arguments and calls the stages.

`app.py` holds the Typer app, the shared options and the entry point; the other files
one group of commands each (prepare, training, using, cluster, demo).
"""

# Imported for their commands, in the order `cectl --help` lists them.
from cectl.cli import prepare, training, using, cluster, demo  # noqa: F401, I001
from cectl.cli.app import app, main, run

__all__ = ["app", "main", "run"]
