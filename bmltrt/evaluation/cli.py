"""`bmltrt evaluate ...` and the baselines' `bmltrt train ...` commands.

    bmltrt evaluate DATA --split test -o OUT       Table 1, Figure 3 (= `bmltrt evaluate run`)
    bmltrt evaluate DATA --tune -o OUT ...         choose parameters on val, then score test once
    bmltrt evaluate tune DATA -o OUT [--save]      choose parameters on val only (detect's defaults)
    bmltrt evaluate table RUN... [--readme FILE]   tables of one or more runs, side by side
    bmltrt evaluate model-card DATA                femur Dice, inpainting L1 against simple fills
    bmltrt train autoencoder / bmltrt train mkd    the baselines' networks

Nothing heavy is imported before a command runs (the runtime installs without torch).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from typer.core import TyperGroup

from bmltrt import cli as base
from bmltrt.errors import BmlError
from bmltrt.io.outputs import refuse_earlier_results, remove_stale_results


class DefaultToRun(TyperGroup):
    """A group whose first argument, when it names no subcommand, goes to `run`: so
    `bmltrt evaluate DATA ...` is `bmltrt evaluate run DATA ...`."""

    default = "run"

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [self.default, *args]
        return super().parse_args(ctx, args)


evaluate_app = typer.Typer(
    cls=DefaultToRun, no_args_is_help=True,
    help="The paper's Table 1 and Figure 3 on a dataset with exact truth (ours at each resolution, "
         "baselines beside). `bmltrt evaluate DATA ...` is short for `bmltrt evaluate run DATA ...`.")

_MODELS = typer.Option(None, "--models", help="Models folder, as DIR or LABEL=DIR; repeat to put several side "
                       "by side (rows are labelled by folder). Default: the shipped models.")
_RESS = typer.Option(None, "--resolutions", help="Inpainting sizes, comma-separated (128,192,256,320,448), or "
                     "'all' (every size the models have). Default: the models' default size.")
_SEARCH = typer.Option("full", "--search", help="Post-processing search space: full, or quick (for trials).")
_AE = typer.Option(None, "--autoencoder", help="Baseline (b): checkpoint from `bmltrt train autoencoder`.")
_MKD = typer.Option(None, "--mkd", help="Baseline (c): checkpoint from `bmltrt train mkd` (needs VGG16 "
                    "ImageNet weights to make).")
_CACHE = typer.Option(None, "--cache", help="Where anomaly maps are kept between runs (default: "
                      "$BMLTRT_CACHE/evaluation or ~/.cache/bmltrt/evaluation).")
_NOCACHE = typer.Option(False, "--no-cache", help="Keep anomaly maps in memory only.")
_OVERWRITE = typer.Option(False, "--overwrite", help="Replace the results of an earlier run in -o.")
# what `evaluate run` writes (evaluation/tables.write_outputs)
RUN_OUTPUTS = ("evaluation.json", "table1.csv", "table1.md", "cases.csv", "figure3.png")
_LIMIT = typer.Option(None, "--limit", min=1, help="Only the first N cases of each split (trials).")
_NOBASE = typer.Option(False, "--no-baselines", help="Only our method (no baseline rows).")
_SCOPE = typer.Option(None, "--otsu-scope", help="Ours: Otsu per slice (the paper), per volume, or none.")
_SAME = typer.Option(False, "--same-femur", help="Every row scores the femur of the first --models folder's "
                     "segmenter (compares inpainters alone; default: each folder its own segmenter).")


def _cache(cache_dir, no_cache):
    from bmltrt.evaluation.maps import MapCache, default_cache_dir
    from bmltrt.io.outputs import check_folder_path

    if cache_dir is not None and no_cache:
        raise BmlError("--cache and --no-cache contradict each other", hint="give one of them")
    if no_cache:
        return MapCache(None)
    folder = cache_dir or default_cache_dir()
    given = "--cache" if cache_dir is not None else "$BMLTRT_CACHE" if os.environ.get("BMLTRT_CACHE") \
        else "the default cache folder"
    # found now, not when the first map is saved after minutes of work
    check_folder_path(folder, given, "give a folder for the map cache (--cache), or --no-cache")
    return MapCache(folder)


def _plan(models, resolutions, backend, device, autoencoder, mkd, no_baselines, overrides=None, same_femur=False):
    from bmltrt.evaluation.evaluate import Plan, open_model_sets
    from bmltrt.runtime.models import parse_resolutions

    res = parse_resolutions(resolutions)
    if res == "all":
        from bmltrt.evaluation.evaluate import parse_models
        from bmltrt.runtime.models import ModelStore

        sets = []
        for label, root in parse_models(models):
            spec = f"{label}={root}" if root else None
            store_res = ModelStore.open(root).resolutions()
            sets += open_model_sets([spec] if spec else None, store_res, backend, device, overrides, _warn)
    else:
        sets = open_model_sets(models, res, backend, device, overrides, _warn)
    plan = Plan(sets, autoencoder=autoencoder, mkd=mkd, intensity=not no_baselines, same_femur=same_femur)
    plan.build()
    if no_baselines:
        plan.missing = []
    return plan


def _warn(msg):
    base.console.print(f"[yellow]warning:[/] {msg}", highlight=False)


def _progress_cb(prog):
    tasks = {}

    def cb(stage, done, total, label):
        if stage not in tasks:
            tasks[stage] = prog.add_task(stage, total=total, status="")
        prog.update(tasks[stage], completed=done, total=total, status=escape(str(label)))
    return cb


def _overrides(floor, opening_mm, closing_mm, min_area_mm2, otsu_scope) -> dict:
    from bmltrt.postprocess.lesion import OTSU_SCOPES

    if otsu_scope is not None and otsu_scope not in OTSU_SCOPES:
        raise BmlError(f"--otsu-scope {otsu_scope!r} is not one of {', '.join(OTSU_SCOPES)}")
    vals = {"floor": floor, "opening_mm": opening_mm, "closing_mm": closing_mm, "min_area_mm2": min_area_mm2,
            "otsu_scope": otsu_scope}
    return {k: v for k, v in vals.items() if v is not None}


def _check_search(search):
    from bmltrt.evaluation.tune import SPACES

    if search not in SPACES:
        raise BmlError(f"--search {search!r} is not one of {', '.join(SPACES)}")


@evaluate_app.command("run")
@base.user_errors
def run_cmd(
    data: Path = typer.Argument(..., help="Dataset folder (`bmltrt synth`) with lesion masks."),
    split: str = typer.Option("test", "--split", help="val or test."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for evaluation.json, table1.{md,csv}, "
                                 "cases.csv, figure3.png."),
    resolutions: Optional[str] = _RESS, models: Optional[List[str]] = _MODELS,
    backend: str = base._BACKEND, device: str = base._DEVICE,
    tune: bool = typer.Option(False, "--tune", help="First choose every row's post-processing on the val split, "
                              "then score --split test once."),
    params: Optional[Path] = typer.Option(None, "--params", help="Use the parameters tuned by an earlier run "
                                          "(its evaluation.json)."),
    save: bool = typer.Option(False, "--save", help="With --tune: write the chosen post-processing into each "
                              "models folder's postprocess.json (what detect then uses)."),
    search: str = _SEARCH, autoencoder: Optional[Path] = _AE, mkd: Optional[Path] = _MKD,
    no_baselines: bool = _NOBASE, cache_dir: Optional[Path] = _CACHE, no_cache: bool = _NOCACHE,
    limit: Optional[int] = _LIMIT,
    floor: Optional[float] = base._FLOOR, opening_mm: Optional[float] = base._OPEN,
    closing_mm: Optional[float] = base._CLOSE, min_area_mm2: Optional[float] = base._MINAREA,
    otsu_scope: Optional[str] = _SCOPE, same_femur: bool = _SAME, overwrite: bool = _OVERWRITE,
):
    """Table 1 (Dice, IoU, Sens, Spec, Acc; pooled and per case; femur and whole volume; lesion-wise F1)
    and Figure 3 for ours at each resolution and the baselines, the paper's numbers beside."""
    from bmltrt.evaluation.evaluate import check_inputs, load_params, run
    from bmltrt.evaluation.tables import print_table, write_outputs

    check_inputs(data, split, out_dir, tune)
    refuse_earlier_results(out_dir, RUN_OUTPUTS + (("postprocess*.json",) if tune else ()), overwrite)
    _check_search(search)
    overrides = _overrides(floor, opening_mm, closing_mm, min_area_mm2, otsu_scope)
    if tune and (params or overrides):
        raise BmlError("--tune chooses the post-processing itself", hint="drop --params and the "
                       "--floor/--opening-mm/--closing-mm/--min-area-mm2/--otsu-scope options, or drop --tune")
    if save and not tune:
        raise BmlError("--save writes what --tune chose", hint="add --tune (or use `bmltrt evaluate tune --save`)")
    given = load_params(params) if params else None
    plan = _plan(models, resolutions, backend, device, autoencoder, mkd, no_baselines, overrides, same_femur)
    if given is not None:
        uncovered = [m.key for m in plan.methods if m.key not in given]
        if uncovered:
            base.print_warning(f"--params has no setting for {', '.join(uncovered)}: "
                               "those rows use their defaults (the models folder's postprocess.json for ours)")
    with base._progress() as prog:
        doc = run(plan, data, split, tune=tune, params=given, space=search, cache=_cache(cache_dir, no_cache),
                  limit=limit, progress=_progress_cb(prog))
    paths = write_outputs(doc, out_dir)
    print_table(doc, base.out)
    written = [p.name for p in paths.values()]
    if tune:
        written += [_write_postprocess(plan, label, pp, out_dir, save)
                    for label, pp in doc["tuning"]["postprocess"].items()]
    # --overwrite: an earlier run's results that this one did not make (a figure it had no
    # lesions to draw, another model set's postprocess_<label>.json) must not pass for its own
    _remove_stale(out_dir, RUN_OUTPUTS + (("postprocess*.json",) if tune else ()), written)
    base.say(f"outputs in {out_dir}: {', '.join(sorted(written))}")


