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


train_app = typer.Typer(no_args_is_help=True, help="Train the femur segmenter or the inpainter (needs bmltrt[train]).")
app.add_typer(train_app, name="train")


def _train_common(kind, data, out_dir, config, steps, batch_size, lr, device, seed, resume, val_every, limit_cases,
                  time_limit, resolution=None):
    import json

    try:
        import torch  # noqa: F401
    except ImportError:
        raise BmlError("training needs torch", hint="pip install 'bmltrt[train]'") from None
    from bmltrt.training.loop import RunOptions

    if not (Path(data) / "dataset.json").exists():
        raise BmlError("not a bmltrt dataset (no dataset.json)", data, "make one with `bmltrt synth`")
    opts = RunOptions(data=Path(data), out=Path(out_dir), steps=steps, batch_size=batch_size, lr=lr,
                      device=device, seed=seed, resume=resume, val_every=val_every,
                      ckpt_every=max(1, min(100, val_every)), limit_cases=limit_cases,
                      time_limit_min=time_limit)
    if device in ("cuda", "gpu"):
        import torch

        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    with _progress() as prog:
        task = prog.add_task(f"train {kind}", total=steps, status="")

        def progress(done, total, logs):
            prog.update(task, completed=done,
                        status="  ".join(f"{k} {v:.4g}" for k, v in logs.items() if isinstance(v, float)))

        if kind == "segmenter":
            from bmltrt.models.unetpp import SEGMENTER_PRESETS, SegmenterConfig
            from bmltrt.training.segmenter import train_segmenter

            cfg = SEGMENTER_PRESETS.get(config) or SegmenterConfig.from_dict(_read_json(config))
            res = train_segmenter(opts, cfg, progress)
        else:
            from bmltrt.models.lama import INPAINTER_PRESETS, InpainterConfig
            from bmltrt.training.inpainter import train_inpainter

            cfg = INPAINTER_PRESETS.get(config) or InpainterConfig.from_dict(_read_json(config))
            res = train_inpainter(opts, cfg, resolution, progress)
    out.print(f"{kind}: step {res['steps']} of {steps} in {res['seconds']:.0f} s; {json.dumps(res['metrics'])}; "
              f"checkpoint {Path(out_dir) / 'checkpoint.pt'}")


def _read_json(path):
    import json

    p = Path(path)
    if not p.exists():
        raise BmlError(f"unknown config {path!r}: not a preset name nor a JSON file", p)
    return json.loads(p.read_text())


_DATA = typer.Option(..., "--data", help="Dataset folder made by `bmltrt synth`.")
_OUT = typer.Option(..., "--out", help="Run folder: checkpoint.pt, history.json.")
_STEPS = typer.Option(1000, "--steps")
_BS = typer.Option(4, "--batch-size")
_DEV = typer.Option("cpu", "--device", help="cpu or cuda.")
_SEED = typer.Option(0, "--seed")
_RESUME = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoint.")
_VAL = typer.Option(200, "--val-every", help="Validate (and checkpoint) every N steps.")
_LIMIT = typer.Option(None, "--limit-cases", help="Use only the first N cases of each split.")
_TIME = typer.Option(None, "--time-limit", help="Stop after this many minutes (checkpoint saved; steps reached recorded).")


@train_app.command("segmenter")
@user_errors
def train_segmenter_cmd(data: Path = _DATA, out_dir: Path = _OUT,
                        config: str = typer.Option("cpu", "--config", help="Preset (cpu, paper) or a JSON file."),
                        steps: int = _STEPS, batch_size: int = _BS, lr: float = typer.Option(2e-3, "--lr"),
                        device: str = _DEV, seed: int = _SEED, resume: bool = _RESUME, val_every: int = _VAL,
                        limit_cases: Optional[int] = _LIMIT, time_limit: Optional[float] = _TIME):
    """Train the 3D UNet++ femur segmenter (Dice + CE, random crops, contrast randomisation)."""
    _train_common("segmenter", data, out_dir, config, steps, batch_size, lr, device, seed, resume, val_every,
                  limit_cases, time_limit)


@train_app.command("inpainter")
@user_errors
def train_inpainter_cmd(data: Path = _DATA, out_dir: Path = _OUT,
                        config: str = typer.Option("tiny", "--config", help="Preset (tiny, fourier, big) or a JSON file."),
                        resolution: int = typer.Option(256, "--resolution", help="Slice size: 128, 192, 256, 320 or 448."),
                        steps: int = _STEPS, batch_size: int = _BS, lr: float = typer.Option(1e-3, "--lr"),
                        device: str = _DEV, seed: int = _SEED, resume: bool = _RESUME, val_every: int = _VAL,
                        limit_cases: Optional[int] = _LIMIT, time_limit: Optional[float] = _TIME):
    """Train the LaMa (FFC) generator on healthy slices, GAN-style."""
    if resolution % 8:
        raise BmlError(f"--resolution {resolution} is not a multiple of 8", hint="use 128, 192, 256, 320 or 448")
    _train_common("inpainter", data, out_dir, config, steps, batch_size, lr, device, seed, resume, val_every,
                  limit_cases, time_limit, resolution)


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
