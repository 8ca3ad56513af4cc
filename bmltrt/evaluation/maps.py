"""Per scan, computed once: the predicted femur, and every method's anomaly map.

What does not depend on the inpainting resolution (loading, normalising, segmenting the
femur, the femur-plausibility check) is done once per scan and segmenter; each method's
anomaly map once per scan (and resolution). Maps are kept cropped to the predicted femur
(with a margin that covers every closing footprint the evaluation uses), on disk in a
cache keyed by the scan file, the networks' sha256 and every setting that changes the
map, so tuning and testing, and a second run, never recompute them. A lesion mask is then
`mask_from_anomaly` on the crop — the same function `detect` ends with — pasted back.

Methods (one anomaly map per scan each; the same post-processing turns any of them into
a mask, with its own parameters chosen on the validation split):
- `ours`: the paper's method, max(HE(x) - HE(x~), 0) with x~ the LaMa composite;
- `intensity`: HE of the scan over the predicted femur alone, no inpainting (baseline a);
- `autoencoder`: max(HE(x) - HE(AE(x)), 0), a global reconstruction (baseline b);
- `mkd`: multiresolution knowledge distillation's gradient map (baseline c).
Every baseline scores the femur of the first models folder's segmenter, so rows differ
only in the anomaly map.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bmltrt.errors import BmlError
from bmltrt.io.atomic import atomic_write
from bmltrt.postprocess import PostConfig, equalize_hist, otsu_thresholds
from bmltrt.postprocess.lesion import anomaly_map, mask_from_anomaly

MAX_CLOSING_MM = 5.0  # the crop margin: no evaluated closing may be larger
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    if os.environ.get("BMLTRT_CACHE"):
        return Path(os.environ["BMLTRT_CACHE"]) / "evaluation"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "bmltrt" / "evaluation"


def file_identity(path: Path) -> dict:
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


class MapCache:
    """Arrays on disk (one compressed .npz per key: the crops are mostly zeros outside the
    femur); `None` root: nothing is kept."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root else None
        self.hits = self.misses = 0

    @staticmethod
    def key(desc: dict) -> str:
        text = json.dumps({"v": CACHE_VERSION, **desc}, sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:24]

    def has(self, desc: dict) -> bool:
        """An entry that reads whole (every array, CRC checked): a damaged one is recomputed."""
        if self.root is None or not (self.root / f"{self.key(desc)}.npz").exists():
            return False
        hits, misses = self.hits, self.misses
        whole = self.get(desc) is not None
        self.hits, self.misses = hits, misses  # a look, not a use
        return whole

    def get(self, desc: dict) -> dict | None:
        if self.root is None:
            return None
        p = self.root / f"{self.key(desc)}.npz"
        if not p.exists():
            self.misses += 1
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                out = {k: z[k] for k in z.files}
        except Exception:  # noqa: BLE001 -- a damaged entry (cut short, bad CRC, not a zip) is recomputed
            self.misses += 1
            return None
        self.hits += 1
        return out

    def put(self, desc: dict, arrays: dict) -> None:
        if self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)
        atomic_write(self.root / f"{self.key(desc)}.npz", write, suffix=".npz")


# -- the truth and the predicted femur ---------------------------------------------------

@dataclass
class Truth:
    """One case's ground truth, in the working orientation."""

    case: str
    lesion: np.ndarray  # bool
    femur: np.ndarray  # bool, the true femur
    spacing: tuple[float, float, float]
    voxel_mm3: float

    @property
    def shape(self):
        return self.lesion.shape

    @property
    def pixel_mm(self) -> tuple[float, float]:
        return (self.spacing[1], self.spacing[2])


