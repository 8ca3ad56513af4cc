"""`bmltrt bench`: the command over bmltrt.bench.run (options checked, one line on error)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bmltrt import cli as base
from bmltrt.errors import BmlError
from bmltrt.io.outputs import check_folder_path, refuse_earlier_results, remove_stale_results
from bmltrt.runtime.backends import MAX_THREADS
from bmltrt.runtime.models import parse_resolutions

MAX_BATCH = 4096
MAX_REPEATS = 1000


def _list(value: Optional[str], option: str, choices=None, kind=int, lo=None, hi=None) -> list | None:
    """A comma-separated option as a checked list (None when not given)."""
    if value is None:
        return None
    items = value.replace(" ", "").split(",")
    example = f"e.g. {option} {','.join(map(str, choices or [1, 2]))}"
    if not any(items):
        raise BmlError(f"{option} is empty", hint=example)
    if not all(items):  # "1,,2" or "1,": a value left out, not one to skip silently
        raise BmlError(f"{option} {value!r} has an empty item", hint=example)
    out = []
    for v in items:
        try:
            x = kind(v)
        except ValueError:
            raise BmlError(f"{option} {value!r} is not a comma-separated list of "
                           f"{'integers' if kind is int else 'names'}") from None
        if choices is not None and x not in choices:
            raise BmlError(f"{option}: {v!r} is not one of {', '.join(map(str, choices))}")
        if (lo is not None and x < lo) or (hi is not None and x > hi):
            raise BmlError(f"{option}: {x} is out of range ({lo}-{hi})")
        if x in out:
            raise BmlError(f"{option}: {v!r} is given twice")
        out.append(x)
    return out


def bench_cmd(
    resolutions: Optional[str] = typer.Option(None, "--resolutions", help="Inpainter resolutions, e.g. 128,256,448 "
                                              "(default: all in the models folder, but --quick: the smallest; all: every one)."),
    backends: Optional[str] = typer.Option(None, "--backends", help="onnxruntime,torch,tensorrt,eager (default: every "
                                           "one that can run here; eager = PyTorch eager float32 reference)."),
    precisions: Optional[str] = typer.Option(None, "--precisions", help="fp32,fp16 (default both, but torch on the "
                                             "CPU fp32 only unless asked; a precision no graph of the models folder "
                                             "has is refused, one that some lack is skipped for those with a note)."),
    batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="Inpainter batch sweep, e.g. 1,2,4,8,16 "
                                              "(default 1,4,16; --quick: 1,2). The segmenter uses those up to 8."),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="Measured runs per figure after one warm-up "
                                          "(default 3; --quick: 2)."),
    quick: bool = typer.Option(False, "--quick", help="Tiny versions of everything: checks that it works, in seconds."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for ONNX Runtime and torch alike "
                                          "(default: $BMLTRT_THREADS, else every usable core)."),
    models: Optional[Path] = base._MODELS,
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Results folder (default "
                                           "benchmarks/results/bench_<machine>_<date>/)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the results of an earlier run in -o."),
):
    """Throughput and latency per resolution, backend, precision and stage; ratios side by side; JSON, CSV, PNG."""
    from bmltrt.bench.machine import REPO, machine_info, machine_slug
    from bmltrt.bench.output import write_results
    from bmltrt.bench.run import BACKEND_CHOICES, BenchOptions, run_bench

    opts = BenchOptions(
        models=models,
        resolutions=parse_resolutions(resolutions),
        backends=_list(backends, "--backends", BACKEND_CHOICES, str),
        precisions=_list(precisions, "--precisions", ("fp32", "fp16"), str),
        batch_sizes=_list(batch_sizes, "--batch-sizes", lo=1, hi=MAX_BATCH),
        repeats=repeats, quick=quick, threads=threads)
    if repeats is not None and not 1 <= repeats <= MAX_REPEATS:
        raise BmlError(f"--repeats must be 1-{MAX_REPEATS} (got {repeats})")
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise BmlError(f"--threads must be 1-{MAX_THREADS} (got {threads})")
    if models is not None and not (models / "manifest.json").is_file():
        raise BmlError("not a models folder (no manifest.json)", models, "pass the folder `bmltrt export` wrote")
    if out_dir is None:
        info = machine_info()
        root = REPO / "benchmarks" / "results" if (REPO / "benchmarks").is_dir() else Path.cwd()
        out_dir = root / f"bench_{machine_slug(info)}_{info['date']}{'_quick' if quick else ''}"
    check_folder_path(out_dir, "the results folder (-o)", "choose a folder")
    refuse_earlier_results(out_dir, ("bench.json", "bench.csv", "throughput.png", "stages.png"), overwrite)

    with base._progress() as bar:
        task = bar.add_task("bench", total=None, status="")

        def progress(label, total):
            if label is None:
                bar.update(task, total=total)
                return
            bar.update(task, description=f"bench: {label}"[:70], status="")
            bar.advance(task)

        res = run_bench(opts, progress)
        bar.update(task, description="bench: done")
    out_dir.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves no empty folder
    paths = write_results(res, out_dir)
    # --overwrite: a plot this run did not draw (no rows for it) is the earlier run's; removed
    remove_stale_results(out_dir, r"bench\.json|bench\.csv|throughput\.png|stages\.png", paths.values())
    for n in res["notes"]:
        base.print_warning(n)
    base.say(f"{len(res['rows'])} figures on {res['machine_label']} (commit {res['machine']['commit']})")
    for k, p in paths.items():
        base.say(f"  {k:10s} {p}")
    base.say(f"README section: python -m bmltrt.bench.readme {out_dir} --readme README.md")


def register(app: typer.Typer) -> None:
    app.command("bench")(base.user_errors(bench_cmd))
