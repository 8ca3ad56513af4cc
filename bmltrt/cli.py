"""The `bmltrt` command. Thin: each command parses options and calls the library.

User errors (BmlError) print one line and exit 2; heavy modules load inside commands.
"""

from __future__ import annotations

import dataclasses
import functools
import os
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


@dataclasses.dataclass
class _DataOptions:
    """Where training images come from (both trainers take the same options)."""

    data: Optional[Path]
    labels: Optional[Path]
    bank_cache: Optional[Path]
    phantoms: int
    phantom_fraction: Optional[float]
    val_data: Optional[Path]


def _check_dataset(path: Optional[Path], option: str):
    if path is not None and not (Path(path) / "dataset.json").exists():
        raise BmlError(f"{option}: not a bmltrt dataset (no dataset.json)", path, "make one with `bmltrt synth`")


def _train_common(kind, d: _DataOptions, out_dir, config, steps, batch_size, lr, device, seed, resume, val_every,
                  limit_cases, time_limit, autocast="none", resolutions=None, trainer=None):
    """Shared by every `bmltrt train` command; `trainer(opts, progress)` runs the kinds
    defined elsewhere (the evaluation baselines)."""
    import json

    try:
        import torch
    except ImportError:
        raise BmlError("training needs torch", hint="pip install 'bmltrt\\[train]'") from None
    from bmltrt.training.loop import RunOptions

    _check_dataset(d.data, "--data")
    _check_dataset(d.val_data, "--val-data")
    if d.data is None and d.labels is None:
        raise BmlError("no training data", hint="give --labels DIR (label maps) and/or --data DIR (a `bmltrt synth` dataset)")
    if d.phantom_fraction is not None and not 0 <= d.phantom_fraction <= 1:
        raise BmlError(f"--phantom-fraction {d.phantom_fraction} is not in [0, 1]")
    if autocast not in ("none", "bf16"):
        raise BmlError(f"--autocast {autocast!r} is not none or bf16")
    extra: dict = {"autocast": autocast}
    if d.labels is not None:
        from bmltrt.synth.dataset import label_files
        from bmltrt.training.data import bank_paths

        label_files(d.labels)  # one clear line if the folder holds no label maps
        cache = d.bank_cache or Path(out_dir).parent / "anatomy_bank"
        with _progress() as prog:
            task = prog.add_task("anatomy bank", total=None, status=str(cache))
            extra["bank"] = bank_paths(d.labels, cache, phantoms=d.phantoms, seed=seed,
                                       progress=lambda: prog.advance(task))
    if d.phantom_fraction is not None:
        extra["phantom_fraction"] = d.phantom_fraction
    if d.val_data is not None:
        extra["val_data"] = d.val_data
    opts = RunOptions(data=d.data, out=Path(out_dir), steps=steps, batch_size=batch_size, lr=lr,
                      device=device, seed=seed, resume=resume, val_every=val_every,
                      ckpt_every=max(1, min(100, val_every)), limit_cases=limit_cases,
                      time_limit_min=time_limit, extra=extra)
    if device in ("cuda", "gpu"):
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    with _progress() as prog:
        task = prog.add_task(f"train {kind}", total=steps, status="")

        def progress(done, total, logs):
            prog.update(task, completed=done,
                        status="  ".join(f"{k} {v:.4g}" for k, v in logs.items() if isinstance(v, float)))

        if trainer is not None:
            res = trainer(opts, progress)
        elif kind == "segmenter":
            from bmltrt.models.unetpp import SEGMENTER_PRESETS, SegmenterConfig
            from bmltrt.training.segmenter import train_segmenter

            cfg = SEGMENTER_PRESETS.get(config) or SegmenterConfig.from_dict(_read_json(config))
            res = train_segmenter(opts, cfg, progress)
        else:
            from bmltrt.models.lama import INPAINTER_PRESETS, InpainterConfig
            from bmltrt.training.inpainter import train_inpainter

            cfg = INPAINTER_PRESETS.get(config) or InpainterConfig.from_dict(_read_json(config))
            res = train_inpainter(opts, cfg, resolutions, progress)
    out.print(f"{kind}: step {res['steps']} of {steps} in {res['seconds']:.0f} s; {json.dumps(res['metrics'])}; "
              f"checkpoint {Path(out_dir) / 'checkpoint.pt'}")


def _read_json(path):
    import json

    p = Path(path)
    if not p.exists():
        raise BmlError(f"unknown config {path!r}: not a preset name nor a JSON file", p)
    return json.loads(p.read_text())


_DATA = typer.Option(None, "--data", help="Phantom dataset folder made by `bmltrt synth`.")
_LABELS = typer.Option(None, "--labels", help="Folder of knee label maps (1 femur, 2 femoral cartilage, 3 tibia, ...) "
                       "to paint SynthSeg-style, completed with phantom anatomies.")
