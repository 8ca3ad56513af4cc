"""Read, validate and reorient NIfTI scans; write masks back on the input's grid.

Working orientation: array ``[slice, row, col]`` with slices running left->right,
rows superior->inferior and columns anterior->posterior (nibabel axcodes R, I, P):
``data[s]`` is one sagittal slice shown the usual way, superior up, anterior left.
Every scan is brought to it by axis permutations and flips only (no resampling), so a
mask maps back voxel for voxel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    io_orientation,
    ornt2axcodes,
    ornt_transform,
)

from bmltrt.errors import BmlError
from bmltrt.io.atomic import atomic_write

WORKING_AXCODES = ("R", "I", "P")
_WORKING_ORNT = axcodes2ornt(WORKING_AXCODES)

# Sanity limits. A knee MRI voxel is 0.1-8 mm; no scan has axes over 2048 voxels.
MIN_SPACING_MM = 0.05
MAX_SPACING_MM = 20.0
MAX_AXIS = 2048
MAX_VOXELS = 2**29
# An axis is "the thick one" when its spacing exceeds the others by this factor.
THICK_FACTOR = 1.5

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _is_nifti_name(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


@dataclass
class Scan:
    """A scan in the working orientation plus what is needed to map results back."""

    path: Path
    data: np.ndarray  # float32, working orientation [slice, row, col]
    spacing: tuple[float, float, float]  # mm along the working axes
    image: nib.spatialimages.SpatialImage = field(repr=False)  # the input, untouched
    input_shape: tuple[int, ...]
    to_working: np.ndarray = field(repr=False)  # nibabel ornt transform input->working
    input_axcodes: tuple[str, ...] = ()
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """File name without .nii/.nii.gz, used to name outputs."""
        n = self.path.name
        for suf in (".nii.gz", ".nii"):
            if n.lower().endswith(suf):
                return n[: -len(suf)]
        return n

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    def to_input_grid(self, array_working: np.ndarray) -> np.ndarray:
        """Map an array in the working orientation back onto the input's array grid."""
        back = ornt_transform(_WORKING_ORNT, io_orientation(self.image.affine))
        out = apply_orientation(array_working, back)
        if out.shape != self.input_shape:
            raise AssertionError(f"mapped shape {out.shape} != input shape {self.input_shape}")
        return np.ascontiguousarray(out)


def read_header_checked(path: str | os.PathLike) -> nib.spatialimages.SpatialImage:
    """Open a NIfTI file lazily and check everything the header can tell."""
    path = Path(path)
    if not path.exists():
        raise BmlError("file not found", path, "check the path")
    if not path.is_file():
        raise BmlError("not a file", path, "give a .nii or .nii.gz file")
    if not _is_nifti_name(path):
        raise BmlError("not a NIfTI file name (.nii or .nii.gz expected)", path,
                       "convert the scan to NIfTI, e.g. with dcm2niix")
    if path.stat().st_size == 0:
        raise BmlError("file is empty", path, "re-export the scan")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for garbage
        raise BmlError(f"not a readable NIfTI file ({type(exc).__name__}: {exc})", path,
                       "check that the file is a NIfTI-1/2 image, e.g. with fslinfo") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise BmlError(f"not a NIfTI image ({type(img).__name__})", path,
                       "convert the scan to NIfTI")
    hdr = img.header
    shape = tuple(int(s) for s in img.shape)
    dtype = hdr.get_data_dtype()
    if dtype.fields is not None or dtype.kind == "V":
        raise BmlError(f"RGB or structured voxels ({dtype}) are not an MR magnitude image",
                       path, "give a single-channel magnitude image")
    if dtype.kind == "c":
        raise BmlError(f"complex voxels ({dtype})", path,
                       "give the magnitude image (abs of the complex data)")
    if dtype.kind not in "iuf" and dtype.kind != "b":
        raise BmlError(f"unsupported voxel type {dtype}", path, "give integer or float voxels")
    if any(s == 0 for s in shape):
        raise BmlError(f"an axis has zero length (shape {shape})", path, "re-export the scan")
    if len(shape) < 3:
        raise BmlError(f"{len(shape)}D image (shape {shape}); a 3D volume is needed", path,
                       "give the whole 3D scan, not one slice")
    extra = shape[3:]
    if any(s != 1 for s in extra):
        raise BmlError(f"{len(shape)}D image with {int(np.prod(extra))} volumes (shape {shape})",
                       path, "split it and give one 3D volume, e.g. with fslsplit")
    shape3 = shape[:3]
    if max(shape3) > MAX_AXIS or int(np.prod(shape3, dtype=np.int64)) > MAX_VOXELS:
        raise BmlError(f"header dimensions {shape3} are implausibly large", path,
                       "the header is corrupt or this is not a knee MRI volume")
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)):
        raise BmlError("the affine has NaN/Inf entries", path, "fix the header (qform/sform)")
    det = float(np.linalg.det(affine[:3, :3]))
    if not np.isfinite(det) or abs(det) < 1e-12:
        raise BmlError("the affine is not invertible (zero voxel size or collinear axes)",
                       path, "fix the header (qform/sform)")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    hz = np.asarray(hdr.get_zooms()[:3], dtype=float)
    for z in (zooms, hz):
        if not np.all(np.isfinite(z)) or z.min() < MIN_SPACING_MM or z.max() > MAX_SPACING_MM:
            raise BmlError(f"absurd voxel spacing {tuple(round(float(v), 4) for v in z)} mm",
                           path, f"spacing must lie in [{MIN_SPACING_MM}, {MAX_SPACING_MM}] mm; fix the header")
    return img


