"""DICOM series in: a folder of slices -> one NIfTI image (in memory) per series and echo.

- Files are recognised by their content ("DICM" at byte 128), whatever their names.
- Slices are grouped by SeriesInstanceUID; a multi-echo series (several EchoTime values)
  is split by echo time. ``echo`` picks one, 1 = the shortest TE, the default: the first
  echo has the most signal and the proton-density/intermediate weighting closest to the
  paper's IW scans, and it is the echo converters such as dcm2niix write first.
- Slices are sorted by their position along the slice normal (row x column cosines),
  not by file name or InstanceNumber, which scanners do not keep in order.
- The affine comes from ImageOrientationPatient, ImagePositionPatient and PixelSpacing
  (DICOM's LPS turned to NIfTI's RAS); the array is stored like dcm2niix stores it
  (first axis along a row), so the masks written on it open as NIfTI on the scan's grid.

pydicom is needed only here, and imported only when a DICOM folder is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bmltrt.errors import BmlError

SERIES_STEM = "bmltrt_series_stem"  # key in a read series' image.extra: the name of its outputs
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
ECHO_DECIMALS = 3  # echo times equal to 1 us are one echo
SPACING_TOLERANCE = 0.1  # slice gaps may differ by 10% before the series is refused
# Implicit and explicit VR little endian, explicit big endian: raw pixels, no codec needed
# MR Image Storage and Enhanced MR Image Storage: a file of these classes is an MR image
MR_STORAGE_CLASSES = ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1")
UNCOMPRESSED_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise BmlError("reading DICOM needs pydicom", hint="pip install pydicom (or convert with dcm2niix)") from None
    return pydicom


def is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def dicom_files_in(folder: Path) -> list[Path]:
    """The DICOM files directly in `folder` (not in subfolders; hidden files skipped)."""
    try:
        entries = sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError:
        return []
    return [p for p in entries if is_dicom_file(p)]


@dataclass
class DicomSeries:
    """One series (and one echo of it) in a folder: what is needed to read it and name its outputs."""

    folder: Path
    uid: str
    number: str
    description: str
    files: list[Path] = field(repr=False)
    echo_times: list[float] = field(default_factory=list)  # every echo of the series, sorted
    echo: int = 1  # 1-based index into echo_times
    stem: str = ""

    @property
    def label(self) -> str:
        """How the user sees it in messages."""
        desc = f" {self.description!r}" if self.description else ""
        te = f", echo {self.echo} of {len(self.echo_times)}" if len(self.echo_times) > 1 else ""
        return f"{self.folder} (series {self.number or self.uid}{desc}{te})"


def _echo_time(ds) -> float | None:
    te = getattr(ds, "EchoTime", None)
    try:
        return round(float(te), ECHO_DECIMALS) if te not in (None, "") else None
    except (TypeError, ValueError):
        return None


def find_series(folder: Path, echo: int | None = None, problems: list | None = None) -> list[DicomSeries]:
    """Every series in `folder`, each at the asked echo (default: the first). Reads headers only.

    A series that cannot be read as asked (no such --echo, slices without an echo time
    among slices with one) is refused: with `problems`, its one-line error goes there and
    the folder's other series are still returned; without, it is raised."""
    pydicom = _pydicom()
    folder = Path(folder)
    groups: dict[str, dict] = {}
    for f in dicom_files_in(folder):
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception as exc:
            # It says it is DICOM ("DICM" at byte 128) and is not: a damaged or cut-short
            # copy. Skipping it would drop a slice without a word (at either end of the
            # stack no gap shows it).
            raise BmlError(f"unreadable DICOM file ({type(exc).__name__}): damaged or cut short", f,
                           "copy or export the series again (or move the file out of the folder)") from None
        sop_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
        if sop_class in MR_STORAGE_CLASSES and not all(k in ds for k in ("SeriesInstanceUID", "Rows")):
            # pydicom reads a cut-short file up to where it ends, without an error
            raise BmlError("unreadable DICOM file: an MR image whose header is cut short", f,
                           "copy or export the series again (or move the file out of the folder)")
        if not hasattr(ds, "ImagePositionPatient") and str(getattr(ds, "Modality", "")) != "MR":
            continue  # DICOMDIR, reports, presentation states: not images
        uid = str(getattr(ds, "SeriesInstanceUID", "") or "unknown")
        g = groups.setdefault(uid, {"files": [], "echoes": {}, "number": str(getattr(ds, "SeriesNumber", "") or ""),
                                    "description": str(getattr(ds, "SeriesDescription", "") or "")})
        g["files"].append(f)
        g["echoes"].setdefault(_echo_time(ds), []).append(f)
    if not groups:
        raise BmlError("no DICOM images in this folder", folder,
                       "give a folder of one series' DICOM files (subfolders are not searched)")
    series = []
    for uid, g in sorted(groups.items(), key=lambda kv: (kv[1]["number"].zfill(8), kv[0])):
        tes = sorted(t for t in g["echoes"] if t is not None)
        want = echo or 1
        named = (g["number"] or uid) + (f" {g['description']!r}" if g["description"] else "")
        problem = None
        if None in g["echoes"] and tes:
            missing = g["echoes"][None]
            problem = BmlError(f"{len(missing)} of {len(g['files'])} images of series {named} have no EchoTime "
                               f"(first: {missing[0].name}): which echo they belong to is unknown", folder,
                               "export the series again with its echo times, or convert it with dcm2niix")
        elif len(tes) > 1 and not 1 <= want <= len(tes):
            problem = BmlError(f"--echo {want}: series {named} has {len(tes)} echoes "
                               f"(TE {', '.join(f'{t:g}' for t in tes)} ms)", folder, f"choose --echo 1 to {len(tes)}")
        elif len(tes) <= 1 and want != 1:  # not a silent echo 1 in place of the one asked for
            te = f" (TE {tes[0]:g} ms)" if tes else ""
            problem = BmlError(f"--echo {want}: series {named} has one echo{te}", folder,
                               "leave out --echo, or give that series' folder without it")
        if problem is not None:
            if problems is None:
                raise problem
            problems.append(problem)
            continue
        series.append(DicomSeries(folder, uid, g["number"], g["description"], g["files"], tes,
                                  want if len(tes) > 1 else 1))
    many = len(series) > 1
    base = folder.resolve().name or "dicom"
    numbers = [s.number for s in series]
    for s in series:
        stem = base
        if many:
            if s.number:
                stem += f"_series{s.number}"
            if not s.number or numbers.count(s.number) > 1:  # a re-sent or derived series repeats its number
                stem += f"_{s.uid.replace('.', '')[-8:]}"  # no dots: they would read as file endings
        if len(s.echo_times) > 1:
            stem += f"_echo{s.echo}"
        s.stem = stem
    stems = [s.stem for s in series]
    for i, s in enumerate(series):  # the last resort: UIDs that end alike
        if stems.count(s.stem) > 1:
            s.stem += f"_{i + 1}"
    return series