_BANK = typer.Option(None, "--bank-cache", help="Where built anatomy variants are cached (default: beside --out).")
_PHANTOMS = typer.Option(12, "--phantoms", min=0, max=1000, help="Phantom anatomies added to the label maps' bank.")
_PFRAC = typer.Option(None, "--phantom-fraction", help="Share of each batch from the --data phantoms (default: 0 "
                      "with --labels, else 1).")
_VALDATA = typer.Option(None, "--val-data", help="Dataset whose val split is scored at each validation "
                        "(default: --data).")
_OUT = typer.Option(..., "--out", help="Run folder: checkpoint.pt, history.json.")
_AMP = typer.Option("none", "--autocast", help="none, or bf16: bfloat16 autocast (about 2x faster on a CPU "
                    "with AVX512-BF16 or a recent GPU).")
_STEPS = typer.Option(1000, "--steps", min=1)
_BS = typer.Option(4, "--batch-size", min=1, max=1024)
_DEV = typer.Option("cpu", "--device", help="cpu or cuda.")
_SEED = typer.Option(0, "--seed")
_RESUME = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoint.")
_VAL = typer.Option(200, "--val-every", min=1, help="Validate (and checkpoint) every N steps.")
_LIMIT = typer.Option(None, "--limit-cases", min=1, help="Use only the first N cases of each split.")
_TIME = typer.Option(None, "--time-limit", min=0.0, help="Stop after this many minutes (checkpoint saved; steps reached recorded).")


@train_app.command("segmenter")
@user_errors
def train_segmenter_cmd(data: Optional[Path] = _DATA, labels: Optional[Path] = _LABELS, out_dir: Path = _OUT,
                        bank_cache: Optional[Path] = _BANK, phantoms: int = _PHANTOMS,
                        phantom_fraction: Optional[float] = _PFRAC, val_data: Optional[Path] = _VALDATA,
                        config: str = typer.Option("cpu", "--config", help="Preset (cpu, paper) or a JSON file."),
                        steps: int = _STEPS, batch_size: int = _BS, lr: float = typer.Option(2e-3, "--lr", min=0.0),
                        device: str = _DEV, seed: int = _SEED, resume: bool = _RESUME, val_every: int = _VAL,
                        limit_cases: Optional[int] = _LIMIT, time_limit: Optional[float] = _TIME,
                        autocast: str = _AMP):
    """Train the 3D UNet++ femur segmenter (Dice + CE) on label-driven scans and/or phantoms."""
    d = _DataOptions(data, labels, bank_cache, phantoms, phantom_fraction, val_data)
    _train_common("segmenter", d, out_dir, config, steps, batch_size, lr, device, seed, resume, val_every,
                  limit_cases, time_limit, autocast)


@train_app.command("inpainter")
@user_errors
def train_inpainter_cmd(data: Optional[Path] = _DATA, labels: Optional[Path] = _LABELS, out_dir: Path = _OUT,
                        bank_cache: Optional[Path] = _BANK, phantoms: int = _PHANTOMS,
                        phantom_fraction: Optional[float] = _PFRAC, val_data: Optional[Path] = _VALDATA,
                        config: str = typer.Option("tiny", "--config", help="Preset (tiny, fourier, big) or a JSON file."),
                        resolution: str = typer.Option("256", "--resolution", help="Slice size (128, 192, 256, 320, "
                                                       "448), or several separated by commas: one generator for all."),
                        steps: int = _STEPS, batch_size: int = _BS, lr: float = typer.Option(1e-3, "--lr", min=0.0),
                        device: str = _DEV, seed: int = _SEED, resume: bool = _RESUME, val_every: int = _VAL,
                        limit_cases: Optional[int] = _LIMIT, time_limit: Optional[float] = _TIME,
                        autocast: str = _AMP):
    """Train the LaMa (FFC) generator on healthy slices, GAN-style."""
    try:
        resolutions = [int(r) for r in resolution.split(",") if r.strip()]
    except ValueError:
        raise BmlError(f"--resolution {resolution!r} is not a number or a comma-separated list of numbers") from None
    for r in resolutions or [0]:
        if r < 64 or r > 1024 or r % 8:
            raise BmlError(f"--resolution {r} is not a multiple of 8 between 64 and 1024",
                           hint="use 128, 192, 256, 320 or 448")
    d = _DataOptions(data, labels, bank_cache, phantoms, phantom_fraction, val_data)
    _train_common("inpainter", d, out_dir, config, steps, batch_size, lr, device, seed, resume, val_every,
                  limit_cases, time_limit, autocast, resolutions)