def load_scan(path: str | os.PathLike, force_orientation: bool = False, is_mask: bool = False) -> Scan:
    """Load, validate and reorient one scan. Raises BmlError with one clear line.

    Masks (``is_mask``) may be constant (an empty lesion mask) and skip the sagittal check.
    """
    path = Path(path)
    img = read_header_checked(path)
    try:
        raw = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise BmlError(f"cannot read the image data, file truncated or corrupt ({type(exc).__name__})",
                       path, "re-export or re-copy the scan") from None
    if raw.ndim > 3:
        raw = raw.reshape(raw.shape[:3])
    if raw.dtype.kind == "b":
        raw = raw.astype(np.uint8)
    data = np.asarray(raw, dtype=np.float32)
    finite = np.isfinite(data)
    if not finite.all():
        raise BmlError(f"{int((~finite).sum())} voxels are NaN or Inf", path,
                       "fix the reconstruction or replace them (e.g. fslmaths -nan)")
    if not is_mask and float(data.max()) == float(data.min()):
        raise BmlError(f"the image is constant ({float(data.min())}): no contrast", path,
                       "check that this is the right series")
    ornt = io_orientation(img.affine)
    axcodes = tuple(ornt2axcodes(ornt))
    zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))
    warnings: list[str] = []
    lr_axis = int(np.flatnonzero(ornt[:, 0] == 0)[0])
    thick = int(np.argmax(zooms))
    others = np.delete(zooms, thick)
    if not is_mask and zooms[thick] > THICK_FACTOR * others.max():
        if thick != lr_axis:
            plane = {1: "a coronal", 2: "an axial"}[int(ornt[thick, 0])]
            msg = (f"this looks like {plane} acquisition: its thick axis ({zooms[thick]:.2f} mm) "
                   "is not left-right, and the models expect sagittal slices")
            if not force_orientation:
                raise BmlError(msg, path, "give the sagittal series, or pass --force-orientation")
            warnings.append(msg + " (forced)")
    to_working = ornt_transform(ornt, _WORKING_ORNT)
    work = np.ascontiguousarray(apply_orientation(data, to_working))
    spacing = [0.0, 0.0, 0.0]
    for i in range(3):
        spacing[int(to_working[i, 0])] = float(zooms[i])
    return Scan(path=path, data=work, spacing=tuple(spacing), image=img,
                input_shape=tuple(int(s) for s in data.shape), to_working=to_working,
                input_axcodes=axcodes, warnings=warnings)


def write_nifti_atomic(img: nib.spatialimages.SpatialImage, out_path: str | os.PathLike,
                       protect: tuple[os.PathLike, ...] = ()) -> Path:
    """Write atomically (never a partial file), refusing to replace a protected input."""
    out_path = Path(out_path)
    for p in protect:
        if Path(p).exists() and out_path.exists() and os.path.samefile(p, out_path):
            raise BmlError("refusing to overwrite an input scan", out_path, "choose another output folder")
    suffix = ".nii.gz" if out_path.name.lower().endswith(".gz") else ".nii"
    return atomic_write(out_path, lambda tmp: nib.save(img, tmp), suffix=suffix)


def mask_image_like(mask_working: np.ndarray, scan: Scan) -> nib.spatialimages.SpatialImage:
    """A uint8 image of the mask on the input's grid, affine and qform/sform codes."""
    src = scan.image
    mask_in = scan.to_input_grid(np.asarray(mask_working).astype(np.uint8))
    hdr = src.header.copy()
    hdr.set_data_dtype(np.uint8)
    out = type(src)(mask_in, src.affine, header=hdr)
    # The constructor may rewrite sform/qform; restore the input's exactly.
    out.set_qform(src.header.get_qform(), code=int(src.header["qform_code"]))
    out.set_sform(src.header.get_sform(), code=int(src.header["sform_code"]))
    out.header.set_slope_inter(1.0, 0.0)
    out.header["cal_min"], out.header["cal_max"] = 0, 1
    out.header["descrip"] = b"bmltrt mask"
    return out


def save_mask_like(mask_working: np.ndarray, scan: Scan, out_path: str | os.PathLike) -> Path:
    return write_nifti_atomic(mask_image_like(mask_working, scan), out_path, protect=(scan.path,))
