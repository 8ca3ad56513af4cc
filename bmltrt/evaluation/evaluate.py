"""The paper's Table 1 and Figure 3 on a dataset with exact truth: our method at every
inpainting resolution, for one or more models folders, beside the baselines.

    plan = Plan(...)            what to run (models folders, resolutions, baselines)
    doc  = run(plan, ...)       tune on val (optional), then score the split once
    write_outputs(doc, out)     evaluation.json, table1.{csv,md}, cases.csv, figure3.png

Each scan is loaded once and segmented once per models folder; each method's anomaly map
is computed once per scan (bmltrt.evaluation.maps) and every metric and every parameter
setting reuses it. Voxel scores are given pooled (all cases' voxels counted together)
and as per-case means, over the whole volume and over the true femur; lesion-wise
scores count 3D components (bmltrt.evaluation.metrics).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bmltrt import __version__
from bmltrt.errors import BmlError
from bmltrt.evaluation.maps import IntensityMethod, MapCache, Method, OursMethod, compute_split, mask_of
from bmltrt.evaluation.metrics import evaluate_case, summarize
from bmltrt.evaluation.tables import PAPER_NOTE, PAPER_TABLE1, paper_row
from bmltrt.evaluation.tune import SPACES, tune_method
from bmltrt.postprocess import PostConfig

SPLITS = ("val", "test")
FORMAT = "bmltrt-evaluation-2"


@dataclass
class ModelSet:
    label: str
    root: Path
    detectors: dict[int, object]  # resolution -> Detector (one backend: models loaded once)

    @property
    def first(self):
        return next(iter(self.detectors.values()))

    def describe(self) -> dict:
        d = self.first
        man = d.backend.store.manifest
        inp = {r: det.inp_entry["sha256"] for r, det in self.detectors.items()}
        trained = {r: man["models"][f"inpainter_{r}"].get("trained", {}).get("steps") for r in self.detectors}
        return {"label": self.label, "dir": str(self.root), "segmenter": d.seg_entry["sha256"],
                "inpainters": inp, "inpainter_steps": trained,
                "backend": d.backend.name, "device": d.backend.device, "precision": d.backend.precision}


def parse_models(specs: list[str] | None) -> list[tuple[str, Path | None]]:
    """`--models` values: DIR or LABEL=DIR; none: the shipped models, labelled "shipped"."""
    if not specs:
        return [("shipped", None)]
    out, seen = [], set()
    for s in specs:
        label, _, d = s.rpartition("=") if "=" in s else ("", "", s)
        if not d.strip():
            raise BmlError(f"--models {s!r} names no folder", hint="give --models DIR or --models LABEL=DIR")
        path = Path(d)
        label = label or path.resolve().name
        if "/" in label or "\\" in label or label.startswith(".") or not label.isprintable():
            # the label names result files (postprocess_<label>.json): never a path
            raise BmlError(f"--models label {label!r} cannot name files (no /, \\, leading dot or control "
                           "characters)", path, "give --models LABEL=DIR with a plain label")
        if label in seen:
            raise BmlError(f"two --models folders are labelled {label!r}", path, "name them: --models LABEL=DIR")
        seen.add(label)
        out.append((label, path))
    return out


def open_model_sets(specs, resolutions, backend="auto", device="auto", post_overrides=None,
                    warn=lambda msg: None) -> list[ModelSet]:
    from bmltrt.pipeline import DetectConfig, Detector
    from bmltrt.runtime.backends import make_backend

    sets = []
    for label, root in parse_models(specs):
        be, warns = make_backend(backend, device, root)
        for w in warns:
            warn(w)
        res = resolutions or [be.store.default_resolution]
        dets = {r: Detector(be, DetectConfig(resolution=r, post_overrides=dict(post_overrides or {}))) for r in res}
        # Verified now, not when a network first runs: with a warm map cache none may run,
        # and figures would be reported for a corrupt or swapped models folder.
        for name in {"segmenter", *(d.inp_name for d in dets.values())}:
            be.spec(name)  # sha256, then the graph's shapes against the manifest's
        sets.append(ModelSet(label, be.store.root, dets))
    return sets


@dataclass
class Plan:
    model_sets: list[ModelSet]
    autoencoder: Path | None = None
    mkd: Path | None = None
    intensity: bool = True
    same_femur: bool = False  # every row scores the first models folder's femur
    methods: list[Method] = field(default_factory=list)
    missing: list[dict] = field(default_factory=list)  # rows that cannot run here, and why

    def build(self) -> "Plan":
        ref = self.model_sets[0].label
        for ms in self.model_sets:
            self.methods += [OursMethod(det, ms.label, ref if self.same_femur else None)
                             for det in ms.detectors.values()]
        if self.intensity:
            self.methods.append(IntensityMethod(ref))
        for option, path in (("--autoencoder", self.autoencoder), ("--mkd", self.mkd)):
            if path is not None:
                baseline_needs_torch(option, path)
        if self.autoencoder is not None:
            from bmltrt.evaluation.autoencoder import AutoencoderMethod, AutoencoderScorer

            self.methods.append(AutoencoderMethod(AutoencoderScorer(self.autoencoder), ref))
        else:
            self.missing.append({"method": "autoencoder", "title": "convolutional autoencoder (global)",
                                 "note": "not run: give --autoencoder CKPT (`bmltrt train autoencoder`)"})
        if self.mkd is not None:
            from bmltrt.evaluation.mkd import MkdMethod, MkdScorer

            scorer = MkdScorer(self.mkd)
            self.methods.append(MkdMethod(scorer, ref))
        else:
            from_paper = [{"method": "mkd", "title": "MKD (Salehi et al.)", "resolution": r,
                           "note": "needs VGG16 ImageNet weights, not available"} for r in (320, 448)]
            self.missing += from_paper
        return self


def baseline_needs_torch(option: str, path: Path) -> None:
    """A baseline network's checkpoint must exist, and torch (not in the runtime) must be there
    to run it: one line each, not an internal error."""
    import importlib.util

    if not Path(path).is_file():
        raise BmlError(f"{option}: no such checkpoint", path, f"give a checkpoint.pt, or leave out {option}")
    if importlib.util.find_spec("torch") is None:
        raise BmlError(f"{option}: the baseline network runs in torch, which is not installed", path,
                       f"pip install 'bmltrt[train]', or leave out {option}")


def check_inputs(data: Path, split: str, out_dir: Path | None, tune: bool, allowed=SPLITS) -> None:
    """Everything that can be wrong with the command line, before any model is loaded."""
    from bmltrt.synth.dataset import read_manifest

    if split not in allowed:
        raise BmlError(f"--split {split!r} is not a split with lesions to score" if allowed == SPLITS
                       else f"--split {split!r} is not a split", hint=f"choose {' or '.join(allowed)}")
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise BmlError("the output path is a file, not a folder", out_dir, "give a folder with -o")
    if not Path(data).is_dir():
        raise BmlError("dataset folder not found", data, "make one with `bmltrt synth`")
    man = read_manifest(data)
    for s in (["val"] if tune else []) + [split]:
        if s not in man["splits"]:
            raise BmlError(f"the dataset has no {s} split", Path(data) / "dataset.json")
        if not man["splits"][s]:
            raise BmlError(f"the {s} split of the dataset is empty", data,
                           "--tune needs a val split" if s == "val" and tune and s != split
                           else "choose a split with cases (dataset.json lists them)")
    if tune and split == "val":
        raise BmlError("--tune chooses the parameters on val, so it scores --split test",
                       hint="drop --tune to score val with the current parameters")


def load_params(path: Path) -> dict[str, PostConfig]:
    """Per-method parameters from an earlier run's evaluation.json (its tuning block)."""
    try:
        doc = json.loads(Path(path).read_text())
        return {k: PostConfig.from_dict(v["best"]) for k, v in doc["tuning"]["methods"].items()}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BmlError(f"no tuned parameters in this file ({type(exc).__name__})", path,
                       "give the evaluation.json of a run made with --tune") from None