def _expand_inputs(items: list[str]) -> list[Path]:
    """Files, folders (their .nii/.nii.gz) and globs -> paths, in order, without repeats."""
    import glob

    paths: list[Path] = []
    for it in items:
        p = Path(it)
        if any(c in it for c in "*?["):
            hits = sorted(glob.glob(it))
            paths += [Path(h) for h in hits] if hits else [p]
        elif p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.name.lower().endswith((".nii", ".nii.gz")))
        else:
            paths.append(p)
    seen, out_ = set(), []
    for p in paths:
        k = str(p.resolve()) if p.exists() else str(p)
        if k not in seen:
            seen.add(k)
            out_.append(p)
    return out_


def _post_overrides(floor, opening_mm, closing_mm, min_area_mm2) -> dict:
    """The post-processing options given on the command line; the others come from the
    models folder's postprocess.json (tuned on a validation split) or the defaults."""
    given = {"floor": floor, "opening_mm": opening_mm, "closing_mm": closing_mm, "min_area_mm2": min_area_mm2}
    return {k: v for k, v in given.items() if v is not None}


_RES = typer.Option(None, "--resolution", "-r", help="Inpainting resolution (128, 192, 256, 320, 448); default: the models'.")
_BACKEND = typer.Option("auto", "--backend", help="auto, onnxruntime, tensorrt or torch.")
_DEVICE = typer.Option("auto", "--device", help="auto, cpu or gpu (gpu falls back to cpu with a warning).")
_MODELS = typer.Option(None, "--models", help="Models folder (manifest.json); default: the shipped models.")
_FLOOR = typer.Option(None, "--floor", help="Minimum difference (HE units) a lesion pixel must exceed "
                      "(default for this and the next three: the models' postprocess.json, else built-in).")
_OPEN = typer.Option(None, "--opening-mm", help="Opening footprint radius, mm.")
_CLOSE = typer.Option(None, "--closing-mm", help="Closing footprint radius, mm.")
_MINAREA = typer.Option(None, "--min-area-mm2", help="Smallest lesion island kept per slice, mm^2.")


def _detector(resolution, backend, device, models, floor, opening_mm, closing_mm, min_area_mm2, batch_size=8):
    from bmltrt.pipeline import DetectConfig, Detector
    from bmltrt.runtime.backends import make_backend

    be, warns = make_backend(backend, device, models)
    for w in warns:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    cfg = DetectConfig(resolution=resolution, batch_size=batch_size,
                       post_overrides=_post_overrides(floor, opening_mm, closing_mm, min_area_mm2))
    return Detector(be, cfg)