@dataclass
class FemurCrop:
    """The predicted femur of one scan (one segmenter) on the slices that get scored,
    cropped with a margin; every anomaly map of that scan and segmenter uses this box."""

    box: tuple[int, int, int, int, int, int]  # s0, s1, y0, y1, x0, x1
    femur: np.ndarray  # bool crop; zero on slices that are not scored
    slices: list[int]  # scored slices (full-volume indices)
    refused: str  # "" or why the pipeline refuses the scan (then nothing is scored)
    femur_dice: float  # of the femur the pipeline reports, against the true femur

    @property
    def region(self):
        s0, s1, y0, y1, x0, x1 = self.box
        return (slice(s0, s1), slice(y0, y1), slice(x0, x1))

    def crop(self, full: np.ndarray) -> np.ndarray:
        return full[self.region]

    def paste(self, crop_mask: np.ndarray, shape) -> np.ndarray:
        full = np.zeros(shape, bool)
        if crop_mask.size:
            full[self.region] = crop_mask
        return full

    def to_arrays(self) -> dict:
        return {"box": np.asarray(self.box, np.int64), "femur": self.femur,
                "slices": np.asarray(self.slices, np.int64), "refused": np.asarray(self.refused),
                "femur_dice": np.asarray(self.femur_dice, np.float64)}

    @classmethod
    def from_arrays(cls, a: dict) -> "FemurCrop":
        return cls(tuple(int(v) for v in a["box"]), a["femur"].astype(bool), [int(v) for v in a["slices"]],
                   str(a["refused"]), float(a["femur_dice"]))


def femur_cleanup_of(det) -> dict:
    """The detector's femur clean-up and slice rule: part of what a cached femur or map is."""
    c = det.config
    return {"threshold": c.femur_threshold, "refine": [c.femur_refine_mm, c.femur_refine_eps, c.femur_refine_passes],
            "edge_slice_fraction": c.edge_slice_fraction,
            "notch_fill": [c.notch_fill_mm, c.notch_fill_gate], "femur_min_slice_fraction": c.femur_min_slice_fraction,
            "mirror_tta": c.mirror_tta, "seg_antialias": c.seg_antialias,
            "lesion_rescue_percentile": c.lesion_rescue_percentile}


def scored_slices(femur: np.ndarray, spacing, edge_fraction: float | None = None) -> list[int]:
    """The slices the pipeline inpaints and scores (the pipeline's rule)."""
    from bmltrt.pipeline import EDGE_SLICE_FRACTION, femur_slice_plan

    frac = EDGE_SLICE_FRACTION if edge_fraction is None else edge_fraction
    return [int(i) for i in np.flatnonzero(femur_slice_plan(femur, spacing, frac))]


def make_crop(femur: np.ndarray, spacing, refused: str, femur_dice: float,
              edge_fraction: float | None = None) -> FemurCrop:
    """Box of the femur on its scored slices, grown in-plane by MAX_CLOSING_MM."""
    slices = [] if refused else scored_slices(femur, spacing, edge_fraction)
    if not slices:
        return FemurCrop((0, 0, 0, 0, 0, 0), np.zeros((0, 0, 0), bool), [], refused, femur_dice)
    scored = np.zeros(femur.shape[0], bool)
    scored[slices] = True
    fem = femur & scored[:, None, None]
    ys = np.flatnonzero(fem.any(axis=(0, 2)))
    xs = np.flatnonzero(fem.any(axis=(0, 1)))
    my = int(math.ceil(MAX_CLOSING_MM / spacing[1])) + 1
    mx = int(math.ceil(MAX_CLOSING_MM / spacing[2])) + 1
    h, w = femur.shape[1:]
    box = (min(slices), max(slices) + 1, max(0, ys[0] - my), min(h, ys[-1] + 1 + my),
           max(0, xs[0] - mx), min(w, xs[-1] + 1 + mx))
    crop = FemurCrop(box, np.zeros(0, bool), slices, refused, femur_dice)
    crop.femur = crop.crop(fem).copy()
    return crop


# -- anomaly maps ------------------------------------------------------------------------

@dataclass
class AnomalyMap:
    score: np.ndarray  # float32 crop; zero outside the femur and on slices not scored
    otsu: np.ndarray  # float32 per crop slice: Otsu over the femur (+inf: no femur)
    seconds: float = 0.0  # what computing it took (0 when it came from the cache)


def crop_map(full_score: np.ndarray, crop: FemurCrop, nbins: int = 256) -> AnomalyMap:
    score = np.ascontiguousarray(crop.crop(full_score), np.float32) * crop.femur
    otsu = otsu_thresholds(score, crop.femur, nbins) if score.size else np.zeros(0, np.float32)
    return AnomalyMap(score.astype(np.float32), np.asarray(otsu, np.float32))


