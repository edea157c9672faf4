"""Everything cectl shows on a terminal: progress bars, summaries, tables, errors.

Both consoles print text literally (`markup=False`): paths, run names and messages come
from users, and `[/x]` in a run name must print as itself, not as rich markup. Styles are
given as `Text` styles instead. The report goes to stdout (`out`), progress and chatter
to stderr (`err`), so that `--json` stdout is JSON alone.
"""

from __future__ import annotations

import json
import math

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.status import Status
from rich.table import Table
from rich.text import Text

out = Console(markup=False)
err = Console(stderr=True, markup=False)

EVAL_ROWS = (("model", "context encoder"), ("mean_fill", "mean-colour fill"),
             ("nearest_neighbour", "NN inpainting (model features)"))


def _finite(value):
    """NaN and infinities as null: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def print_json(value: object) -> None:
    """`--json` output on stdout: strict JSON (non-finite numbers become null)."""
    print(json.dumps(_finite(value), indent=2, allow_nan=False))


def status(console: Console, message: str) -> Status:
    """A spinner with `message`, printed literally (a `str` status would be read as markup)."""
    return console.status(Text(message))


def error(console: Console, message: str) -> None:
    console.print(Text.assemble(("error:", "red"), " ", message), highlight=False,
                  soft_wrap=True)


def warning(console: Console, label: str, message: str) -> None:
    console.print(Text.assemble((label, "yellow"), " ", message), highlight=False)


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:,.0f} img/s", style="progress.data.speed")


def item_progress(console: Console) -> Progress:
    """A bar over images or shards: description, count, images/s, time left."""
    return Progress(TextColumn("{task.description}", markup=False), BarColumn(),
                    MofNCompleteColumn(), _RateColumn(), TimeRemainingColumn(),
                    console=console)


class TrainProgress:
    """A live display of step, images/s, losses and ETA, fed with `update(step, metrics)`."""

    def __init__(self, console: Console, total: int):
        self.progress = Progress(
            TextColumn("step"), MofNCompleteColumn(), BarColumn(),
            TextColumn("{task.fields[rate]} img/s  {task.fields[losses]}"),
            TimeRemainingColumn(), console=console)
        self.task = self.progress.add_task("train", total=total, rate="-", losses="")

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def update(self, step: int, metrics: dict) -> None:
        if "resized_from" in metrics:
            self.progress.console.print(f"resized from {metrics['resized_from']} to "
                                        f"{metrics['world']} workers at step {step}")
        if "resumed" in metrics:
            self.progress.console.print(f"resuming from step {step}")
        fields = {}
        if "images_per_s" in metrics:
            fields["rate"] = f"{metrics['images_per_s']:,.1f}"
            fields["losses"] = "  ".join(f"{k[5:]} {v:.4f}" for k, v in metrics.items()
                                         if k.startswith("loss_"))
        self.progress.update(self.task, completed=step, **fields)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def shard_summary(console: Console, manifest: dict, dst: str) -> None:
    table = Table(title=Text(f"shards in {dst}"))
    for column in ("split", "images", "shards", "bytes"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, info in manifest["splits"].items():
        table.add_row(split, f"{info['samples']:,}", str(len(info["shards"])), _mb(info["bytes"]))
    totals = manifest["totals"]
    table.add_row("total", f"{totals['samples']:,}", str(totals["shards"]), _mb(totals["bytes"]),
                  style="bold")
    console.print(table)
    skipped = ", ".join(f"{n} {reason}" for reason, n in manifest["skipped"].items()) or "none"
    console.print(f"skipped: {skipped}")
    stats = manifest["stats"]
    console.print(f"{stats['processed']:,} images processed in {stats['seconds']:.1f} s "
                  f"({stats['images_per_s']:,.0f} images/s); {stats['kept_shards']} shards "
                  "kept from an earlier run")


def mask_set(console: Console, masks: dict) -> None:
    """A mask set read for training (`MaskFiles.report`): each skipped file, then counts."""
    for skipped in masks["skipped_files"]:
        warning(console, "skipped", f"{skipped['path']}: {skipped['detail']}")
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(masks["skipped"].items()))
    console.print(f"masks: {masks['masks']:,} from {masks['source']} (skipped: "
                  f"{reasons or 'none'})")


def train_summary(console: Console, summary: dict) -> None:
    metrics = "  ".join(f"{k} {v:.4g}" for k, v in summary["metrics"].items())
    workers = summary["workers"]
    console.print(f"run {summary['run']} reached step {summary['step']} on {workers} "
                  f"worker{'s' if workers > 1 else ''} in {summary['seconds']:.1f} s "
                  f"({summary['resumes']} resume(s) from a checkpoint, "
                  f"{summary['resizes']} resize(s))")
    console.print(f"last metrics: {metrics}")
    console.print(f"checkpoints: {summary['checkpoints']}")


def runs_table(summaries: list[dict], uri: str) -> Table:
    table = Table(title=Text(f"runs in {uri}"))
    for column in ("run", "step", "of", "state", "loss_rec", "val_psnr_db"):
        table.add_column(column)
    for summary in summaries:
        if summary["step"] is None:
            table.add_row(Text(summary["run"]), "-", "-", "no checkpoint yet", "", "")
            continue
        metrics = summary["metrics"]
        table.add_row(Text(summary["run"]), str(summary["step"]), str(summary["target_steps"]),
                      "finished" if summary["step"] >= summary["target_steps"]
                      else "stopped or running",
                      f"{metrics.get('loss_rec', float('nan')):.4f}",
                      f"{metrics.get('val_psnr_db', float('nan')):.2f}")
    return table


def score_report(console: Console, result: dict, title: str) -> None:
    """The model's scores next to the baselines', and a line for each metric left out."""
    extra = [(key, label) for key, label in (("lpips", "LPIPS"), ("fid", "FID"))
             if key in result["model"]]
    table = Table(title=Text(title))
    for column in ("", "mean L1 %", "mean L2 %", "PSNR dB", "SSIM", *(name for _, name in extra)):
        table.add_column(column, justify="right")
    for key, label in EVAL_ROWS:
        if key in result:
            m = result[key]
            table.add_row(label, f"{m['l1_pct']:.2f}", f"{m['l2_pct']:.2f}",
                          f"{m['psnr_db']:.2f}", f"{m['ssim']:.3f}",
                          *(f"{m[k]:.3f}" if k == "lpips" else f"{m[k]:.2f}" for k, _ in extra))
    console.print(table)
    for reason in result.get("unavailable", {}).values():
        console.print(f"not computed: {reason}", soft_wrap=True)


def trials_table(result: dict) -> Table:
    table = Table(title=Text(f"sweep {result['name']}: trials by {result['metric']}"))
    for column in ("trial", *result["space"], "step", result["metric"]):
        table.add_column(Text(column))
    for t in result["trials"]:
        metric = "error" if t["error"] else ("-" if t["metric"] is None else f"{t['metric']:.4f}")
        table.add_row(t["trial"], *(f"{v:.4g}" if isinstance(v, int | float) else str(v)
                                    for v in t["params"].values()),
                      str(t["step"] or "-"), metric)
    return table


def probe_report(console: Console, result: dict) -> None:
    console.print(f"linear probe of {result['layer']} ({result['dims']:,} dims): "
                  f"{result['classes']} classes, {result['train_images']:,} train / "
                  f"{result['val_images']:,} val images, {result['epochs']} epochs")
    table = Table()
    for column in ("encoder", "top-1 %", "top-5 %"):
        table.add_column(column, justify="right")
    for label, key in ((f"{result['arch']} step {result['step']}", "model"),
                       ("random init", "random")):
        table.add_row(label, f"{result[key]['top1_pct']:.1f}", f"{result[key]['top5_pct']:.1f}")
    console.print(table)


def neighbors_report(console: Console, result: dict, grid: str) -> None:
    for item in result["queries"]:
        found = ", ".join(f"{n['key']} ({n['distance']:.3f})" for n in item["neighbors"])
        console.print(f"{item['query']}: {found}")
    console.print(f"grid (query with its hole | neighbours): {grid}")
