"""The `bmltrt` command. Thin: each command parses options and calls the library.

User errors (BmlError) print one line and exit 2; heavy modules load inside commands.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from bmltrt.errors import BmlError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Bone marrow lesion detection in the femur on knee MRI (UNet++ + LaMa, TensorRT-ready).")
console = Console(stderr=True)
out = Console()


def user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BmlError as err:
            console.print(f"[bold red]error:[/] {err.line()}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
    return wrapper


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=console,
                    disable=not console.is_terminal and os.environ.get("BMLTRT_PROGRESS") != "1")


@app.command()
@user_errors
def synth(
    out_dir: Path = typer.Argument(..., help="Output folder for the dataset."),
    cases: int = typer.Option(20, "--cases", "-n", help="Number of subjects, split 70/15/15 like the paper's 210/45/45."),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed gives byte-identical arrays."),
    from_labels: Optional[Path] = typer.Option(None, "--from-labels", help="Paint real label maps (1 femur, 7 femoral lesion, ...) instead."),
    workers: int = typer.Option(min(4, os.cpu_count() or 1), "--workers", "-j", help="Parallel processes."),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty folder."),
):
    """Generate knee phantoms with exact femur and lesion masks (train/val/test splits)."""
    from bmltrt.synth.dataset import label_files, split_counts, synth_dataset, synth_from_labels

    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise BmlError("output folder is not empty", out_dir, "choose a new folder or pass --force")
    total = len(label_files(from_labels)) if from_labels else sum(split_counts(cases).values())
    out_dir.mkdir(parents=True, exist_ok=True)
    with _progress() as prog:
        task = prog.add_task("synth", total=total, status="")
        step = lambda: prog.advance(task)  # noqa: E731
        if from_labels:
            man = synth_from_labels(out_dir, from_labels, seed, workers, step)
        else:
            man = synth_dataset(out_dir, cases, seed, workers, step)
    n = {k: len(v) for k, v in man["splits"].items()}
    out.print(f"wrote {sum(n.values())} cases to {out_dir} (train {n['train']}, val {n['val']}, test {n['test']})")


@app.command()
def doctor():
    """Say which backends can run here, with versions and the GPU, and why others cannot."""
    from rich.table import Table

    from bmltrt.doctor import check

    t = Table(title="bmltrt doctor")
    for c in ("component", "status", "version", "detail"):
        t.add_column(c)
    for r in check():
        t.add_row(r["component"], "[green]ok[/]" if r["ok"] else "[yellow]missing[/]", r["version"], r["detail"])
    out.print(t)


def main():
    app()


if __name__ == "__main__":
    main()