def mask_of(amap: AnomalyMap, crop: FemurCrop, pixel_mm, cfg: PostConfig) -> np.ndarray:
    """The lesion mask (crop) of one method and parameter set: detect's own last step."""
    if cfg.closing_mm > MAX_CLOSING_MM:
        raise ValueError(f"closing {cfg.closing_mm} mm is larger than the evaluation's crop margin "
                         f"({MAX_CLOSING_MM} mm)")
    if amap.score.size == 0 or not crop.slices:
        return np.zeros(amap.score.shape, bool)
    return np.asarray(mask_from_anomaly(amap.score, amap.otsu, crop.femur, pixel_mm, cfg), bool)


def engine_of(det) -> list[str]:
    """Backend, device and precision: the same network on another engine gives other maps."""
    b = det.backend
    return [b.name, b.device, b.precision]


def slice_indices(slices, n: int) -> list[int]:
    """The pipeline's "which slices were inpainted", as a list of indices (it may hand a
    list, or one bool per slice)."""
    a = np.asarray(slices)
    if a.dtype == bool and a.shape == (n,):
        return [int(i) for i in np.flatnonzero(a)]
    return [int(i) for i in a.ravel()]


@dataclass
class ScanContext:
    """What a method needs to compute its map for one scan (segmenter of its models set)."""

    case: str
    norm: np.ndarray  # normalised volume (normalize_intensity)
    spacing: tuple[float, float, float]
    femur: np.ndarray  # predicted femur, full, bool
    crop: FemurCrop


class Method:
    """One row of the table: a way to turn a scan into an anomaly map."""

    name = ""  # ours, intensity, autoencoder, mkd
    title = ""
    resolution: int | None = None
    models: str | None = None  # label of the models folder the row belongs to
    femur_from: str | None = None  # label of the models folder whose segmenter gives the femur

    @property
    def femur_label(self) -> str | None:
        return self.femur_from or self.models

    @property
    def key(self) -> str:
        return "/".join(str(p) for p in (self.name, self.models, self.resolution) if p is not None)

    def identity(self) -> dict:
        """Everything that changes the map (the cache key, with the scan and the femur)."""
        raise NotImplementedError

    def identity_for(self, shape, spacing) -> dict:
        """identity() for a scan of this working shape and spacing (for settings that a
        scan's grid resolves)."""
        return self.identity()

    def compute(self, ctx: ScanContext) -> np.ndarray:
        """Full-size float32 anomaly map (only the scored femur slices matter)."""
        raise NotImplementedError

    def default_params(self) -> PostConfig:
        return PostConfig()

    def describe(self) -> dict:
        return {"key": self.key, "method": self.name, "title": self.title, "models": self.models,
                "resolution": self.resolution, "femur_from": self.femur_label}


def load_truth_mask(path: Path, image_path: Path):
    """A dataset's mask (a Scan), refused in one line where it is not a binary mask on its
    scan's voxel grid (same shape and affine): scores against it would be silently wrong."""
    import nibabel as nib

    from bmltrt.io import load_scan

    scan = load_scan(path, is_mask=True)
    try:
        ref = nib.load(str(image_path))  # the header only; the scan itself is read (and checked) later
    except Exception:
        ref = None
    if ref is not None:
        if tuple(scan.input_shape[:3]) != tuple(ref.shape[:3]):
            raise BmlError(f"the mask's grid {tuple(scan.input_shape[:3])} is not its scan's {tuple(ref.shape[:3])}",
                           path, f"a mask must be on the voxel grid of {Path(image_path).name}")
        if not np.allclose(scan.image.affine, ref.affine, atol=1e-3):
            raise BmlError("the mask's affine differs from its scan's (another orientation, position or voxel size)",
                           path, f"a mask must be on the voxel grid of {Path(image_path).name}")
    data = scan.data
    if np.issubdtype(data.dtype, np.integer) and data.min() >= 0:
        values = np.flatnonzero(np.bincount(data.ravel().astype(np.int64, copy=False)))
    else:
        values = np.unique(data)
    if len(values) > 2 or (len(values) == 2 and values[0] != 0) or not np.all(values == np.round(values)):
        shown = ", ".join(f"{v:g}" for v in values[:4]) + (", ..." if len(values) > 4 else "")
        raise BmlError(f"not a binary mask (values {shown})", path, "a mask holds 0 and one label value")
    return scan


