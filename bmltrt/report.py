"""What a user looks at: the overlay montage and the output files of one scan."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from bmltrt.io.atomic import atomic_write
from bmltrt.io.nifti import mask_image_like, write_nifti
from bmltrt.errors import BmlError
from bmltrt.io.outputs import OUTPUT_ENDINGS, OutputSet, same_file, write_output_set

FEMUR_TILES = 12  # every k-th femur slice, so the montage covers the femur's whole extent
MAX_LESION_TILES = 16  # lesion slices shown (more only where more lesions need their largest)
TILE = 320


def _outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Outline `width` pixels wide, drawn inside the mask (visible at montage size)."""
    return mask & ~ndi.binary_erosion(mask, iterations=width)


def montage_slices(femur: np.ndarray, lesion: np.ndarray) -> tuple[list[int], list[int], int]:
    """(slices shown, lesion slices shown, slices with lesion): every k-th slice from the
    femur's first to its last (both included), so a femur mask gone astray shows on some
    tile, and the slices with lesion: all of them up to MAX_LESION_TILES, else each lesion's
    largest slice and then the largest others (a thin-slice scan has lesions on dozens of
    slices; no lesion may go unseen)."""
    from bmltrt.evaluation.metrics import components

    n = femur.shape[0]
    les_area = lesion.reshape(n, -1).sum(1)
    with_lesion = [int(i) for i in np.argsort(-les_area, kind="stable") if les_area[i] > 0]
    les = set(with_lesion)
    if len(with_lesion) > MAX_LESION_TILES:
        labels, count = components(lesion)
        # each lesion's largest slice, whatever its size, then the largest of the others
        per_slice = np.stack([np.bincount(labels[k].ravel(), minlength=count + 1) for k in range(n)])
        les = {int(k) for k in np.argmax(per_slice[:, 1:], axis=0)}
        les |= set([s for s in with_lesion if s not in les][:max(0, MAX_LESION_TILES - len(les))])
    fem = np.flatnonzero(femur.reshape(n, -1).any(1))
    if len(fem):
        a, b = int(fem[0]), int(fem[-1])
        k = max(1, int(np.ceil((b - a + 1) / FEMUR_TILES)))
        every = list(range(a, b + 1, k))
        if every[-1] != b:
            every.append(b)
    else:
        every = [n // 4, n // 2, (3 * n) // 4]
    return sorted(set(every) | les), sorted(les), len(with_lesion)


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

    idx, les_slices, les_total = montage_slices(femur, lesion)
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
    les_said = (f"{les_total} with lesion" if len(les_slices) == les_total else
                f"{les_total} with lesion, {len(les_slices)} of them shown (each lesion's largest)")
    draw.text((6, 19), f"{len(idx)} of {femur.shape[0]} slices shown (0 = leftmost); {extent}; {les_said}",
              fill=(200, 200, 200))
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


# ---- the output folder's summary: one table for a cohort -----------------------------------

SUMMARY_NAME = "bmltrt_summary.csv"
SUMMARY_COLUMNS = ("scan", "status", "lesions", "lesion_volume_mm3", "femur_volume_mm3", "femur_plausible",
                   "warnings", "resolution", "backend", "device", "precision", "seconds", "bmltrt_version",
                   "input", "report", "error")
_SUMMARY_HEADER = ",".join(SUMMARY_COLUMNS)  # how we know our own summary: its whole header line
_REPORT_ENDING = OUTPUT_ENDINGS["report"]
# the status of a scan whose femur mask failed the plausibility check: its figures are not
# to be used before its overlay has been looked at
CHECK_FEMUR = "check femur"


def _summary_is_ours(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.readline().rstrip("\r\n") == _SUMMARY_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def check_summary_writable(out_dir: Path, overwrite: bool, inputs=()) -> None:
    """Before any scan: a folder, or a file bmltrt did not write, where the summary goes is
    refused (the file is replaced with `overwrite`; an input of the run never)."""
    path = Path(out_dir) / SUMMARY_NAME
    if not os.path.lexists(path):
        return
    if any(same_file(path, p) for p in inputs):
        raise BmlError("the output folder's summary would overwrite an input of this run", path,
                       "choose another output folder (-o)")
    if path.is_symlink() or not path.is_file():
        raise BmlError(f"{SUMMARY_NAME} in the output folder is not a file bmltrt wrote", path,
                       "move it away, or choose another output folder (-o)")
    if not overwrite and not _summary_is_ours(path):
        raise BmlError(f"{SUMMARY_NAME} in the output folder was not written by bmltrt", path,
                       "move it away, or add --overwrite to replace it")


def _as_cell(value) -> str:
    """A spreadsheet runs a cell that starts with = + - @ as a formula: text such as a file
    name "=HYPERLINK(...).nii.gz" must stay text (OWASP's CSV injection rule: a leading
    quote). Numbers (a report's own figures) are written as numbers."""
    if value is None:
        return ""
    if isinstance(value, (bool, int, float)):
        return str(value)
    text = str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _row(**cells) -> dict:
    """A summary row: every column, empty unless given."""
    return dict.fromkeys(SUMMARY_COLUMNS, "") | cells


def _report_row(path: Path) -> dict | None:
    """The summary's row of one report: None for a JSON object that is not ours; a row saying
    so for a report that cannot be read (damaged: its scan must not vanish from the table)."""
    scan = path.name[: -len(_REPORT_ENDING)]
    base = _row(scan=scan, report=path.name)
    try:
        rep = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        return base | {"status": "report unreadable", "error": f"the report cannot be read ({type(exc).__name__})"}
    if isinstance(rep, dict) and "bmltrt_version" not in rep:
        return None  # a JSON object of someone else's: not a row
    if not isinstance(rep, dict):
        return base | {"status": "report unreadable", "error": "the report is not a JSON object"}

    def part(key) -> dict:  # a hand-edited report may hold anything anywhere
        return rep.get(key) if isinstance(rep.get(key), dict) else {}

    warnings = rep.get("warnings") if isinstance(rep.get("warnings"), list) else []
    plausible = part("femur_check").get("plausible")
    return base | {"status": CHECK_FEMUR if plausible is False else "ok", "lesions": rep.get("lesion_count"), "lesion_volume_mm3": rep.get("lesion_volume_mm3"),
                   "femur_volume_mm3": rep.get("femur_volume_mm3"), "femur_plausible": part("femur_check").get("plausible"),
                   "warnings": "; ".join(str(w) for w in warnings), "resolution": rep.get("resolution"),
                   "backend": rep.get("backend"), "device": rep.get("device"), "precision": rep.get("precision"),
                   "seconds": part("timings_s").get("total_s"), "bmltrt_version": rep.get("bmltrt_version"),
                   "input": part("input").get("path")}


def summary_rows(out_dir: Path, failures=()) -> list[dict]:
    """One row per report in `out_dir` (this run's and earlier runs': status "ok", "check
    femur" or "report unreadable"), and one per scan that failed in this run (`failures`: (name, input, error
    line) each; status "failed"). A scan that failed now but has outputs from an earlier run
    of the same input (e.g. refused without --overwrite) keeps its row of those outputs, with
    this run's error line beside it."""
    rows = []
    for path in sorted(Path(out_dir).iterdir()):
        if path.name.lower().endswith(_REPORT_ENDING) and not path.name.startswith(".") and path.is_file():
            row = _report_row(path)
            if row is not None:
                rows.append(row)
    for name, source, line in failures:
        earlier = next((r for r in rows if r["scan"] == name and r["status"] in ("ok", CHECK_FEMUR)
                        and (str(r["input"]) == str(source) or same_file(Path(str(r["input"])), source))), None)
        if earlier is not None:
            earlier["error"] = line
        else:
            rows.append(_row(scan=name, status="failed", input=source, error=line))
    return sorted(rows, key=lambda r: (r["scan"].casefold(), r["scan"], str(r["input"])))


def write_summary(out_dir: Path, failures=()) -> Path | None:
    """<out_dir>/bmltrt_summary.csv, rewritten whole (atomically) from the folder's reports and
    this run's failures; None (nothing written) when the folder holds no report."""
    import csv

    rows = summary_rows(out_dir, failures)
    if all(r["status"] == "failed" for r in rows):
        return None

    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
            w.writeheader()
            w.writerows({k: _as_cell(r[k]) for k in SUMMARY_COLUMNS} for r in rows)

    return atomic_write(Path(out_dir) / SUMMARY_NAME, write, suffix=".csv")
