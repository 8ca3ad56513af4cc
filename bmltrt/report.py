"""What a user looks at: the overlay montage and the output files of one scan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from bmltrt.io.atomic import atomic_write
from bmltrt.io.nifti import mask_image_like, write_nifti
from bmltrt.io.outputs import OutputSet, write_output_set

MAX_TILES = 12
TILE = 320


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndi.binary_erosion(mask, iterations=1)


def overlay_png(norm: np.ndarray, femur: np.ndarray, lesion: np.ndarray, path: Path,
                spacing=(1.0, 1.0, 1.0), title: str = "") -> Path:
    """The overlay montage written atomically to `path`."""
    sheet = overlay_image(norm, femur, lesion, spacing, title)
    return atomic_write(path, lambda p: _save_png(sheet, p))


def _save_png(sheet, path) -> None:
    from PIL.PngImagePlugin import PngInfo

    from bmltrt import __version__

    info = PngInfo()
    info.add_text("Software", f"bmltrt {__version__}")  # how a rerun knows the file is ours
    sheet.save(path, format="PNG", pnginfo=info)


def overlay_image(norm: np.ndarray, femur: np.ndarray, lesion: np.ndarray, spacing=(1.0, 1.0, 1.0),
                  title: str = ""):
    """Montage of sagittal slices: the scan, femur outline (yellow), lesion contour (red).

    Shows the slices with lesions (largest first, up to 12); with none, three slices
    through the femur.
    """
    from PIL import Image, ImageDraw

    les_area = lesion.reshape(lesion.shape[0], -1).sum(1)
    idx = [int(i) for i in np.argsort(-les_area) if les_area[i] > 0][:MAX_TILES]
    if not idx:
        fa = femur.reshape(femur.shape[0], -1).sum(1)
        cand = np.flatnonzero(fa > 0)
        idx = [int(cand[len(cand) * k // 4]) for k in (1, 2, 3)] if len(cand) else [norm.shape[0] // 2]
    idx = sorted(set(idx))
    lo, hi = np.percentile(norm, [0.5, 99.5])
    tiles = []
    for s in idx:
        g = (np.clip((norm[s] - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
        rgb = np.stack([g, g, g], -1)
        f = _outline(femur[s] > 0)
        l_ = ndi.binary_dilation(_outline(lesion[s] > 0))
        rgb[f] = (255, 210, 0)
        rgb[l_] = (255, 40, 40)
        h, w = g.shape
        aspect = (h * spacing[1]) / (w * spacing[2])
        im = Image.fromarray(rgb).resize((TILE, max(1, int(round(TILE * aspect)))), Image.BILINEAR)
        ImageDraw.Draw(im).text((6, 4), f"slice {s}  lesion {int(les_area[s])} px", fill=(0, 255, 255))
        tiles.append(im)
    cols = min(4, len(tiles))
    rows = (len(tiles) + cols - 1) // cols
    th = max(t.height for t in tiles)
    head = 22
    sheet = Image.new("RGB", (cols * TILE, rows * th + head), (0, 0, 0))
    ImageDraw.Draw(sheet).text((6, 5), title + "   yellow: femur   red: lesion", fill=(255, 255, 255))
    for k, t in enumerate(tiles):
        sheet.paste(t, ((k % cols) * TILE, head + (k // cols) * th))
    return sheet


def write_outputs(det, out_dir: Path, overwrite: bool = False, inputs=()) -> dict[str, Path]:
    """<name>_bml.nii.gz, <name>_femur.nii.gz (input grid), <name>_overlay.png, <name>_report.json.

    All or nothing (bmltrt.io.outputs): the set appears whole, the report last, or not at
    all. Refuses (BmlError) to replace a complete set without `overwrite`, a file bmltrt did
    not write, or any of `inputs` (the run's input files).
    """
    outs = OutputSet(Path(out_dir), det.scan.name)
    name = det.scan.name
    title = f"{name}: {det.report['lesion_count']} lesion(s), {det.report['lesion_volume_mm3']:.0f} mm3"
    rep = dict(det.report, outputs={k: str(v) for k, v in outs.paths.items()})
    writers = {
        "bml": lambda p: write_nifti(mask_image_like(det.lesion, det.scan), p, gz=True),
        "femur": lambda p: write_nifti(mask_image_like(det.femur, det.scan), p, gz=True),
        "overlay": lambda p: _save_png(overlay_image(det.normalized, det.femur, det.lesion, det.scan.spacing,
                                                     title), p),
        "report": lambda p: Path(p).write_text(json.dumps(rep, indent=1)),
    }
    return write_output_set(outs, writers, overwrite, [Path(p) for p in inputs] + [det.scan.path])