class OursMethod(Method):
    name = "ours"
    title = "LaMa inpainting (ours)"

    def __init__(self, detector, models_label: str, femur_from: str | None = None):
        self.det = detector
        self.models = models_label
        self.femur_from = femur_from
        self.resolution = detector.resolution

    def identity(self) -> dict:
        c = self.det.config
        ident = {"method": "ours", "inpainter": self.det.inp_entry["sha256"], "resolution": self.resolution,
                 "mask_dilate_mm": c.mask_dilate_mm, "nbins": PostConfig().nbins, "engine": engine_of(self.det)}
        if c.inpaint_mirrors != 1:  # keyed only when on: the maps cached without it stand
            ident["inpaint_mirrors"] = c.inpaint_mirrors
        return ident

    def identity_for(self, shape, spacing) -> dict:
        # the margin as this scan's grid resolves it: a rule and a number giving the same
        # margin make the same map
        return {**self.identity(), "mask_dilate_mm": round(self.det.repainting_margin_mm(shape, spacing), 4)}

    def compute(self, ctx: ScanContext) -> np.ndarray:
        comp, sl = self.det.inpaint(ctx.norm, ctx.femur, ctx.spacing)
        sl = slice_indices(sl, ctx.norm.shape[0])
        if sorted(sl) != ctx.crop.slices:
            raise RuntimeError(f"{ctx.case}: the pipeline inpainted slices {sl}, the evaluation scores "
                               f"{ctx.crop.slices}")
        full = np.zeros(ctx.norm.shape, np.float32)
        if sl:
            diff, _ = anomaly_map(ctx.norm[sl], comp[sl], ctx.femur[sl])
            full[sl] = np.asarray(diff)
        return full

    def default_params(self) -> PostConfig:
        return self.det.config.post


class IntensityMethod(Method):
    name = "intensity"
    title = "threshold on HE(scan) in the femur (no inpainting)"

    def __init__(self, models_label: str):
        self.models = models_label

    def identity(self) -> dict:
        return {"method": "intensity", "nbins": PostConfig().nbins}

    def compute(self, ctx: ScanContext) -> np.ndarray:
        full = np.zeros(ctx.norm.shape, np.float32)
        sl = ctx.crop.slices
        if sl:
            fem = ctx.femur[sl]
            full[sl] = equalize_hist(ctx.norm[sl], mask=fem) * fem
        return full

    def default_params(self) -> PostConfig:
        # The brightest 5% of each slice's femur, cleaned like ours.
        return PostConfig(floor=0.95, otsu_scope="none")


@dataclass
class SplitMaps:
    """Everything one split gives: truths, crops (per models label), and map locations."""

    data: Path
    split: str
    cases: list[str] = field(default_factory=list)
    truths: dict[str, Truth] = field(default_factory=dict)
    crops: dict[tuple[str, str], FemurCrop] = field(default_factory=dict)  # (models, case)
    map_keys: dict[tuple[str, str], dict] = field(default_factory=dict)  # (method key, case) -> cache desc
    memory: dict[tuple[str, str], AnomalyMap] = field(default_factory=dict)  # without a cache
    seconds: dict[str, list[float]] = field(default_factory=dict)  # stage -> per-scan seconds
    n_scans_loaded: int = 0

    def amap(self, cache: MapCache, method_key: str, case: str) -> AnomalyMap:
        if (method_key, case) in self.memory:
            return self.memory[(method_key, case)]
        a = cache.get(self.map_keys[(method_key, case)])
        if a is None:  # written by this run, then removed or damaged by someone else
            raise BmlError(f"the cached anomaly map of {method_key} for {case} was removed or damaged while this "
                           "run used it (another run on the same cache folder?)", cache.root,
                           "run again; give runs at the same time their own --cache")
        return AnomalyMap(a["score"], a["otsu"])