def _remove_stale(out_dir: Path, patterns, written) -> None:
    import fnmatch

    removed = remove_stale_results(out_dir, "|".join(fnmatch.translate(p) for p in patterns), written)
    if removed:
        base.say(f"removed the earlier run's {', '.join(removed)} (this run made no such file)")


def _write_postprocess(plan, label, doc, out_dir, save):
    from bmltrt.io.atomic import atomic_write
    from bmltrt.postprocess.tuned import write_tuned

    name = "postprocess.json" if len(plan.model_sets) == 1 else f"postprocess_{label}.json"
    atomic_write(Path(out_dir) / name, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1) + "\n"))
    if save:
        root = next(ms.root for ms in plan.model_sets if ms.label == label)
        base.say(f"post-processing for [{label}] saved: {write_tuned(root, doc)}")
    return name


@evaluate_app.command("tune")
@base.user_errors
def tune_cmd(
    data: Path = typer.Argument(..., help="Dataset folder with a val split."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for tuning.json and postprocess.json."),
    resolutions: Optional[str] = _RESS, models: Optional[List[str]] = _MODELS,
    backend: str = base._BACKEND, device: str = base._DEVICE,
    save: bool = typer.Option(False, "--save", help="Write the chosen post-processing into each models folder's "
                              "postprocess.json: `detect` uses it from then on."),
    search: str = _SEARCH, autoencoder: Optional[Path] = _AE, mkd: Optional[Path] = _MKD,
    no_baselines: bool = _NOBASE, cache_dir: Optional[Path] = _CACHE, no_cache: bool = _NOCACHE,
    limit: Optional[int] = _LIMIT, same_femur: bool = _SAME, overwrite: bool = _OVERWRITE,
):
    """Choose the post-processing (floor, Otsu scope, opening, closing, minimum area) on the val split only."""
    from bmltrt.evaluation.evaluate import check_inputs, clean, tune_split
    from bmltrt.io.atomic import atomic_write

    check_inputs(data, "val", out_dir, False)
    refuse_earlier_results(out_dir, ("tuning.json", "postprocess*.json"), overwrite)
    _check_search(search)
    plan = _plan(models, resolutions, backend, device, autoencoder, mkd, no_baselines, same_femur=same_femur)
    with base._progress() as prog:
        tuning = tune_split(plan, data, space=search, cache=_cache(cache_dir, no_cache), limit=limit,
                            progress=_progress_cb(prog))
    atomic_write(Path(out_dir) / "tuning.json", lambda tmp: Path(tmp).write_text(json.dumps(clean(tuning), indent=1)))
    for k, r in tuning["methods"].items():
        b = r["best"]
        base.say(f"{k:28s} val pooled Dice {r['dice']:.3f} (defaults {r['default_dice'] or float('nan'):.3f}): "
                 f"floor {b['floor']:.3g}, otsu {b['otsu_scope']}, opening {b['opening_mm']:g} mm, "
                 f"closing {b['closing_mm']:g} mm, min area {b['min_area_mm2']:g} mm2")
    written = ["tuning.json"] + [_write_postprocess(plan, label, pp, out_dir, save)
                                 for label, pp in tuning["postprocess"].items()]
    _remove_stale(out_dir, ("tuning.json", "postprocess*.json"), written)
    base.say(f"outputs in {out_dir}: {', '.join(written)}")


@evaluate_app.command("table")
@base.user_errors
def table_cmd(
    runs: List[Path] = typer.Argument(..., help="evaluation.json files (or their folders) of `bmltrt evaluate`."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Write report.md, table1.csv and a "
                                           "Figure 3 per data set here."),
    readme: Optional[Path] = typer.Option(None, "--readme", help="Paste the short report between the results "
                                          "markers of this README."),
    overwrite: bool = _OVERWRITE,
):
    """One report from several runs: data sets one after the other, models folders side by side."""
    import os

    from bmltrt.evaluation.figure import size_figure
    from bmltrt.evaluation.tables import (check_readme, csv_text, merge, paste_readme, print_table, read_documents,
                                          report_markdown)
    from bmltrt.io.atomic import atomic_write

    docs = read_documents(runs)
    # what was read: never removed or replaced by this run's outputs
    inputs = {Path(p).resolve() for p in runs} | {(Path(p) / "evaluation.json").resolve() for p in runs}
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise BmlError("the output path is a file, not a folder", out_dir, "give a folder with -o")
    table_outputs = ("report.md", "table1_*.csv", "figure3_*.png")
    if out_dir is not None:
        refuse_earlier_results(out_dir, table_outputs, overwrite)
        planned = [out_dir / "report.md"] + [out_dir / f"{stem}_{i + 1}.{ext}" for i in range(len(docs))
                                            for stem, ext in (("table1", "csv"), ("figure3", "png"))]
        for p in planned:
            if p.resolve() in inputs:
                raise BmlError("an input of this command would be overwritten by its output", p,
                               "choose another -o, or move the input")
    if readme is not None:
        check_readme(readme)
    stale_names = r"table1_[1-9]\d*\.csv|figure3_[1-9]\d*\.png"
    removed = []
    if out_dir is not None and overwrite and out_dir.is_dir():  # before writing: a file that cannot go stops the run first
        removed = remove_stale_results(out_dir, stale_names, planned, keep=inputs)
    groups: dict[tuple, list] = {}
    where: dict[tuple, Path] = {}
    for d, p in zip(docs, runs):
        key = (d["data"]["path"], d["data"]["split"])
        groups.setdefault(key, []).append(d)
        where.setdefault(key, Path(p) if Path(p).is_dir() else Path(p).parent)
    figures: dict[tuple, Path] = {}
    written: list[Path] = []
    for i, (key, ds) in enumerate(groups.items()):
        if len(ds) == 1 and (where[key] / "figure3.png").exists():
            figures[key] = where[key] / "figure3.png"
        if out_dir is not None:
            f = size_figure(ds, out_dir / f"figure3_{i + 1}.png")
            if f:
                figures[key] = f
                written.append(f)
            written.append(out_dir / f"table1_{i + 1}.csv")
            atomic_write(written[-1], lambda tmp, ds=ds: Path(tmp).write_text(
                csv_text(merge(ds) if len(ds) > 1 else ds[0])))
        print_table(merge(ds) if len(ds) > 1 else ds[0], base.out)

    def rel(to: Path):
        return {k: os.path.relpath(v, to) for k, v in figures.items()}

    if out_dir is not None:
        atomic_write(out_dir / "report.md", lambda tmp: Path(tmp).write_text(report_markdown(docs, figure=rel(out_dir))))
        if overwrite:  # a figure planned but not drawn this time: the earlier one goes too
            removed += remove_stale_results(out_dir, stale_names, written + [out_dir / "report.md"], keep=inputs)
        for name in removed:
            base.out.print(f"removed {name} of the earlier run")
        base.say(f"outputs in {out_dir}")
    if readme is not None:
        paste_readme(readme, report_markdown(docs, short=True, figure=rel(readme.resolve().parent)))
        base.say(f"results pasted into {readme}")


@evaluate_app.command("model-card")
@base.user_errors
def model_card_cmd(
    data: Path = typer.Argument(..., help="Dataset folder (`bmltrt synth`)."),
    split: str = typer.Option("test", "--split"),
    out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the JSON to this file too."),
    resolution: Optional[int] = base._RES, models: Optional[Path] = base._MODELS,
    backend: str = base._BACKEND, device: str = base._DEVICE, limit: Optional[int] = _LIMIT,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing -o file."),
):
    """The model card's figures: femur Dice of the segmenter; masked L1 of the inpainter against simple fills."""
    from bmltrt.evaluation.evaluate import check_inputs, clean
    from bmltrt.evaluation.model_card import model_card
    from bmltrt.io.atomic import atomic_write

    check_inputs(data, split, None, False, allowed=("train", "val", "test"))
    if out_file is not None:  # before minutes of work; never onto the dataset, never over a file unasked
        _check_out_file(out_file, data, overwrite)
    det = base._detector(resolution, backend, device, models, None, None, None, None)
    with base._progress() as prog:
        res = model_card(det, data, split, limit, lambda d, n, c: _progress_cb(prog)("model card", d, n, c))
    text = json.dumps(clean(res), indent=1)
    if out_file is not None:
        atomic_write(out_file, lambda tmp: Path(tmp).write_text(text + "\n"))
    base.say(text)


def _check_out_file(out_file: Path, data: Path, overwrite: bool) -> None:
    if out_file.is_dir():
        raise BmlError("-o is a folder; give a file name", out_file, "e.g. -o card.json")
    if Path(data).resolve() in out_file.resolve().parents:
        raise BmlError("-o is inside the dataset folder, which is only read", out_file, "write it elsewhere")
    if out_file.exists() and not overwrite:
        raise BmlError("the file exists", out_file, "add --overwrite to replace it, or choose another -o")
    base._check_out_dir(out_file.parent)


# -- the baselines' networks ---------------------------------------------------------------

def _train_baseline(kind, data, labels, out_dir, bank_cache, phantoms, phantom_fraction, val_data, steps, batch_size,
                    lr, device, seed, resume, val_every, limit_cases, time_limit, trainer):
    d = base._DataOptions(data, labels, bank_cache, phantoms, phantom_fraction, val_data)
    base._train_common(kind, d, out_dir, None, steps, batch_size, lr, device, seed, resume, val_every, limit_cases,
                       time_limit, trainer=trainer)


def _check_res(resolution):
    if resolution < 32 or resolution > 1024 or resolution % 16:
        raise BmlError(f"--resolution {resolution} is not a multiple of 16 between 32 and 1024",
                       hint="use 128 (CPU) up to 448")


def train_autoencoder_cmd(data: Optional[Path] = base._DATA, labels: Optional[Path] = base._LABELS,
                          out_dir: Path = base._OUT, bank_cache: Optional[Path] = base._BANK,
                          phantoms: int = base._PHANTOMS, phantom_fraction: Optional[float] = base._PFRAC,
                          val_data: Optional[Path] = base._VALDATA,
                          config: str = typer.Option("small", "--config", help="Preset: small or tiny."),
                          resolution: int = typer.Option(128, "--resolution", help="Slice size it learns."),
                          steps: int = typer.Option(2000, "--steps", min=1), batch_size: int = typer.Option(16, "--batch-size", min=1),
                          lr: float = typer.Option(2e-3, "--lr", min=0.0), device: str = base._DEV,
                          seed: int = base._SEED, resume: bool = base._RESUME, val_every: int = base._VAL,
                          limit_cases: Optional[int] = base._LIMIT, time_limit: Optional[float] = base._TIME):
    """Baseline (b): a convolutional autoencoder on whole healthy slices (the inpainter's data options)."""
    _check_res(resolution)

    def trainer(opts, progress):
        from bmltrt.evaluation.autoencoder import AUTOENCODER_PRESETS, train_autoencoder

        if config not in AUTOENCODER_PRESETS:
            raise BmlError(f"unknown --config {config!r}", hint=f"choose {', '.join(AUTOENCODER_PRESETS)}")
        return train_autoencoder(opts, AUTOENCODER_PRESETS[config], resolution, progress)

    _train_baseline("autoencoder", data, labels, out_dir, bank_cache, phantoms, phantom_fraction, val_data, steps,
                    batch_size, lr, device, seed, resume, val_every, limit_cases, time_limit, trainer)


def train_mkd_cmd(vgg16_weights: Path = typer.Option(..., "--vgg16-weights", help="torchvision's VGG16 ImageNet "
                                                     "weights (vgg16-397923af.pth): the expert."),
                  data: Optional[Path] = base._DATA, labels: Optional[Path] = base._LABELS,
                  out_dir: Path = base._OUT, bank_cache: Optional[Path] = base._BANK,
                  phantoms: int = base._PHANTOMS, phantom_fraction: Optional[float] = base._PFRAC,
                  val_data: Optional[Path] = base._VALDATA,
                  resolution: int = typer.Option(128, "--resolution", help="Slice size (the paper's MKD rows: 320, 448)."),
                  lam: float = typer.Option(0.5, "--lambda", help="Weight of the MSE term beside the cosine term."),
                  steps: int = typer.Option(2000, "--steps", min=1), batch_size: int = typer.Option(16, "--batch-size", min=1),
                  lr: float = typer.Option(1e-3, "--lr", min=0.0), device: str = base._DEV,
                  seed: int = base._SEED, resume: bool = base._RESUME, val_every: int = base._VAL,
                  limit_cases: Optional[int] = base._LIMIT, time_limit: Optional[float] = base._TIME):
    """Baseline (c): MKD's cloner, distilled from a VGG16 expert on healthy slices (needs the expert's weights)."""
    _check_res(resolution)

    def trainer(opts, progress):
        from bmltrt.evaluation.mkd import load_vgg16_features, train_mkd

        return train_mkd(opts, load_vgg16_features(vgg16_weights), resolution, lam, progress)

    _train_baseline("mkd", data, labels, out_dir, bank_cache, phantoms, phantom_fraction, val_data, steps,
                    batch_size, lr, device, seed, resume, val_every, limit_cases, time_limit, trainer)


def register(app: typer.Typer, train_app: typer.Typer) -> None:
    app.add_typer(evaluate_app, name="evaluate")
    train_app.command("autoencoder")(base.user_errors(train_autoencoder_cmd))
    train_app.command("mkd")(base.user_errors(train_mkd_cmd))
