"""The `bmltrt` command. Thin: each command parses options and calls the library.

User errors (BmlError) print one line and exit 2; heavy modules load inside commands.
"""

from __future__ import annotations

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


def _train_common(kind, data, out_dir, config, steps, batch_size, lr, device, seed, resume, val_every, limit_cases,
                  time_limit, resolution=None):
    import json

    try:
        import torch
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


def _post_options(floor, opening_mm, closing_mm, min_area_mm2):
    from bmltrt.postprocess import PostConfig

    d = PostConfig()
    return PostConfig(floor=d.floor if floor is None else floor,
                      opening_mm=d.opening_mm if opening_mm is None else opening_mm,
                      closing_mm=d.closing_mm if closing_mm is None else closing_mm,
                      min_area_mm2=d.min_area_mm2 if min_area_mm2 is None else min_area_mm2)


_RES = typer.Option(None, "--resolution", "-r", help="Inpainting resolution (128, 192, 256, 320, 448); default: the models'.")
_BACKEND = typer.Option("auto", "--backend", help="auto, onnxruntime, tensorrt or torch (auto: TensorRT if its "
                        "engines are built, else torch on CUDA, else ONNX Runtime).")
_DEVICE = typer.Option("auto", "--device", help="auto, cpu or gpu (gpu falls back to cpu with a warning).")
_MODELS = typer.Option(None, "--models", help="Models folder (manifest.json); default: the shipped models.")
_FLOOR = typer.Option(None, "--floor", help="Minimum difference (HE units) a lesion pixel must exceed.")
_OPEN = typer.Option(None, "--opening-mm", help="Opening footprint radius, mm.")
_CLOSE = typer.Option(None, "--closing-mm", help="Closing footprint radius, mm.")
_MINAREA = typer.Option(None, "--min-area-mm2", help="Smallest lesion island kept per slice, mm^2.")
_PRECISION = typer.Option("auto", "--precision", help="auto, fp32 or fp16 (auto: fp16 for TensorRT, else fp32; fp16 "
                          "runs the FP16 graphs; ONNX Runtime on a CPU computes them in float32).")
_ENGINES = typer.Option(None, "--engines", help="TensorRT engines folder (default: engines/ or $BMLTRT_ENGINES).")


def _detector(resolution, backend, device, models, floor, opening_mm, closing_mm, min_area_mm2, batch_size=8,
              precision="auto", engines=None, seg_batch_size=None, cuda_graphs=False, torch_compile=False):
    from bmltrt.pipeline import DetectConfig, Detector
    from bmltrt.runtime.backends import make_backend

    be, warns = make_backend(backend, device, models, precision=precision, engines_dir=engines,
                             cuda_graphs=cuda_graphs, torch_compile=torch_compile)
    for w in warns:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    cfg = DetectConfig(resolution=resolution, batch_size=batch_size, seg_batch_size=seg_batch_size,
                       post=_post_options(floor, opening_mm, closing_mm, min_area_mm2))
    det = Detector(be, cfg)
    prepare = getattr(be, "prepare", None)
    if prepare:  # load the networks now: a missing engine or graph fails before the first scan
        prepare(["segmenter", det.inp_name])
    return det