def compute_split(data: Path, split: str, model_sets, methods: list[Method], cache: MapCache,
                  limit: int | None = None, progress=None) -> SplitMaps:
    """Load every case of the split once; segment once per models set; compute (or take
    from the cache) every method's anomaly map. `model_sets`: [(label, Detector)] — the
    detector's segmenter and stages are used, never its whole `detect`."""
    from bmltrt.evaluation.metrics import confusion, scores
    from bmltrt.io import load_scan
    from bmltrt.postprocess.femur_check import check_femur
    from bmltrt.runtime.preprocess import normalize_intensity
    from bmltrt.synth.dataset import case_paths

    cases = case_paths(data, split)[:limit]
    out = SplitMaps(Path(data), split)
    needed = {m.femur_label for m in methods}
    model_sets = [(label, det) for label, det in model_sets if label in needed]
    seg_of = dict(model_sets)
    for k, (case, img_p, fem_p, les_p) in enumerate(cases):
        if progress:
            progress(k, len(cases), case)
        truth_scan = load_truth_mask(les_p, img_p)
        femur_true = load_truth_mask(fem_p, img_p).data > 0
        truth = Truth(case, truth_scan.data > 0, femur_true, truth_scan.spacing, truth_scan.voxel_volume_mm3)
        out.cases.append(case)
        out.truths[case] = truth
        scan_id = file_identity(img_p)
        loaded: dict = {}

        def norm_of():
            if "norm" not in loaded:
                t0 = time.perf_counter()
                scan = load_scan(img_p)
                loaded["norm"] = normalize_intensity(scan.data)
                loaded["spacing"] = scan.spacing
                out.n_scans_loaded += 1
                out.seconds.setdefault("load", []).append(time.perf_counter() - t0)
            return loaded["norm"]

        femurs: dict[str, np.ndarray] = {}
        for label, det in model_sets:
            desc = {"kind": "femur", "scan": scan_id, "segmenter": det.seg_entry["sha256"], "engine": engine_of(det),
                    "margin_mm": MAX_CLOSING_MM, **femur_cleanup_of(det), "femur_truth": file_identity(fem_p)}
            hit = cache.get(desc)
            if hit is not None:
                out.crops[(label, case)] = FemurCrop.from_arrays(hit)
                continue
            norm = norm_of()
            sp = loaded["spacing"]
            t0 = time.perf_counter()
            prob = det.femur_probability(norm, sp)
            femur = np.asarray(det.femur_mask(prob, sp), bool)
            check = check_femur(prob, femur, sp, norm)
            refused = check.reasons[0] if check.refuse else ""
            reported = np.zeros_like(femur) if refused else femur
            crop = make_crop(femur, sp, refused, scores(confusion(reported, femur_true))["dice"],
                             det.config.edge_slice_fraction)
            out.seconds.setdefault("femur", []).append(time.perf_counter() - t0)
            cache.put(desc, crop.to_arrays())
            out.crops[(label, case)] = crop
            femurs[label] = femur
        for m in methods:
            crop = out.crops[(m.femur_label, case)]
            desc = {"kind": "map", "scan": scan_id, "segmenter": seg_of[m.femur_label].seg_entry["sha256"],
                    "engine": engine_of(seg_of[m.femur_label]),
                    "margin_mm": MAX_CLOSING_MM, **femur_cleanup_of(seg_of[m.femur_label]),
                    "method": m.identity_for(truth_scan.data.shape, truth_scan.spacing)}
            out.map_keys[(m.key, case)] = desc
            if cache.has(desc):
                continue
            norm = norm_of()
            sp = loaded["spacing"]
            if m.femur_label not in femurs:  # cached crop, but this map is new: segment again
                det = seg_of[m.femur_label]
                femurs[m.femur_label] = np.asarray(det.femur_mask(det.femur_probability(norm, sp), sp), bool)
            t0 = time.perf_counter()
            amap = AnomalyMap(np.zeros(crop.femur.shape, np.float32), np.zeros(crop.femur.shape[0], np.float32))
            if crop.slices:
                amap = crop_map(m.compute(ScanContext(case, norm, sp, femurs[m.femur_label], crop)), crop)
            out.seconds.setdefault(m.key, []).append(time.perf_counter() - t0)
            if cache.root is None:
                out.memory[(m.key, case)] = amap
            else:
                cache.put(desc, {"score": amap.score, "otsu": amap.otsu})
    if progress:
        progress(len(cases), len(cases), "done")
    return out