def _median(v) -> float | None:
    return float(np.median(v)) if v else None


def tune_split(plan: Plan, data: Path, *, space: str = "full", cache: MapCache | None = None,
               limit: int | None = None, progress=None, command: str | None = None) -> dict:
    """Every method's post-processing chosen on the val split, and per models folder the
    postprocess.json `detect` would read."""
    from bmltrt.postprocess.tuned import tuned_document

    cache = cache or MapCache(None)
    prog = progress or (lambda *a: None)
    model_sets = [(ms.label, ms.first) for ms in plan.model_sets]
    val = compute_split(data, "val", model_sets, plan.methods, cache, limit, lambda d, n, c: prog("val: maps", d, n, c))
    if not any(t.lesion.any() for t in val.truths.values()):
        # every setting that calls nothing scores 1.0: a "tuned" setting would be noise
        raise BmlError(f"the val split holds no true lesion in its {len(val.cases)} case(s): nothing to tune on",
                       Path(data) / "dataset.json", "tune on a dataset whose val split has lesions (phantoms from "
                       "`bmltrt synth`, or painted label maps with lesions)")
    tuning = {"data": str(data), "split": "val", "cases": len(val.cases), "space": space, "methods": {},
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": command or " ".join(["bmltrt"] + sys.argv[1:]),
              "seconds_per_scan": {k: _median(v) for k, v in val.seconds.items()}, "postprocess": {}}
    for m in plan.methods:
        tuning["methods"][m.key] = tune_method(val, cache, m, SPACES[space][m.name],
                                               lambda d, n, c, m=m: prog(f"val: tune {m.key}", d, n, c))
    info = {"data": str(data), "split": "val", "cases": len(val.cases), "objective": "pooled whole-volume lesion Dice",
            "date": tuning["date"], "command": tuning["command"]}
    for i, ms in enumerate(plan.model_sets):
        if plan.same_femur and i > 0:
            continue  # tuned on another folder's femur: not this folder's setting for detect
        by_res = {}
        for r in ms.detectors:
            t = tuning["methods"].get(f"ours/{ms.label}/{r}")
            if t:
                by_res[r] = {**t["best"], "val_dice": t["dice"]}
        tuning["postprocess"][ms.label] = tuned_document(ms.first.backend.store.manifest, by_res, info)
    return tuning