def read_series(series: DicomSeries | str | Path, echo: int | None = None):
    """The series (at its echo) as an in-memory Nifti1Image on the scanner's RAS grid. A
    folder may be given instead of a DicomSeries when it holds one series (`echo`: which)."""
    import nibabel as nib

    if isinstance(series, (str, Path)):
        found = find_series(Path(series), echo)
        if len(found) != 1:
            raise BmlError(f"{len(found)} series in this folder", series,
                           "pick one: read_series(find_series(folder)[i])")
        series = found[0]
    pydicom = _pydicom()
    te = series.echo_times[series.echo - 1] if series.echo_times else None
    slices = []
    for f in series.files:
        try:
            ds = pydicom.dcmread(str(f))
        except Exception as exc:
            raise BmlError(f"unreadable DICOM file ({type(exc).__name__})", f, "re-export the series") from None
        if te is not None and _echo_time(ds) != te:
            continue
        slices.append((f, ds))
    f0, ds0 = slices[0]
    if int(getattr(ds0, "NumberOfFrames", 1) or 1) > 1:
        raise BmlError("multi-frame (enhanced) DICOM is not supported", f0,
                       "convert the series to NIfTI with dcm2niix and give the .nii.gz")
    modality = str(getattr(ds0, "Modality", "MR"))
    if modality != "MR":
        raise BmlError(f"this is a {modality} series, not MR", f0, "give the knee MRI series")
    if len(slices) < 2:
        raise BmlError("the series has a single slice: a 3D volume is needed", f0, "give the whole series")
    geo = []
    for f, ds in slices:
        try:
            iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], float)
            ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], float)
            ps = np.asarray([float(v) for v in ds.PixelSpacing], float)
            shape = (int(ds.Rows), int(ds.Columns))
        except (AttributeError, TypeError, ValueError):
            raise BmlError("a slice lacks its position, orientation or pixel spacing tags", f,
                           "re-export the series with its geometry, or convert it with dcm2niix") from None
        geo.append((iop, ipp, ps, shape))
    iop0, _, ps0, shape0 = geo[0]
    if ps0.shape != (2,) or not np.all(np.isfinite(ps0)) or not np.all(ps0 > 0):
        raise BmlError(f"PixelSpacing {'/'.join(f'{v:g}' for v in ps0)} is not two positive sizes (zero voxel size)", f0,
                       "re-export the series with its geometry, or convert it with dcm2niix")
    for (f, _), (iop, _, ps, shape) in zip(slices, geo):
        if shape != shape0 or not np.allclose(iop, iop0, atol=1e-3) or not np.allclose(ps, ps0, atol=1e-4):
            raise BmlError("the slices of this series differ in size, orientation or pixel spacing", f,
                           "give one stack of parallel slices (a localiser series mixes planes)")
    row, col = iop0[:3], iop0[3:]
    normal = np.cross(row, col)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-2):
        raise BmlError("ImageOrientationPatient is not two unit vectors at right angles", f0, "fix the series")
    pos = np.asarray([np.dot(g[1], normal) for g in geo])
    order = np.argsort(pos, kind="stable")
    pos = pos[order]
    gaps = np.diff(pos)
    if np.any(gaps < 1e-3):
        where = slices[order[int(np.argmin(gaps)) + 1]][0]
        raise BmlError("two images of this series lie at the same slice position", where,
                       "the series holds several volumes (time points, contrasts): split it, e.g. with dcm2niix")
    if gaps.max() - gaps.min() > SPACING_TOLERANCE * gaps.mean():
        k = int(np.argmax(gaps))  # the widest gap: after which file, and before which
        before, after = (Path(slices[order[j]][0]).name for j in (k, k + 1))
        typical = float(np.median(gaps))
        ratio = gaps[k] / typical
        # a gap of two or more slice steps: slices are missing; anything else: misplaced ones
        what = ("slices are missing" if ratio > 1.5 and abs(ratio - round(ratio)) < SPACING_TOLERANCE * round(ratio)
                else "slices are misplaced or missing")
        raise BmlError(f"uneven slice spacing ({gaps.min():.2f} to {gaps.max():.2f} mm): {what} "
                       f"(the widest gap, {gaps[k]:.2f} mm, lies between {before} and {after})",
                       Path(f0).parent, "give the complete series")
    planes = []
    for k in order:
        f, ds = slices[k]
        try:
            px = ds.pixel_array
        except Exception as exc:
            ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
            if str(ts) in UNCOMPRESSED_SYNTAXES:  # nothing to decode: the pixel data are damaged
                raise BmlError(f"the pixel data are cut short or damaged ({type(exc).__name__})", f,
                               "copy or export the series again") from None
            raise BmlError(f"cannot decode the pixel data (transfer syntax {ts}; {type(exc).__name__})", f,
                           "pip install pylibjpeg pylibjpeg-libjpeg, or decompress with dcm2niix/gdcmconv") from None
        if px.ndim != 2:
            raise BmlError(f"pixel data of shape {px.shape}: not a grey-scale slice", f, "give a magnitude MR series")
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        inter = float(getattr(ds, "RescaleIntercept", 0) or 0)
        planes.append((px, slope, inter))
    scaled = any(s != 1 or i != 0 for _, s, i in planes)
    if scaled:
        vol = np.stack([px.astype(np.float32) * s + i for px, s, i in planes], axis=-1)
    else:
        vol = np.stack([px for px, _, _ in planes], axis=-1)
    # pixel_array is [row, column]; NIfTI (like dcm2niix) stores [column, row, slice].
    data = np.ascontiguousarray(np.transpose(vol, (1, 0, 2)))
    first, last = geo[order[0]][1], geo[order[-1]][1]
    lps = np.eye(4)
    lps[:3, 0] = row * ps0[1]  # along a row: column index, column spacing
    lps[:3, 1] = col * ps0[0]  # down a column: row index, row spacing
    lps[:3, 2] = (last - first) / (len(order) - 1)
    lps[:3, 3] = first
    affine = LPS_TO_RAS @ lps
    img = nib.Nifti1Image(data, affine, extra={SERIES_STEM: series.stem})  # names outputs in detect_image
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return img
