"""What a user looks at: the overlay montage and the output files of one scan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from bmltrt.io.atomic import atomic_write
from bmltrt.io.nifti import mask_image_like, write_nifti
from bmltrt.io.outputs import OutputSet, write_output_set

FEMUR_TILES = 12  # every k-th femur slice, so the montage covers the femur's whole extent
MAX_LESION_TILES = 16  # plus every slice with a lesion (the largest, if more)
TILE = 320


def _outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Outline `width` pixels wide, drawn inside the mask (visible at montage size)."""
    return mask & ~ndi.binary_erosion(mask, iterations=width)


def montage_slices(femur: np.ndarray, lesion: np.ndarray) -> tuple[list[int], list[int]]:
    """(slices shown, slices with lesion): every k-th slice from the femur's first to its last
    (both included) and every lesion slice, so a femur mask gone astray shows on some tile."""
    n = femur.shape[0]
    les_area = lesion.reshape(n, -1).sum(1)
    les = [int(i) for i in np.argsort(-les_area) if les_area[i] > 0][:MAX_LESION_TILES]
    fem = np.flatnonzero(femur.reshape(n, -1).any(1))
    if len(fem):
        a, b = int(fem[0]), int(fem[-1])
        k = max(1, int(np.ceil((b - a + 1) / FEMUR_TILES)))
        every = list(range(a, b + 1, k))
        if every[-1] != b:
            every.append(b)
    else:
        every = [n // 4, n // 2, (3 * n) // 4]
    return sorted(set(every) | set(les)), sorted(les)


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

    The tiles cover the femur from its first slice to its last, every k-th slice, plus every
    slice with a lesion; the header says which slices of how many are shown.
    """
    from PIL import Image, ImageDraw

    idx, les_slices = montage_slices(femur, lesion)
    les_area = lesion.reshape(lesion.shape[0], -1).sum(1)
    lo, hi = np.percentile(norm, [0.5, 99.5])
    tiles = []
    for s in idx:
        g = (np.clip((norm[s] - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
        h, w = g.shape
        size = (TILE, max(1, int(round(TILE * (h * spacing[1]) / (w * spacing[2])))))
        grey = np.asarray(Image.fromarray(g).resize(size, Image.BILINEAR))
        # Outlines at tile size, so they are as thick on a 448 scan as on a 256 one.
        f = np.asarray(Image.fromarray((femur[s] > 0).astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
        le = np.asarray(Image.fromarray((lesion[s] > 0).astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
        rgb = np.stack([grey, grey, grey], -1)
        rgb[_outline(f, 2)] = (255, 210, 0)
        rgb[_outline(le, 2)] = (255, 40, 40)
        im = Image.fromarray(rgb)
        label = f"slice {s}" + (f"  lesion {les_area[s] * spacing[1] * spacing[2]:.0f} mm2" if les_area[s] else "")
        ImageDraw.Draw(im).text((6, 4), label, fill=(0, 255, 255))
        tiles.append(im)
    cols = min(4, len(tiles))
    rows = (len(tiles) + cols - 1) // cols
    th = max(t.height for t in tiles)
    head = 36
    sheet = Image.new("RGB", (cols * TILE, rows * th + head), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 4), title + "   yellow: femur   red: lesion", fill=(255, 255, 255))
    fem = np.flatnonzero(femur.reshape(femur.shape[0], -1).any(1))
    extent = f"femur in slices {fem[0]}-{fem[-1]}" if len(fem) else "no femur"
    draw.text((6, 19), f"{len(idx)} of {femur.shape[0]} slices shown (0 = leftmost); {extent}; "
                       f"{len(les_slices)} with lesion", fill=(200, 200, 200))
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
