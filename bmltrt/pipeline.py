"""The whole method for one scan or many, models loaded once.

load/reorient -> femur segmentation (3D sliding window) -> femur clean-up (largest 3D
component, holes filled) -> per femur slice: resize to the working resolution,
normalise, stack(x*(1-m), m), inpaint in batches, resize back, composite -> HE,
difference, Otsu, opening, closing -> lesion mask on the input's own grid.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from bmltrt import __version__
from bmltrt.arrays import array_module, ndimage_of, to_numpy
from bmltrt.errors import BmlError
from bmltrt.io import Scan
from bmltrt.postprocess import PostConfig, lesion_mask
from bmltrt.postprocess.femur_check import check_femur
from bmltrt.runtime.backends import Backend
from bmltrt.runtime.preprocess import inplane_shape, normalize_intensity, slices_to_square, square_to_slices, zoom_to
from bmltrt.runtime.sliding_window import sliding_window

MIN_FEMUR_SLICE_MM2 = 20.0  # slices with less femur than this are not inpainted
# Real BMLs rarely exceed a few percent of the femur; more means a suspect femur mask.
SUSPICIOUS_LESION_FRACTION = 0.05


@dataclass
class DetectConfig:
    resolution: int | None = None  # None: the models' default
    mask_dilate_mm: float = 1.0  # the inpainter paints a little beyond the femur border
    batch_size: int = 8
    femur_threshold: float = 0.5
    # None: the models folder's postprocess.json for this resolution (tuned on a validation
    # split by `bmltrt evaluate tune --save`), else PostConfig's defaults; then
    # `post_overrides` (field -> value, the CLI's explicit options) on top.
    post: PostConfig | None = None
    post_overrides: dict = field(default_factory=dict)
    post_source: str = ""  # filled in by Detector: where `post` came from

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Detection:
    scan: Scan
    femur: np.ndarray  # uint8, working orientation
    lesion: np.ndarray  # uint8, working orientation
    normalized: np.ndarray  # float32 scan as the models saw it (for pictures)
    timings: dict
    report: dict


def largest_component_filled(mask):
    xp = array_module(mask)
    nd = ndimage_of(xp)
    if not bool(mask.any()):
        return mask
    labels, n = nd.label(mask, structure=xp.ones((3, 3, 3), bool))
    if int(n) > 1:
        sizes = xp.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(sizes.argmax())
    structure = xp.zeros((3, 3, 3), bool)
    structure[1] = nd.generate_binary_structure(2, 1)
    return nd.binary_fill_holes(mask, structure=structure)


def resolve_post(config: DetectConfig, store, resolution: int) -> tuple[DetectConfig, list[str]]:
    """The config with `post` filled in (see DetectConfig.post), and any warnings."""
    from bmltrt.postprocess.tuned import read_tuned

    warnings: list[str] = []
    post, source = config.post, "given"
    if post is None:
        post, source, warnings = read_tuned(store.root, store.manifest, resolution)
        post = post or PostConfig()
    if config.post_overrides:
        post = dataclasses.replace(post, **config.post_overrides)
        source += " + options " + ", ".join(sorted(config.post_overrides))
    return dataclasses.replace(config, post=post, post_source=source), warnings


class Detector:
    """Holds a backend (models loaded once) and runs the method on scans."""

    def __init__(self, backend: Backend, config: DetectConfig | None = None):
        self.backend = backend
        self.config = config or DetectConfig()
        store = backend.store
        self.seg_entry = store.entry("segmenter")
        self.seg_cfg = self.seg_entry["config"]
        res = self.config.resolution or store.default_resolution
        if res not in store.resolutions():
            raise BmlError(f"no inpainter for --resolution {res}", store.root,
                           f"choose one of {store.resolutions()}")
        self.resolution = res
        self.inp_name = f"inpainter_{res}"
        self.inp_entry = store.entry(self.inp_name)
        self.config, self.post_warnings = resolve_post(self.config, store, res)

    # -- stages -------------------------------------------------------------------
    def femur_probability(self, norm, spacing, on_patch=None):
        """Femur probability of a normalised volume (normalize_intensity), on its own grid."""
        cfg = self.seg_cfg
        shape = inplane_shape(norm.shape, spacing, cfg["inplane_spacing_mm"])
        small = zoom_to(norm, shape)
        prob = sliding_window(small, tuple(cfg["patch"]), lambda b: self.backend.run("segmenter", b),
                              batch_size=2, overlap=cfg["overlap"], on_patch=on_patch)[1]
        return zoom_to(prob, norm.shape, order=1)

    def femur_mask(self, prob):
        """The largest piece of the thresholded probability, holes filled."""
        return largest_component_filled(prob > self.config.femur_threshold)

    def segment_femur(self, norm, spacing, on_patch=None):
        """Femur mask of a normalised volume, on its own grid."""
        return self.femur_mask(self.femur_probability(norm, spacing, on_patch))

    def inpaint(self, norm, femur, spacing, on_batch=None):
        """Composite x~ for every slice with femur (other slices returned unchanged)."""
        xp = array_module(norm)
        nd = ndimage_of(xp)
        s, h, w = norm.shape
        area_mm2 = femur.reshape(s, -1).sum(axis=1) * spacing[1] * spacing[2]
        idx = xp.flatnonzero(area_mm2 > MIN_FEMUR_SLICE_MM2)
        out = norm.copy()
        if idx.size == 0:
            return out, []
        mask = femur[idx]
        r = self.config.mask_dilate_mm
        if r > 0:
            ry, rx = max(1, int(round(r / spacing[1]))), max(1, int(round(r / spacing[2])))
            fp = xp.zeros((1, 2 * ry + 1, 2 * rx + 1), bool)
            yy, xx = xp.ogrid[-ry:ry + 1, -rx:rx + 1]
            fp[0] = (yy / ry) ** 2 + (xx / rx) ** 2 <= 1
            mask = nd.binary_dilation(mask, structure=fp)
        res = self.resolution
        x_sq = slices_to_square(norm[idx], res)
        m_sq = (slices_to_square(mask.astype(xp.float32), res) > 0.5).astype(xp.float32)
        gen = xp.empty_like(x_sq)
        bs = self.config.batch_size
        for i in range(0, len(idx), bs):
            xb, mb = x_sq[i:i + bs], m_sq[i:i + bs]
            inp = xp.stack([xb * (1 - mb), mb], axis=1)
            gen[i:i + bs] = self.backend.run(self.inp_name, inp)[:, 0]
            if on_batch:
                on_batch(min(i + bs, len(idx)), len(idx))
        gen_full = square_to_slices(gen, h, w)
        m = mask.astype(xp.float32)
        out[idx] = m * gen_full + (1 - m) * norm[idx]
        return out, [int(i) for i in to_numpy(idx)]

    # -- the whole scan -----------------------------------------------------------
    def detect(self, scan: Scan, progress=None) -> Detection:
        t = {}
        t0 = time.perf_counter()
        vol = scan.data  # numpy; a GPU backend would upload once here
        spacing = scan.spacing
        norm = normalize_intensity(vol)
        prob = self.femur_probability(norm, spacing, on_patch=progress and (lambda d, n: progress("femur", d, n)))
        femur = self.femur_mask(prob)
        check = check_femur(prob, femur, spacing, norm)
        if check.refuse:
            raise BmlError(check.reasons[0], scan.path, "give a sagittal knee MRI (see the README: inputs)")
        t["femur_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        x_tilde, slices = self.inpaint(norm, femur, spacing,
                                       on_batch=progress and (lambda d, n: progress("inpaint", d, n)))
        t["inpaint_s"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        lesion = np.zeros(vol.shape, bool)
        if slices:
            lesion[slices] = to_numpy(lesion_mask(norm[slices], x_tilde[slices], femur[slices],
                                                  (spacing[1], spacing[2]), self.config.post))
        t["postprocess_s"] = time.perf_counter() - t2
        t["total_s"] = time.perf_counter() - t0
        femur_np = to_numpy(femur).astype(np.uint8)
        lesion_np = lesion.astype(np.uint8)
        report = self._report(scan, femur_np, lesion_np, t, slices, check)
        return Detection(scan, femur_np, lesion_np, to_numpy(norm), t, report)

    def _report(self, scan, femur, lesion, timings, slices, check) -> dict:
        from bmltrt.evaluation.metrics import components

        vox = scan.voxel_volume_mm3
        labels, n = components(lesion)
        lesions = []
        if n:
            for i in range(1, n + 1):
                where = np.argwhere(labels == i)
                lesions.append({
                    "id": i, "volume_mm3": round(float(len(where) * vox), 3), "voxels": int(len(where)),
                    # slice numbers as in the working orientation (sagittal, left -> right)
                    "slices": sorted({int(s) for s in where[:, 0]}),
                })
            lesions.sort(key=lambda d: -d["volume_mm3"])
        store = self.backend.store
        warnings = list(scan.warnings) + self.post_warnings
        fem_mm3, les_mm3 = float(femur.sum() * vox), float(lesion.sum() * vox)
        warnings += [f"implausible femur mask: {r}; look at the overlay before trusting any figure"
                     for r in check.reasons]
        if fem_mm3 > 0 and les_mm3 > SUSPICIOUS_LESION_FRACTION * fem_mm3:
            warnings.append(f"lesions cover {100 * les_mm3 / fem_mm3:.0f}% of the femur (real lesions rarely "
                            "exceed a few percent): check the femur mask and the lesions in the overlay")
        return {
            "bmltrt_version": __version__,
            "input": {"path": str(scan.path), "shape": list(scan.input_shape),
                      "spacing_mm": [round(s, 4) for s in scan.spacing], "orientation": "".join(scan.input_axcodes)},
            "lesion_count": n,
            "lesion_volume_mm3": round(float(lesion.sum() * vox), 3),
            "lesions": lesions,
            "slices_with_lesion": sorted({s for d in lesions for s in d["slices"]}),
            "femur_volume_mm3": round(float(femur.sum() * vox), 1),
            "femur_check": check.to_dict(),
            "slices_inpainted": len(slices),
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "backend": self.backend.name, "device": self.backend.device, "precision": self.backend.precision,
            "resolution": self.resolution,
            "models": {name: {"file": e["file"], "sha256": e["sha256"]}
                       for name, e in (("segmenter", self.seg_entry), (self.inp_name, self.inp_entry))},
            "models_dir": str(store.root),
            "config": self.config.to_dict(),
            "warnings": warnings,
            "slice_axis": "working slices run left->right; 0 is the leftmost sagittal slice",
        }
