"""The whole method for one scan or many, models loaded once.

load/reorient -> upload (GPU loop) -> femur segmentation (3D sliding window) -> edge
refinement at the scan's resolution (guided filter) -> femur clean-up (largest 3D
component, holes filled, notches, slivers) -> per femur slice: resize to the working
resolution, normalise, stack(x*(1-m), m), inpaint in batches, resize back, composite ->
HE, difference, Otsu, opening, closing -> download -> lesion mask on the input's grid.

One code path for numpy (CPU) and cupy (GPU). On the GPU the scan is uploaded once,
every stage runs on the backend's stream without reading anything back to the host
(shapes never depend on the data: all slices go through the inpainter, those without
enough femur keep a zero mask), and the masks come back in one download.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bmltrt import __version__
from bmltrt.arrays import array_module, masked_percentile
from bmltrt.errors import BmlError
from bmltrt.io import Scan
from bmltrt.io.dicom import SERIES_STEM
from bmltrt.io.knee_input import check_knee_input
from bmltrt.morphology import binary_closing, binary_dilation, fill_holes_inplane, largest_component
from bmltrt.postprocess import PostConfig, lesion_mask
from bmltrt.postprocess.femur_check import check_femur
from bmltrt.postprocess.guided import guided_filter_near
from bmltrt.runtime.backends import Backend
from bmltrt.runtime.models import MANIFEST, damaged_manifest, segmenter_config_damage
from bmltrt.runtime.preprocess import (normalize_intensity, slices_to_square, square_grid_pixel_mm, square_to_slices,
                                       to_segmenter_grid, zoom_to)
from bmltrt.runtime.sliding_window import sliding_window

MIN_FEMUR_SLICE_MM2 = 20.0  # slices with less femur than this are not inpainted
# The outermost sagittal slices cut the condyles tangentially: a thin cap of bone mixed
# with cartilage and fluid by the slice thickness, brighter than marrow in the scan but
# not in the repainting. On painted OAI_AKOA val, slices with under 30 % of the largest
# femur slice's area held a quarter of the false-positive voxels and no true lesion.
EDGE_SLICE_FRACTION = 0.3
# Chosen on painted OAI_AKOA val (scripts/femur_border.py, scripts/edge_slices.py; see
# DetectConfig): 6-12 mm and gates 0.05-0.1 all scored 0.305-0.311 (no fill 0.272), but gate
# 0.1 took bright fluid at the anterior femur of the real qDESS echo 2 into the mask and
# called it a lesion; gate 0.3 (val 0.29 at full resolution) does not.
NOTCH_FILL_MM, NOTCH_FILL_GATE = 6.0, 0.3
# Femur-mask slices under this share of the largest femur slice's area are dropped from the
# mask: on the real scans they were fragments in muscle or fluid beside the outermost
# condyle (qDESS echo 1 slices 2, 5, 32; echo 2 slices 5, 31); on painted OAI_AKOA val they
# cost 0.0005 of femur Dice, and they were never searched (EDGE_SLICE_FRACTION).
FEMUR_MIN_SLICE_FRACTION = 0.1
# The inpainter repaints the femur grown by this many of its own pixels (see
# DetectConfig.mask_dilate_mm): the bright cartilage it must not carry into the marrow is
# blurred over a pixel or two of the inpainter's grid, so the margin scales with that grid's
# pixel (the scan's square field / the resolution: 0.63 mm for a 160 mm field at 256, where
# 3.2 pixels are 2 mm). Painted OAI_AKOA val, benchmarks/results/inpaint_margin/.
MASK_DILATE_INPAINTER_PX = 3.2


def inpainter_pixel_mm(shape, spacing, resolution: int) -> float:
    """Side of one inpainter pixel in mm: the slice's field, padded to a square in mm
    (runtime.preprocess.slices_to_square with the scan's pixel size), over the resolution."""
    return square_grid_pixel_mm(shape[-2], shape[-1], resolution, (spacing[-2], spacing[-1]))


def default_mask_dilate_mm(shape, spacing, resolution: int) -> float:
    return MASK_DILATE_INPAINTER_PX * inpainter_pixel_mm(shape, spacing, resolution)


# The upsampled 1.6 mm femur probability is pulled onto the scan's own edges by a guided
# filter (bmltrt.postprocess.guided) of this window radius and regulariser, applied this many
# times. Painted OAI_AKOA val (scripts/femur_refine.py, 256, benchmarks/results/femur_refine/):
# femur Dice 0.968 -> 0.972, pooled lesion Dice 0.295 -> 0.383; the 19 settings tried
# (radius 2-8 mm, eps 0.001-0.1, 1-3 passes) scored 0.31-0.38.
FEMUR_REFINE_MM, FEMUR_REFINE_EPS, FEMUR_REFINE_PASSES = 4.0, 0.001, 2
# Real qDESS echo 1 / echo 2 femur Dice (the same knee), stage-6 segmenter: 0.902 -> 0.915
# (top 80 rows, the shaft: 0.75 -> 0.84). benchmarks/results/mirror_tta/.
MIRROR_TTA = True
# The inpainter was trained with random in-plane flips, and its repaintings of a slice and of
# the slice mirrored differ by the generator's guesswork: averaging k of them (1: one pass;
# 2: the columns mirrored too; 4: rows, columns and both) costs k inpainter passes. Painted
# OAI_AKOA val at 256 (pooled lesion Dice, tuned): 1 / 2 / 4: 0.369 / 0.369 / 0.376; phantom
# val 0.728 (1) / 0.731 (4): about what one knee moves, for 4x the inpainter's time, so off.
# benchmarks/results/inpaint_mirrors/.
INPAINT_MIRRORS = 1
INPAINT_FLIPS = {1: [()], 2: [(), (-1,)], 4: [(), (-1,), (-2,), (-2, -1)]}
# The segmenter was trained on scans drawn on its 1.6 mm grid, where a pixel averages its
# whole area; linear resampling of a 0.36 mm scan keeps the fine pixels' noise and aliasing.
# Smoothing first (2.5 x scikit-image's anti-aliasing sigma, about 1.5 mm) makes the real
# qDESS echo-1 / echo-2 femur masks agree better (0.915 -> 0.934) with the same painted-OAI
# femur Dice (0.970), but carves bright subchondral lesions out of the femur (val lesion
# voxels inside it 91 % -> 75 %, pooled lesion Dice 0.320 -> 0.255). A second, sharp pass
# puts back what it calls femur above the 90th percentile of the femur's intensity: echo
# 0.932, val 0.321 (phantom val 0.724 against 0.728). benchmarks/results/segmenter_antialias/.
SEG_ANTIALIAS = 2.5
LESION_RESCUE_PERCENTILE = 90.0
NOTCH_FILL_GRID_MM = 1.0  # the closing runs on a grid of about this pixel size (speed)
# Real BMLs rarely exceed a few percent of the femur; more means a suspect femur mask.
SUSPICIOUS_LESION_FRACTION = 0.05
FULL_3D = np.ones((3, 3, 3), bool)


@dataclass
class DetectConfig:
    resolution: int | None = None  # None: the models' default
    # The inpainter repaints the femur grown by this margin: a lesion whose edge pokes out of
    # the repainted region is context that the inpainter continues into it, and bright
    # cartilage left just outside it is carried a pixel or two of the inpainter's grid into
    # the repainted marrow over subchondral lesions (the difference, and the lesion, vanish;
    # benchmarks/results/lesion_map_variants/). Painted OAI_AKOA val (160 mm fields),
    # stage-6 segmenter (benchmarks/results/inpaint_margin/), pooled lesion Dice at 256 for
    # 0 / 1 / 1.5 / 1.875 / 2 / 2.5 mm: 0.268 / 0.321 / 0.337 / 0.355 / 0.369 / 0.370; at
    # 128 / 192 / 320 / 448 the best was about as many inpainter pixels (3.75-4 / 2.5 / 1.5 /
    # 1 mm), where 2 mm everywhere lost at 448 (0.432 -> 0.378). None: MASK_DILATE_INPAINTER_PX
    # pixels of this scan's inpainter grid (default_mask_dilate_mm); a number: that margin in mm.
    mask_dilate_mm: float | None = None
    batch_size: int = 8  # slices per inpainter call
    seg_batch_size: int | None = None  # patches per segmenter call; None: 2 on the CPU, 4 on the GPU
    femur_threshold: float = 0.5
    # The femur probability is averaged with that of the mirrored knee (left <-> right, as
    # in training): twice the segmenter's time. MIRROR_TTA says what it bought.
    mirror_tta: bool = MIRROR_TTA
    inpaint_mirrors: int = INPAINT_MIRRORS  # repaintings averaged per slice: 1, 2 or 4 (INPAINT_MIRRORS)
    # Gaussian smoothing before the scan is resampled to the segmenter's grid, in multiples
    # of scikit-image's anti-aliasing sigma (runtime.preprocess.to_segmenter_grid; 0: off),
    # and the femur-intensity percentile above which a second, unsmoothed pass may add
    # femur (0: no second pass). See SEG_ANTIALIAS.
    seg_antialias: float = SEG_ANTIALIAS
    lesion_rescue_percentile: float = LESION_RESCUE_PERCENTILE
    # guided-filter refinement of the femur probability at the scan's resolution (see
    # FEMUR_REFINE_MM): window radius in mm (0: off), regulariser, passes
    femur_refine_mm: float = FEMUR_REFINE_MM
    femur_refine_eps: float = FEMUR_REFINE_EPS
    femur_refine_passes: int = FEMUR_REFINE_PASSES
    # Notches in the femur border are filled where the segmenter was only unsure: an
    # in-plane closing of this radius, kept where the femur probability exceeds the gate.
    # A bright subchondral lesion is often cut out of the mask as a notch (then never
    # repainted, so never found); cartilage and fluid in the trochlea and the notch have a
    # probability near 0 and stay out. 0: off.
    notch_fill_mm: float = NOTCH_FILL_MM
    notch_fill_gate: float = NOTCH_FILL_GATE
    femur_min_slice_fraction: float = FEMUR_MIN_SLICE_FRACTION  # 0: keep every femur slice
    # slices whose femur area is under this share of the largest femur slice's are neither
    # inpainted nor searched (0: every slice with MIN_FEMUR_SLICE_MM2 of femur)
    edge_slice_fraction: float = EDGE_SLICE_FRACTION
    # True: every slice goes through the inpainter (shapes never depend on the data, so the
    # GPU loop never waits for the device); False: only slices with femur. None: True on
    # the GPU, False on the CPU. The masks are the same either way.
    static_shapes: bool | None = None
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


def _input_order(working_values, scan: Scan) -> list:
    """Per-axis values in working order -> the file's array order."""
    out = [0.0, 0.0, 0.0]
    for i in range(3):
        out[i] = working_values[int(scan.to_working[i, 0])]
    return out


def _slice_areas(femur):
    return femur.reshape(femur.shape[0], -1).sum(axis=1)


def femur_slice_plan(femur, spacing, edge_fraction: float = EDGE_SLICE_FRACTION):
    """(S,) bool: the slices with at least MIN_FEMUR_SLICE_MM2 of femur and at least
    `edge_fraction` of the largest femur slice's area. numpy or cupy, no host sync."""
    area = _slice_areas(femur)
    return (area * (spacing[1] * spacing[2]) > MIN_FEMUR_SLICE_MM2) & (area >= edge_fraction * area.max())


def fill_notches(femur, prob, spacing, radius_mm: float, gate: float):
    """`femur` plus what an in-plane closing of `radius_mm` adds where `prob` > `gate`.

    The closing runs on every k-th pixel (k: about NOTCH_FILL_GRID_MM per pixel), its
    result repeated back to full size: a 6 mm disc at 0.36 mm is ~900 offsets, at 1 mm ~110
    (5.5 s -> well under a second on a CPU; on cupy each offset is a kernel). numpy or cupy,
    no host sync."""
    if radius_mm <= 0:
        return femur
    xp = array_module(femur)
    ky = max(1, int(NOTCH_FILL_GRID_MM / spacing[1]))
    kx = max(1, int(NOTCH_FILL_GRID_MM / spacing[2]))
    ry, rx = max(1, int(round(radius_mm / (ky * spacing[1])))), max(1, int(round(radius_mm / (kx * spacing[2]))))
    yy, xx = np.ogrid[-ry:ry + 1, -rx:rx + 1]
    disc = ((yy / ry) ** 2 + (xx / rx) ** 2 <= 1)[None]  # host footprint
    coarse = femur[:, ::ky, ::kx]
    # zero margins: binary_closing counts outside as background, which would erode a femur
    # that touches the crop's edge
    pad = ((0, 0), (ry, ry), (rx, rx))
    closed = binary_closing(xp.pad(coarse, pad), disc)[:, ry:ry + coarse.shape[1], rx:rx + coarse.shape[2]]
    h, w = femur.shape[1:]
    up = xp.repeat(xp.repeat(closed, ky, axis=1), kx, axis=2)[:, :h, :w]
    return femur | (up & (prob > gate))


def largest_component_filled(mask):
    """Largest 3D component (26-connected), then in-plane holes filled (no device sync)."""
    return fill_holes_inplane(largest_component(mask, FULL_3D))


class StageClock:
    """Stage timings: wall clock on the CPU; CUDA events on the GPU, read after the
    download (which waits for the device anyway), so timing adds no synchronisation."""

    def __init__(self, xp, stream=None):
        self.gpu = xp is not np
        self.stream = stream
        self.marks: list[tuple[str, object]] = []
        self.mark("start")

    def mark(self, name: str):
        if self.gpu:
            import cupy

            ev = cupy.cuda.Event()
            ev.record(self.stream)
            self.marks.append((name, ev))
        else:
            self.marks.append((name, time.perf_counter()))

    def seconds(self) -> dict:
        """{stage: seconds since the previous mark}; call after the download."""
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            if self.gpu:
                import cupy

                out[name] = cupy.cuda.get_elapsed_time(a, b) / 1000.0
            else:
                out[name] = b - a
        return out


def resolve_post(config: DetectConfig, store, resolution: int) -> tuple[DetectConfig, list[str]]:
    """The config with `post` filled in (see DetectConfig.post), and any warnings."""
    from bmltrt.postprocess.tuned import read_tuned

    warnings: list[str] = []
    post, source = config.post, "given"
    if post is None:
        post, source, warnings = read_tuned(store.root, store.manifest, resolution)
        post = post or PostConfig()
    if config.post_overrides:
        unknown = sorted(set(config.post_overrides) - set(PostConfig.__dataclass_fields__))
        if unknown:
            raise BmlError(f"post_overrides: {', '.join(unknown)} is not a post-processing setting",
                           hint=f"choose from {', '.join(PostConfig.__dataclass_fields__)}")
        try:
            post = dataclasses.replace(post, **config.post_overrides)
            if post.floor > 1:  # the difference map is in HE units: nothing passes a floor above 1
                raise ValueError(f"floor {post.floor!r} is not a number from 0 to 1")
        except (TypeError, ValueError) as exc:
            raise BmlError(f"post_overrides: {exc}") from None
        source += " + options " + ", ".join(sorted(config.post_overrides))
    return dataclasses.replace(config, post=post, post_source=source), warnings


class Detector:
    """Holds a backend (models loaded once) and runs the method on scans.

    The array module of the loop is the backend's (`backend.xp`): numpy on the CPU,
    cupy on the GPU, where everything runs on `backend.stream`.
    """

    def __init__(self, backend: Backend, config: DetectConfig | None = None, run_warnings=()):
        self.backend = backend
        self.config = config or DetectConfig()
        store = backend.store
        self.seg_entry = store.entry("segmenter")
        damage = segmenter_config_damage(self.seg_entry)
        if damage:
            raise damaged_manifest(damage, store.root / MANIFEST)
        self.seg_cfg = self.seg_entry["config"]
        res = store.default_resolution if self.config.resolution is None else self.config.resolution
        if res not in store.resolutions():
            what = (f"--resolution {res}" if self.config.resolution is not None
                    else f"the models folder's default resolution {res} (manifest.json)")
            raise BmlError(f"no inpainter for {what}", store.root, f"choose one of {store.resolutions()}")
        self.resolution = res
        self.inp_name = f"inpainter_{res}"
        self.inp_entry = store.entry(self.inp_name)
        self.config, self.post_warnings = resolve_post(self.config, store, res)
        self.run_warnings = list(run_warnings)  # the caller's (device or backend fallbacks): into every report
        self.xp = getattr(backend, "xp", np)
        self.stream = getattr(backend, "stream", None)
        self._run_takes_out = _takes_out(backend.run)
        on_gpu = self.xp is not np
        self.static = on_gpu if self.config.static_shapes is None else bool(self.config.static_shapes)
        self.seg_batch = self.config.seg_batch_size or (4 if on_gpu else 2)
        c = self.config
        if c.femur_refine_mm < 0 or (c.femur_refine_mm > 0 and (c.femur_refine_eps <= 0 or c.femur_refine_passes < 1)):
            raise BmlError(f"femur refinement needs a radius >= 0, eps > 0 and at least one pass (got "
                           f"{c.femur_refine_mm} mm, eps {c.femur_refine_eps}, {c.femur_refine_passes} passes)")
        if not 0 < c.femur_threshold < 1:  # NaN fails too
            raise BmlError(f"femur_threshold must be between 0 and 1 (got {c.femur_threshold})")
        if c.mask_dilate_mm is not None and not 0 <= c.mask_dilate_mm <= 50:
            raise BmlError(f"mask_dilate_mm must be from 0 to 50 mm, or None for the rule (got {c.mask_dilate_mm})")
        if c.inpaint_mirrors not in INPAINT_FLIPS:
            raise BmlError(f"inpaint_mirrors must be one of {sorted(INPAINT_FLIPS)} (got {c.inpaint_mirrors})")
        for what, n in (("--batch-size", self.config.batch_size), ("segmentation batch size", self.seg_batch)):
            if int(n) < 1:
                raise BmlError(f"{what} must be at least 1 (got {n})")

    def _on_stream(self):
        """Make the backend's stream current (cupy), or nothing (numpy)."""
        return self.stream if self.stream is not None and self.xp is not np else contextlib.nullcontext()

    # -- stages -------------------------------------------------------------------
    def upload(self, scan: Scan):
        """The scan as float32 in the loop's array module: the one host -> device copy."""
        return self.xp.asarray(np.asarray(scan.data, np.float32))

    def _infer(self, model, batch, out=None):
        """backend.run, into `out` (a backend without the `out` argument gets a copy)."""
        if out is None:
            return self.backend.run(model, batch)
        if self._run_takes_out:
            return self.backend.run(model, batch, out=out)
        out[...] = self.backend.run(model, batch)
        return out

    def femur_probability(self, norm, spacing, on_patch=None):
        """Femur probability of a normalised volume (normalize_intensity), on its own grid.

        The segmenter sees the scan smoothed before it is resampled to its grid
        (DetectConfig.seg_antialias): its border then agrees across contrasts. With
        DetectConfig.lesion_rescue_percentile it also sees the scan resampled without
        smoothing (sharp), and voxels brighter than that percentile of the femur that the
        sharp pass calls femur are femur too: bright subchondral lesions, which the smoothed
        pass carves out of the femur with the cartilage they blur into.
        """
        c, cfg = self.config, self.seg_cfg
        grid_mm = cfg["inplane_spacing_mm"]
        grids = [to_segmenter_grid(norm, spacing, grid_mm, c.seg_antialias)]
        rescue = c.seg_antialias > 0 and c.lesion_rescue_percentile > 0
        if rescue:
            grids.append(to_segmenter_grid(norm, spacing, grid_mm))
        mirror = 2 if c.mirror_tta else 1
        passes = len(grids) * mirror

        def window(vol, k):  # pass k of `passes`; on_patch gets (patches done, of all passes')
            tick = on_patch and (lambda d, n: on_patch(k * n + d, n * passes))
            return sliding_window(vol, tuple(cfg["patch"]), lambda b: self.backend.run("segmenter", b),
                                  batch_size=self.seg_batch, overlap=cfg["overlap"], on_patch=tick)[1]

        xp = array_module(norm)
        probs = []
        for g, small in enumerate(grids):
            prob = window(small, g * mirror)
            if mirror == 2:  # the mirrored knee (left <-> right: the slice axis), mirrored back
                prob = 0.5 * (prob + xp.flip(window(xp.ascontiguousarray(xp.flip(small, 0)), g * mirror + 1), 0))
            probs.append(prob)
        smooth = self.refine_probability(norm, zoom_to(probs[0], norm.shape, order=1), spacing)
        if not rescue:
            return smooth
        # the threshold from the sharp grid (point samples: the scan's own intensity spread)
        bright = masked_percentile(grids[1], probs[0] > c.femur_threshold, c.lesion_rescue_percentile)
        sharp = self.refine_probability(norm, zoom_to(probs[1], norm.shape, order=1), spacing)
        return xp.maximum(smooth, sharp * (norm > bright))

    def refine_probability(self, norm, prob, spacing):
        """The femur probability on the scan's grid pulled onto the scan's edges
        (DetectConfig.femur_refine_*), clipped to [0, 1]; unchanged when the radius is 0."""
        c = self.config
        if c.femur_refine_mm <= 0:
            return prob
        r = tuple(max(1, int(round(c.femur_refine_mm / s))) for s in spacing[1:])
        return guided_filter_near(norm, prob, r, c.femur_refine_eps, c.femur_refine_passes)

    def femur_mask(self, prob, spacing):
        """The largest piece of the thresholded probability, holes filled, notches filled
        where the probability passes the gate (DetectConfig.notch_fill_*), slices with too
        little femur dropped (DetectConfig.femur_min_slice_fraction)."""
        c = self.config
        femur = largest_component_filled(prob > c.femur_threshold)
        femur = fill_notches(femur, prob, spacing, c.notch_fill_mm, c.notch_fill_gate)
        if c.femur_min_slice_fraction <= 0:
            return femur
        area = _slice_areas(femur)
        return femur & (area >= c.femur_min_slice_fraction * area.max())[:, None, None]

    def segment_femur(self, norm, spacing, on_patch=None):
        """Femur mask of a normalised volume, on its own grid."""
        return self.femur_mask(self.femur_probability(norm, spacing, on_patch), spacing)

    def slice_plan(self, femur, spacing):
        """Per slice: is there enough femur to inpaint it? (S,) bool, on the device."""
        return femur_slice_plan(femur, spacing, self.config.edge_slice_fraction)

    def repainting_margin_mm(self, shape, spacing) -> float:
        """The margin the femur is grown by before inpainting (DetectConfig.mask_dilate_mm)."""
        r = self.config.mask_dilate_mm
        return default_mask_dilate_mm(shape, spacing, self.resolution) if r is None else float(r)

    def repainting_footprint(self, shape, spacing):
        """The in-plane (1, ry, rx) ellipse the femur is dilated by before repainting, or None."""
        r = self.repainting_margin_mm(shape, spacing)
        if r <= 0:
            return None
        ry, rx = max(1, int(round(r / spacing[1]))), max(1, int(round(r / spacing[2])))
        yy, xx = np.ogrid[-ry:ry + 1, -rx:rx + 1]
        return ((yy / ry) ** 2 + (xx / rx) ** 2 <= 1)[None]  # host footprint: no device sync

    def inpaint(self, norm, femur, spacing, on_batch=None):
        """Composite x~ (the inpainter's femur pasted into the scan) and the per-slice
        (S,) bool of the slices it was pasted into; other slices are returned unchanged."""
        xp = array_module(norm)
        s, h, w = norm.shape
        keep = self.slice_plan(femur, spacing)
        if self.static:  # every slice, the others with an empty mask: no data-dependent shape
            idx = None
            x, mask = norm, femur & keep[:, None, None]
        else:
            idx = np.flatnonzero(_host(keep))
            if idx.size == 0:
                return norm.copy(), keep
            x, mask = norm[idx], femur[idx]
        fp = self.repainting_footprint(norm.shape, spacing)
        if fp is not None:
            mask = binary_dilation(mask, fp)
        res, n, bs = self.resolution, x.shape[0], self.config.batch_size
        px = (spacing[1], spacing[2])  # square pixels for the inpainter, whatever the scan's
        x_sq = slices_to_square(x, res, pixel_mm=px)
        m_sq = (slices_to_square(mask.astype(xp.float32), res, pixel_mm=px) > 0.5).astype(xp.float32)
        gen = xp.empty((n, 1, res, res), xp.float32)
        flips = INPAINT_FLIPS[self.config.inpaint_mirrors]
        for i in range(0, n, bs):
            xb, mb = x_sq[i:i + bs], m_sq[i:i + bs]
            batch = xp.stack([xb * (1 - mb), mb], axis=1)
            self._infer(self.inp_name, batch, out=gen[i:i + bs])
            for axes in flips[1:]:  # the mirrored slice's repainting, mirrored back
                flipped = self._infer(self.inp_name, xp.ascontiguousarray(xp.flip(batch, axes)))
                gen[i:i + bs] += xp.flip(xp.asarray(flipped), axes)
            if len(flips) > 1:
                gen[i:i + bs] /= len(flips)
            if on_batch:
                on_batch(min(i + bs, n), n)
        composite = xp.where(mask, square_to_slices(gen[:, 0], h, w, pixel_mm=px), x)
        if idx is None:
            return composite, keep
        out = norm.copy()
        out[idx] = composite
        return out, keep

    def postprocess(self, norm, composite, femur, keep, spacing):
        """Lesion mask (S, H, W) bool: HE, difference, Otsu, opening, closing per slice."""
        xp = array_module(norm)
        px, cfg = (spacing[1], spacing[2]), self.config.post
        if self.static:
            return lesion_mask(norm, composite, femur, px, cfg) & keep[:, None, None]
        lesion = xp.zeros(norm.shape, bool)
        idx = np.flatnonzero(_host(keep))
        if idx.size:
            lesion[idx] = lesion_mask(norm[idx], composite[idx], femur[idx], px, cfg)
        return lesion

    def run_loop(self, vol, spacing, progress=None, clock: StageClock | None = None, femur_check=None):
        """Everything between upload and download: (normalised, femur, lesion, keep).

        With cupy arrays nothing here reads the device back (test_gpu holds it to that
        under cupyx.allow_synchronize(False)); the backend's stream must be current.
        `femur_check(prob, femur, norm)`, if given, may refuse the scan before inpainting
        (it reads a few scalars back: detect's one deliberate sync).
        """
        mark = clock.mark if clock else (lambda name: None)
        norm = normalize_intensity(vol)
        prob = self.femur_probability(norm, spacing, on_patch=progress and (lambda d, n: progress("femur", d, n)))
        femur = self.femur_mask(prob, spacing)
        if femur_check is not None:
            femur_check(prob, femur, norm)
        mark("femur_s")
        composite, keep = self.inpaint(norm, femur, spacing,
                                       on_batch=progress and (lambda d, n: progress("inpaint", d, n)))
        mark("inpaint_s")
        lesion = self.postprocess(norm, composite, femur, keep, spacing)
        mark("postprocess_s")
        return norm, femur, lesion, keep

    def download(self, norm, femur, lesion, keep):
        """(normalised float32, femur uint8, lesion uint8, keep bool) on the host: with
        cupy, one device -> host copy of one packed buffer."""
        xp = array_module(norm)
        if xp is np:
            return norm, femur.astype(np.uint8), lesion.astype(np.uint8), keep
        packed = femur.astype(xp.uint8) | (lesion.astype(xp.uint8) << 1)
        a, b = norm.nbytes, norm.nbytes + packed.size
        blob = xp.empty(b + keep.size, xp.uint8)
        blob[:a] = xp.ascontiguousarray(norm, xp.float32).ravel().view(xp.uint8)
        blob[a:b] = packed.ravel()
        blob[b:] = keep.astype(xp.uint8)
        host = blob.get(stream=self.stream)  # the one download; it waits for the device
        packed_h = host[a:b].reshape(norm.shape)
        return (host[:a].view(np.float32).reshape(norm.shape), packed_h & 1, (packed_h >> 1) & 1,
                host[b:].astype(bool))

    # -- the whole scan -----------------------------------------------------------
    def detect(self, scan: Scan, progress=None) -> Detection:
        t0 = time.perf_counter()
        with self._on_stream():
            clock = StageClock(self.xp, self.stream)
            vol = self.upload(scan)
            clock.mark("upload_s")
            checks = []

            def femur_check(prob, femur, norm):
                # a few scalars read back from the device: the one deliberate sync, so that
                # a non-knee is refused before any inpainting is spent on it
                c = check_femur(prob, femur, scan.spacing, norm)
                if c.refuse:
                    raise BmlError(c.reasons[0], scan.path, "give a sagittal knee MRI (see the README: inputs)")
                checks.append(c)

            norm, femur, lesion, keep = self.run_loop(vol, scan.spacing, progress, clock, femur_check)
            norm_np, femur_np, lesion_np, keep_np = self.download(norm, femur, lesion, keep)
            clock.mark("download_s")
            if clock.gpu:
                clock.marks[-1][1].synchronize()
        t = clock.seconds()
        t["total_s"] = time.perf_counter() - t0
        slices = [int(i) for i in np.flatnonzero(keep_np)]
        report = self._report(scan, femur_np, lesion_np, t, slices, checks[0])
        return Detection(scan, femur_np, lesion_np, norm_np, t, report)

    # -- entry points that check the input first ------------------------------------
    def detect_checked(self, scan: Scan, progress=None) -> Detection:
        """The input-level knee rules, thin slices to the models' grid and back, the femur hook."""
        from bmltrt.runtime.slice_grid import mask_to_input_slices, needs_reslicing, to_model_slices

        scan.warnings.extend(check_knee_input(scan))
        if not needs_reslicing(scan.spacing):
            det = self.detect(scan, progress)
        else:
            thick, overlaps = to_model_slices(scan)
            on_thick = self.detect(thick, progress)
            femur = mask_to_input_slices(on_thick.femur, overlaps)
            lesion = mask_to_input_slices(on_thick.lesion, overlaps) & femur
            report = self._report(scan, femur, lesion, on_thick.timings, range(on_thick.report["slices_inpainted"]),
                                  on_thick.report["femur_check"])
            report["model_grid"] = {"slice_mm": round(thick.spacing[0], 4), "slices": int(thick.data.shape[0]),
                                    "why": f"input slices of {scan.spacing[0]:.2f} mm averaged into slabs like "
                                           "the models' training data, masks mapped back"}
            det = Detection(scan, femur, lesion, normalize_intensity(scan.data), on_thick.timings, report)
        return det

    def detect_image(self, image, affine=None, *, name: str | None = None, force_orientation: bool = False,
                     progress=None) -> Detection:
        """Detection from memory, for viewers and PACS plug-ins: no file is read or written.

        `image` is a nibabel Nifti1Image/Nifti2Image (e.g. ``bmltrt.io.dicom.read_series``), or
        an array with `affine` (4x4, voxel index -> RAS mm; any of the 48 axis orders), or a
        path to a NIfTI file or a DICOM series folder. Masks come back in
        ``Detection.scan.to_input_grid(...)`` order; ``bmltrt.report.write_outputs`` writes them.
        """
        from bmltrt.io import load_scan
        from bmltrt.io.nifti import image_from_array, scan_from_image

        if name is not None and (not str(name).strip() or "/" in str(name) or "\\" in str(name)
                                 or str(name).strip(".") == "" or not str(name).isprintable()):
            raise BmlError(f"name {name!r} cannot name output files",
                           hint="give a plain name, without / or \\ or control characters")

        if isinstance(image, (str, Path)):
            p = Path(image)
            if p.is_dir():
                from bmltrt.io.dicom import find_series, read_series

                series = find_series(p)
                if len(series) != 1:
                    raise BmlError(f"{len(series)} series in this folder", p, "read one with bmltrt.io.dicom.read_series")
                scan = scan_from_image(read_series(series[0]), p, force_orientation, stem=name or series[0].stem)
            else:
                scan = load_scan(p, force_orientation=force_orientation)
                if name:
                    scan.stem = name
        else:
            if affine is not None:
                image = image_from_array(image, affine)
            elif not hasattr(image, "affine"):
                raise BmlError("an array needs its affine (4x4, voxel -> RAS mm)",
                               hint="call detect_image(array, affine) or pass a nibabel image")
            # an image read by bmltrt.io.dicom.read_series carries its series' name
            extra = getattr(image, "extra", None)
            name = name or (extra.get(SERIES_STEM) if isinstance(extra, dict) else None) or "image"
            scan = scan_from_image(image, name, force_orientation, stem=name)
        return self.detect_checked(scan, progress)

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
        warnings = list(self.run_warnings) + list(scan.warnings) + self.post_warnings
        fem_mm3, les_mm3 = float(femur.sum() * vox), float(lesion.sum() * vox)
        check = check.to_dict() if hasattr(check, "to_dict") else check
        warnings += [f"implausible femur mask: {r}; look at the overlay before trusting any figure"
                     for r in check["reasons"]]
        if fem_mm3 > 0 and les_mm3 > SUSPICIOUS_LESION_FRACTION * fem_mm3:
            warnings.append(f"lesions cover {100 * les_mm3 / fem_mm3:.0f}% of the femur (real lesions rarely "
                            "exceed a few percent): check the femur mask and the lesions in the overlay")
        return {
            "bmltrt_version": __version__,
            # shape and spacing both in the file's own array order; "working" in the models' order
            # absolute (the summary is read from other folders); an in-memory image keeps its name
            "input": {"path": os.path.abspath(scan.path) if os.path.lexists(scan.path) else str(scan.path), **scan.source, "shape": [int(n) for n in scan.image.shape],  # as in the file
                      "spacing_mm": [round(float(s), 4) for s in _input_order(scan.spacing, scan)],
                      "orientation": "".join(scan.input_axcodes),
                      "working": {"axes": "slice (left->right), row (superior->inferior), column (anterior->posterior)",
                                  "shape": [int(n) for n in scan.data.shape],
                                  "spacing_mm": [round(float(s), 4) for s in scan.spacing]}},
            "lesion_count": n,
            "lesion_volume_mm3": round(float(lesion.sum() * vox), 3),
            "lesions": lesions,
            "slices_with_lesion": sorted({s for d in lesions for s in d["slices"]}),
            "femur_volume_mm3": round(float(femur.sum() * vox), 1),
            "femur_check": check,
            "slices_inpainted": len(slices),
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "backend": self.backend.name, "device": self.backend.device, "precision": self.backend.precision,
            "resolution": self.resolution,
            "repainting_margin_mm": round(self.repainting_margin_mm(scan.data.shape, scan.spacing), 3),
            "models": {name: {"file": e["file"], "sha256": e["sha256"]}
                       for name, e in (("segmenter", self.seg_entry), (self.inp_name, self.inp_entry))},
            "models_dir": str(store.root),
            "config": self.config.to_dict(),
            "warnings": warnings,
            "slice_axis": "working slices run left->right; 0 is the leftmost sagittal slice",
        }


def _takes_out(fn) -> bool:
    import inspect

    try:
        return "out" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _host(a) -> np.ndarray:
    """A small array on the host (the CPU path only: on the GPU nothing is read back)."""
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)