@app.command()
@user_errors
def detect(
    scans: List[str] = typer.Argument(..., help="NIfTI files, folders of them, or globs."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    resolution: Optional[int] = _RES, backend: str = _BACKEND, device: str = _DEVICE,
    models: Optional[Path] = _MODELS, precision: str = _PRECISION,
    force_orientation: bool = typer.Option(False, "--force-orientation", help="Accept non-sagittal acquisitions."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace outputs of an earlier run."),
    batch_size: int = typer.Option(8, "--batch-size", help="Slices per inpainting batch."),
    floor: Optional[float] = _FLOOR, opening_mm: Optional[float] = _OPEN, closing_mm: Optional[float] = _CLOSE,
    min_area_mm2: Optional[float] = _MINAREA,
    engines: Optional[Path] = _ENGINES,
    seg_batch_size: Optional[int] = typer.Option(None, "--seg-batch-size",
                                                 help="Patches per segmenter batch (default 2 on the CPU, 4 on the GPU)."),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="Capture CUDA graphs per batch shape "
                                     "(torch, TensorRT; off by default: not yet measured)."),
    torch_compile: bool = typer.Option(False, "--torch-compile", help="torch.compile the torch backend's "
                                       "networks (off by default: not yet measured)."),
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
    det = _detector(resolution, backend, device, models, floor, opening_mm, closing_mm, min_area_mm2, batch_size,
                    precision, engines, seg_batch_size, cuda_graphs, torch_compile)
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
    det.backend.close()
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
    from bmltrt.metrics import confusion, lesion_detection, scores
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
    inpainter: List[Path] = typer.Option([], "--inpainter", help="Inpainter checkpoint.pt (repeatable, one per resolution; or one, exported at --resolutions or at every resolution it was trained at)."),
    resolutions: Optional[str] = typer.Option(None, "--resolutions", help="Export the one --inpainter at these resolutions, e.g. 128,192,256,320,448."),
    from_onnx: Optional[Path] = typer.Option(None, "--from-onnx", help="Start from the float32 graphs of this models folder instead of checkpoints."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Models folder to write (its manifest.json is replaced)."),
    precision: str = typer.Option("both", "--precision", help="fp32, fp16 or both (fp16 keeps the float32 graphs as reference)."),
    default_resolution: int = typer.Option(256, "--default-resolution"),
    calibration_cases: int = typer.Option(2, "--calibration-cases", help="Phantom knees for FP16 calibration (0: islands by rule only)."),
    calibration_seed: int = typer.Option(11, "--calibration-seed"),
    bound: float = typer.Option(1e4, "--fp16-bound", help="Nodes whose calibrated |activation| exceeds this stay float32."),
    fp16_io: bool = typer.Option(False, "--fp16-io", help="FP16 graphs take and give float16 (default: float32 I/O)."),
    no_lint: bool = typer.Option(False, "--no-lint", help="Skip `polygraphy check lint`."),
):
    """Export checkpoints (or float32 ONNX) to a models folder: float32 and FP16 graphs, checked, with a manifest."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise BmlError("export needs torch", hint="pip install 'bmltrt[export]'") from None
    from bmltrt.export.build import make_models

    for p in [segmenter, *inpainter, from_onnx]:
        if p is not None and not p.exists():
            raise BmlError("not found", p)
    if from_onnx is not None and (segmenter or inpainter):
        raise BmlError("give checkpoints or --from-onnx, not both")
    res = None
    if resolutions:
        try:
            res = [int(r) for r in resolutions.replace(" ", "").split(",") if r]
        except ValueError:
            raise BmlError(f"--resolutions {resolutions!r} is not a comma-separated list of integers") from None
    man = make_models(out_dir, segmenter=segmenter, inpainters=list(inpainter), resolutions=res,
                      from_onnx=from_onnx, precision=precision, default_resolution=default_resolution,
                      calibration_cases=calibration_cases, calibration_seed=calibration_seed, bound=bound,
                      fp16_io=fp16_io, lint=not no_lint,
                      progress=lambda what: console.print(f"[dim]{what}[/]", highlight=False))
    for k, e in sorted(man["models"].items()):
        for prec, v in sorted(e["precisions"].items(), reverse=True):
            extra = ""
            if "islands" in v:
                c = v["islands"]["counts"]
                extra = f"  float32 islands {', '.join(f'{n} {r}' for r, n in c.items()) or 'none'}"
                if "activation_ranges" in v:
                    extra += f"  max|act| {v['activation_ranges']['max_abs']:.4g}"
            out.print(f"{k:15s} {prec}  {v['file']:26s} sha256 {v['sha256'][:12]}{extra}", highlight=False)
    out.print(f"models folder {out_dir} (manifest.json); checks PASSED")


@app.command("export-check")
@user_errors
def export_check(
    models: Path = typer.Argument(..., help="Models folder with float32 and FP16 graphs (bmltrt export --precision both)."),
    data: Path = typer.Option(..., "--data", help="Phantom dataset (bmltrt synth) whose split is used."),
    split: str = typer.Option("val", "--split"),
    out_dir: Path = typer.Option(Path("benchmarks/results/fp16_parity"), "--out", "-o", help="Where parity.json and parity.md go."),
    resolutions: Optional[str] = typer.Option(None, "--resolutions", help="Comma-separated; default: all in the folder."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N scans of the split."),
):
    """FP16 against float32, honestly (graphs run op by op in torch, float16 kernels): NaN/Inf, Dice, reconstruction error."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise BmlError("export-check needs torch", hint="pip install 'bmltrt[export]'") from None
    from bmltrt.export.parity import parity_report

    res = [int(r) for r in resolutions.split(",")] if resolutions else None
    rep = parity_report(models, data, split, out_dir, res, limit,
                        progress=lambda what: console.print(f"[dim]{what}[/]", highlight=False))
    out.print((out_dir / "parity.md").read_text())
    if rep["failed"]:
        out.print(f"FAILED: {'; '.join(rep['failed'])}")
        raise typer.Exit(1)
    out.print("PASSED")


@app.command()
@user_errors
def evaluate(
    data: Path = typer.Argument(..., help="Dataset folder (bmltrt synth) with lesion masks."),
    split: str = typer.Option("test", "--split"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Where evaluation.json and cases.csv go."),
    resolution: Optional[int] = _RES, backend: str = _BACKEND, device: str = _DEVICE,
    models: Optional[Path] = _MODELS, limit: Optional[int] = typer.Option(None, "--limit"),
    floor: Optional[float] = _FLOOR, opening_mm: Optional[float] = _OPEN, closing_mm: Optional[float] = _CLOSE,
    min_area_mm2: Optional[float] = _MINAREA,
):
    """Lesion Dice/IoU/sensitivity/specificity/accuracy (pooled, per case; slice and femur) and lesion-wise F1."""
    from bmltrt.evaluate import evaluate_split, print_summary

    det = _detector(resolution, backend, device, models, floor, opening_mm, closing_mm, min_area_mm2)
    with _progress() as prog:
        task = prog.add_task(f"evaluate {split}", total=None, status="")
        summary = evaluate_split(det, data, split, out_dir, limit,
                                 lambda d, n, c: prog.update(task, completed=d, total=n, status=c))
    print_summary(summary, out)


@app.command("build-engines")
@user_errors
def build_engines_cmd(
    models: Optional[Path] = _MODELS,
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Engines folder (default: engines/, git-ignored, "
                                           "or $BMLTRT_ENGINES)."),
    resolutions: Optional[str] = typer.Option(None, "--resolutions", help="Inpainter resolutions, comma-separated "
                                              "(default: all in the models folder)."),
    precision: str = typer.Option("fp16", "--precision", help="fp16 (from the FP16 graphs), fp32, or both."),
    max_batch: int = typer.Option(16, "--max-batch", help="Largest batch of the optimisation profile (min 1)."),
    workspace: float = typer.Option(4.0, "--workspace", help="Builder workspace pool limit, GiB."),
    opt_level: int = typer.Option(3, "--opt-level", help="TensorRT builder optimisation level, 0..5."),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="Timing cache file, read and updated "
                                                "(default: <out>/timing_<gpu>_trt<version>.cache)."),
    force: bool = typer.Option(False, "--force", help="Rebuild engines that fit this GPU and TensorRT."),
):
    """Build TensorRT engines (strongly typed, FP16 from the FP16 graphs) for this GPU; skip those that fit."""
    from rich.table import Table

    from bmltrt.runtime import engines as eng
    from bmltrt.runtime.models import ModelStore
    from bmltrt.runtime.trt_build import BuildOptions, build_engines, plan_jobs, select_resolutions

    try:
        res = [int(r) for r in resolutions.replace(" ", "").split(",") if r] if resolutions else None
    except ValueError:
        raise BmlError(f"--resolutions {resolutions!r} is not a comma-separated list of numbers",
                       hint="e.g. --resolutions 256,448") from None
    precs = {"both": ("fp16", "fp32")}.get(precision, (precision,))
    opts = BuildOptions(precisions=precs, max_batch=max_batch, workspace_gib=workspace, opt_level=opt_level,
                        timing_cache=timing_cache, force=force)
    opts.validate()  # bad options fail first, then a missing TensorRT or GPU, then missing graphs
    store = ModelStore.open(models)
    select_resolutions(store, res)
    trt = eng.require_tensorrt()
    gpu = eng.current_gpu()
    jobs = plan_jobs(store, res, opts)
    dest = out_dir or eng.default_engines_dir()
    out.print(f"TensorRT {trt.__version__} on {gpu.name} (compute capability {gpu.compute_capability}): "
              f"{len(jobs)} engine(s) into {dest}", highlight=False)
    with _progress() as prog:
        total = prog.add_task("engines", total=len(jobs), status="")
        phase = prog.add_task("phase", total=None, status="", visible=False)

        def on_job(job, status, why):
            if status == "building":
                prog.update(total, status=f"{job.model} {job.precision}" + (f" ({why})" if why else ""))
            else:
                prog.advance(total)

        def on_event(kind, name, a, b):
            if kind == "start":
                prog.update(phase, description=str(name)[:40], completed=0, total=b or None, visible=True)
            elif kind == "step":
                prog.update(phase, completed=int(a) + 1)
            else:
                prog.update(phase, visible=False)

        rows = build_engines(store, dest, jobs, opts, trt, gpu, on_job, on_event)
    t = Table(title=f"bmltrt build-engines: TensorRT {trt.__version__}, {gpu.name}")
    for c in ("model", "precision", "status", "why", "seconds", "plan"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["model"], r["precision"], r["status"], r["why"], f"{r['seconds']:.0f}", Path(r["plan"]).name)
    out.print(t)


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