@app.command()
@user_errors
def detect(
    scans: List[str] = typer.Argument(..., help="NIfTI files, folders of them, or globs."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    resolution: Optional[int] = _RES, backend: str = _BACKEND, device: str = _DEVICE,
    models: Optional[Path] = _MODELS,
    force_orientation: bool = typer.Option(False, "--force-orientation", help="Accept non-sagittal acquisitions."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace outputs of an earlier run."),
    batch_size: int = typer.Option(8, "--batch-size", help="Slices per inpainting batch."),
    floor: Optional[float] = _FLOOR, opening_mm: Optional[float] = _OPEN, closing_mm: Optional[float] = _CLOSE,
    min_area_mm2: Optional[float] = _MINAREA,
):
    """Find bone marrow lesions: <name>_bml.nii.gz, _femur.nii.gz, _report.json, _overlay.png per scan."""
    from rich.table import Table

    from bmltrt.io import load_scan
    from bmltrt.report import write_outputs

    paths = _expand_inputs(scans)
    names = {}
    for p in paths:
        n = p.name.split(".nii")[0]
        if n in names:
            raise BmlError(f"two inputs would write the same outputs ({n}_*)", p,
                           f"rename one of {names[n]} and {p}, or run them into different --out folders")
        names[n] = p
    det = _detector(resolution, backend, device, models, floor, opening_mm, closing_mm, min_area_mm2, batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, failed = [], 0
    with _progress() as prog:
        task = prog.add_task("scans", total=len(paths), status="")
        stage = prog.add_task("stage", total=1, status="")
        for p in paths:
            prog.update(task, status=p.name)
            try:
                name = p.name.split(".nii")[0]
                if not overwrite and (out_dir / f"{name}_bml.nii.gz").exists():
                    raise BmlError("outputs exist already", out_dir / f"{name}_bml.nii.gz",
                                   "pass --overwrite or choose another --out folder")
                scan = load_scan(p, force_orientation=force_orientation)
                for w in scan.warnings:
                    console.print(f"[yellow]warning:[/] {w} ({p})", highlight=False)

                def progress(what, done, total):
                    prog.update(stage, description=what, completed=done, total=total)

                result = det.detect(scan, progress)
                write_outputs(result, out_dir)
                r = result.report
                for w in r["warnings"][len(scan.warnings):]:
                    console.print(f"[yellow]warning:[/] {p.name}: {w}", highlight=False)
                rows.append((p.name, str(r["lesion_count"]), f"{r['lesion_volume_mm3']:.1f}",
                             f"{r['femur_volume_mm3'] / 1000:.1f}", f"{r['timings_s']['total_s']:.1f}", "[green]ok[/]"))
            except BmlError as err:
                failed += 1
                console.print(f"[bold red]error:[/] {err.line()}", highlight=False, soft_wrap=True)
                rows.append((p.name, "-", "-", "-", "-", "[red]failed[/]"))
            prog.advance(task)
    t = Table(title=f"bmltrt detect: {len(paths) - failed} of {len(paths)} scans done "
                    f"({det.backend.name}, {det.backend.device}, {det.backend.precision}, res {det.resolution})")
    for c in ("scan", "lesions", "lesion mm3", "femur cm3", "seconds", "status"):
        t.add_column(c)
    for row in rows:
        t.add_row(*row)
    out.print(t)
    out.print(f"outputs in {out_dir}")
    if failed:
        raise typer.Exit(2)


@app.command()
@user_errors
def demo(
    out_dir: Path = typer.Option(Path("bmltrt-demo"), "--out", "-o", help="Where the phantom and the outputs go."),
    seed: int = typer.Option(5, "--seed", help="Phantom seed (the same seed, the same knee)."),
    resolution: Optional[int] = _RES, backend: str = _BACKEND, device: str = _DEVICE,
    models: Optional[Path] = _MODELS,
):
    """Make a phantom knee with known lesions, run detect on it, print Dice against the truth."""
    from bmltrt.io import load_scan
    from bmltrt.evaluation.metrics import confusion, lesion_detection, scores
    from bmltrt.report import write_outputs
    from bmltrt.synth.dataset import write_case
    from bmltrt.synth.phantom import PhantomConfig, make_phantom

    ph = make_phantom([seed, 0], PhantomConfig(n_lesions=(2, 2)))
    write_case(out_dir, "input", "demo_knee", ph)
    scan_path = out_dir / "input" / "images" / "demo_knee.nii.gz"
    det = _detector(resolution, backend, device, models, None, None, None, None)
    scan = load_scan(scan_path)
    result = det.detect(scan)
    paths = write_outputs(result, out_dir)
    truth = load_scan(out_dir / "input" / "lesion" / "demo_knee.nii.gz", is_mask=True).data > 0
    femur = load_scan(out_dir / "input" / "femur" / "demo_knee.nii.gz", is_mask=True).data > 0
    les = scores(confusion(result.lesion, truth))
    fem = scores(confusion(result.femur, femur))
    dt = lesion_detection(result.lesion, truth)
    r = result.report
    out.print(f"phantom knee with {dt['n_true']} lesion(s) (3D components, {sum(ph.info['lesion_volumes_mm3']):.0f} mm3): "
              f"{scan_path}")
    out.print(f"found {r['lesion_count']} lesion(s), {r['lesion_volume_mm3']:.0f} mm3 in "
              f"{r['timings_s']['total_s']:.1f} s ({r['backend']}, {r['device']}, {r['precision']}, res {r['resolution']})")
    out.print(f"lesion Dice {les['dice']:.3f}  IoU {les['iou']:.3f}  sensitivity {les['sensitivity']:.3f}  "
              f"lesions detected {dt['detected']}/{dt['n_true']}  femur Dice {fem['dice']:.3f}")
    for k, v in paths.items():
        out.print(f"  {k:8s} {v}")


@app.command()
@user_errors
def export(
    segmenter: Optional[Path] = typer.Option(None, "--segmenter", help="Segmenter checkpoint.pt."),
    inpainter: List[Path] = typer.Option([], "--inpainter", help="Inpainter checkpoint.pt (repeatable, one per resolution)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Models folder (manifest.json is updated)."),
    default_resolution: int = typer.Option(256, "--default-resolution"),
):
    """Export checkpoints to ONNX (float32, DFT as matrix products) and update the manifest."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise BmlError("export needs torch", hint="pip install 'bmltrt[train]'") from None
    from bmltrt.export.onnx_export import export_models

    for p in [segmenter, *inpainter]:
        if p is not None and not p.exists():
            raise BmlError("checkpoint not found", p)
    man = export_models(segmenter, list(inpainter), out_dir, default_resolution)
    for k, e in sorted(man["models"].items()):
        out.print(f"{k:15s} {e['file']:22s} sha256 {e['sha256'][:12]}  max|onnx-torch| {e['max_abs_err_vs_torch']:.1e}")


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


# `bmltrt evaluate ...` and `bmltrt train autoencoder|mkd` live with the evaluation code.
from bmltrt.evaluation.cli import register  # noqa: E402

register(app, train_app)


def main():
    app()


if __name__ == "__main__":
    main()