def run(plan: Plan, data: Path, split: str, *, tune: bool = False, params: dict | None = None,
        space: str = "full", cache: MapCache | None = None, limit: int | None = None, progress=None,
        command: str | None = None) -> dict:
    """Tune on val (if asked), then score `split` once. Returns the evaluation document."""
    cache = cache or MapCache(None)
    prog = progress or (lambda *a: None)
    model_sets = [(ms.label, ms.first) for ms in plan.model_sets]
    params = dict(params or {})
    sources = {k: "given" for k in params}
    tuning = None
    t0 = time.perf_counter()
    if tune:
        tuning = tune_split(plan, data, space=space, cache=cache, limit=limit, progress=progress, command=command)
        for key, r in tuning["methods"].items():
            params[key] = PostConfig.from_dict(r["best"])
            sources[key] = f"tuned on val ({tuning['cases']} cases, pooled Dice {r['dice']:.3f})"
    maps = compute_split(data, split, model_sets, plan.methods, cache, limit,
                         lambda d, n, c: prog(f"{split}: maps", d, n, c))
    rows, case_rows = [], []
    for m in plan.methods:
        prog(f"{split}: score", 0, 1, m.key)
        cfg = params.get(m.key)
        if cfg is None:
            cfg = m.default_params()
            src = (m.det.config.post_source if isinstance(m, OursMethod) else "defaults (not tuned)")
        else:
            src = sources[m.key]
        results, fem_dice, refused = [], [], []
        for case in maps.cases:
            truth = maps.truths[case]
            crop = maps.crops[(m.femur_label, case)]
            pred = crop.paste(mask_of(maps.amap(cache, m.key, case), crop, truth.pixel_mm, cfg), truth.shape)
            r = evaluate_case(case, pred, truth.lesion, truth.femur, truth.voxel_mm3)
            results.append(r)
            fem_dice.append(crop.femur_dice)
            if crop.refused:
                refused.append(case)
            case_rows.append({"row": m.key, **r.row(), "femur_dice": crop.femur_dice, "refused": crop.refused})
        row = {**m.describe(), "status": "ok", "params": _short(cfg), "params_source": src,
               "summary": summarize(results), "femur_dice_mean": float(np.mean(fem_dice)) if fem_dice else None,
               "femur_dice_min": float(np.min(fem_dice)) if fem_dice else None, "refused": refused,
               "map_seconds_per_scan": _median(maps.seconds.get(m.key, []))}
        if isinstance(m, OursMethod):
            row["seconds_per_scan_note"] = "inpainting + anomaly map; femur segmentation is counted once per scan"
        rows.append(row)
    for miss in plan.missing:
        rows.append({"key": "/".join(str(p) for p in (miss["method"], miss.get("resolution")) if p is not None),
                     "models": None, "resolution": miss.get("resolution"), **miss, "status": "not run"})
    for r in rows:
        r["paper"] = paper_row(r["method"], r.get("resolution"))
    settings = _dataset_settings(data)  # read once: mode and painter
    n_lesions = sum(r["summary"]["lesion_wise"]["n_true"] for r in rows[:1] if r["status"] == "ok")
    first = plan.model_sets[0].first.backend
    doc = {
        "format": FORMAT,
        "command": command or " ".join(["bmltrt"] + sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "bmltrt_version": __version__,
        "machine": machine(),
        "data": {"path": str(data), "split": split, "n_cases": len(maps.cases), "n_lesions": n_lesions,
                 "mode": settings.get("mode", "phantom"), "painter": _painter_of(settings), "limit": limit,
                 "labels_from": Path(str(settings.get("labels_dir", ""))).name or None},
        "backend": {"name": first.name, "device": first.device, "precision": first.precision},
        "model_sets": [ms.describe() for ms in plan.model_sets],
        "regions": {"volume": "every voxel of the scan", "femur": "voxels inside the true femur mask"},
        "rows": rows,
        "paper": {"table1": PAPER_TABLE1, "note": PAPER_NOTE},
        "tuning": tuning,
        "timing": {"seconds": round(time.perf_counter() - t0, 1),
                   "seconds_per_scan": {k: _median(v) for k, v in maps.seconds.items()},
                   "scans_loaded": maps.n_scans_loaded, "cache": str(cache.root) if cache.root else None,
                   "cache_hits": cache.hits},
        "cases": case_rows,
    }
    return clean(doc)


def _short(cfg: PostConfig) -> dict:
    d = cfg.to_dict()
    d.pop("nbins", None)
    return d


def _dataset_settings(data: Path) -> dict:
    try:
        return json.loads((Path(data) / "dataset.json").read_text())["settings"]
    except (OSError, KeyError, TypeError, ValueError):  # ValueError: JSONDecodeError, UnicodeDecodeError
        return {"mode": "unknown"}


def _painter_of(settings: dict) -> int | None:
    """Painter version of a `--from-labels` dataset (those made before it was recorded: 1);
    scores on painted data compare only within one version."""
    return int(settings.get("painter", 1)) if settings.get("mode") == "labels" else None


def _painter(data: Path) -> int | None:
    return _painter_of(_dataset_settings(data))


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "system": f"{platform.system()} {platform.machine()}", "numpy": np.__version__}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def clean(o):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if isinstance(o, dict):
        return {str(k): clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [clean(v) for v in o]
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return clean(o.item())
    if isinstance(o, Path):
        return str(o)
    return o
