"""Untrusted inputs (issue 17, part B): crafted checkpoints and state files, sweep stores,
the shard cache, user text on the terminal, odd command-line values. Each ends in one
sentence (exit 2 for bad input, 1 for a failure) and writes nothing where it should not."""

from __future__ import annotations

import shutil
from pathlib import Path

from helpers import cectl

from cectl.cli.app import run


def one_sentence(text: str) -> bool:
    """Whether stderr holds a single error line and no traceback."""
    lines = [line for line in text.splitlines() if line.strip()]
    return len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in text


# 7. User text on the terminal is printed literally, by every command that prints it.

def test_every_command_prints_markup_in_paths_literally(tiny_checkpoint, tmp_path, capsys):
    from cectl.demo import make_facades

    odd = tmp_path / "[" / "x]"  # "[/x]" in every path below: a closing tag rich refuses
    images = make_facades(odd / "images", 12, size=72)
    store = odd / "store"
    shutil.copytree(Path(tiny_checkpoint).parents[3], store)  # holds the run "tiny"
    ckpt = store / "runs" / "tiny" / "checkpoints" / "step-000004"
    shards = odd / "shards"
    commands = {
        "shard": ["shard", odd / "images", shards, "--resize", "0", "--workers", "1"],
        "verify": ["verify", shards],
        "eval": ["eval", ckpt, "--data", shards, "--split", "train"],
        "export": ["export", ckpt, "-o", odd / "enc.safetensors"],
        "inpaint": ["inpaint", images[0], "--ckpt", ckpt, "-o", odd / "filled.png"],
        "runs": ["runs", "--store", store],
        "pull": ["pull", "tiny", "--store", store, "--dest", odd / "pulled"],
        "neighbors": ["neighbors", ckpt, "--data", shards, "--query", images[1], "-k", "2",
                      "-o", odd / "grid.png"],
    }
    for name, args in commands.items():
        code = run([str(a) for a in args])
        printed = capsys.readouterr()
        assert code == 0, f"{name}: {printed.err}"
        assert "[/x]" in " ".join((printed.out + printed.err).split()), name


# 13. Command-line values: one sentence, not a usage box; folders are not images.

def test_a_bad_option_value_is_one_sentence_with_exit_2(tmp_path, capsys):
    code = run(["shard", str(tmp_path), str(tmp_path / "out"), "--quality", "abc"])
    printed = capsys.readouterr()
    assert code == 2 and one_sentence(printed.err), printed.err
    assert "--quality" in printed.err and "integer" in printed.err
    assert not (tmp_path / "out").exists()


def test_an_unknown_option_is_one_sentence_and_help_still_prints(capsys):
    assert run(["verify", "x", "--colour"]) == 2
    printed = capsys.readouterr()
    assert one_sentence(printed.err) and "--colour" in printed.err
    assert run(["verify", "--help"]) == 0
    assert "Re-read every shard" in capsys.readouterr().out


def test_a_folder_given_as_a_query_image_is_named_as_a_folder(tiny_checkpoint, tmp_path):
    for args in (["neighbors", tiny_checkpoint, "--data", tmp_path, "--query", tmp_path],
                 ["inpaint", tmp_path, "--ckpt", tiny_checkpoint]):
        result = cectl(*args)
        assert result.returncode == 2 and one_sentence(result.stderr), result.stderr
        assert "is a folder, not an image" in result.stderr
        assert "does not exist" not in result.stderr
