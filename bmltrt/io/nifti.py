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
from bmltrt.io.inputs import file_problem, single_dicom_file_problem
from bmltrt.io.outputs import MASK_DESCRIP, is_nifti_name, nifti_stem

WORKING_AXCODES = ("R", "I", "P")
_WORKING_ORNT = axcodes2ornt(WORKING_AXCODES)

# Sanity limits. A knee MRI voxel is 0.1-8 mm; no scan has axes over 2048 voxels.
MIN_SPACING_MM = 0.05
MAX_SPACING_MM = 20.0
MAX_AXIS = 2048
MAX_VOXELS = 2**29
# An axis is "the thick one" when its spacing exceeds the others by this factor.
THICK_FACTOR = 1.5
# A label map's femur below this is no knee's (the distal femur in a knee scan is tens of cm³); a
# few voxels of label 1 would give scans whose femur truth is empty once resliced.
MIN_FEMUR_LABEL_MM3 = 1000.0
MAX_LABEL = 255  # label numberings (OAI-ZIB: 1-11) fit a byte


def _is_nifti_name(path: Path) -> bool:
    return is_nifti_name(path.name)


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
    stem: str | None = None  # output name when not the file's (DICOM series, in-memory images)
    source: dict = field(default_factory=dict)  # what a DICOM series was read (series, echo): for the report

    @property
    def name(self) -> str:
        """Names the outputs: the file name without .nii/.nii.gz (any case), or `stem`."""
        return self.stem if self.stem else nifti_stem(self.path.name)

    @property
    def voxel_volume_mm3(self) -> float:
        """The spacing's product, times the affine's |det| over the product of its column
        norms: 1 for an orthogonal grid, less for a sheared one (whose voxels are
        parallelepipeds smaller than the box of their edge lengths)."""
        a = np.asarray(self.image.affine, float)[:3, :3]
        norms = float(np.prod(np.sqrt((a ** 2).sum(axis=0))))
        shear = abs(float(np.linalg.det(a))) / norms if norms > 0 else 1.0
        return float(np.prod(self.spacing)) * min(1.0, shear)

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
    problem = file_problem(path) or single_dicom_file_problem(path)
    if problem is not None:
        raise problem
    if not _is_nifti_name(path):
        if path.suffix.lower() in (".hdr", ".img"):  # NIfTI or Analyze as a pair of files
            raise BmlError("a two-file image (.hdr + .img): bmltrt reads single-file NIfTI", path,
                           "make one .nii.gz of the pair, e.g. fslchfiletype NIFTI_GZ, or in Python "
                           "nibabel.save(nibabel.load('scan.hdr'), 'scan.nii.gz')")
        raise BmlError("not a NIfTI file name (.nii or .nii.gz expected)", path,
                       "convert the scan to NIfTI, e.g. with dcm2niix")
    if path.stat().st_size == 0:
        raise BmlError("file is empty", path, "re-export the scan")
    try:  # a permission problem is not a format problem
        with open(path, "rb") as f:
            magic = f.read(2)
    except OSError as exc:
        raise BmlError(f"cannot read this file ({os.strerror(exc.errno) if exc.errno else exc})", path,
                       "check the file's permissions (and its folder's)") from None
    if path.name.lower().endswith(".gz") and magic != b"\x1f\x8b":
        raise BmlError("named .gz but not gzip-compressed", path,
                       "rename it to .nii if it is an uncompressed NIfTI file (or gzip it)")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for garbage
        raise BmlError(f"not a readable NIfTI file ({type(exc).__name__}: {exc})", path,
                       "check that the file is a NIfTI-1/2 image, e.g. with fslinfo") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise BmlError(f"not a NIfTI image ({type(img).__name__})", path,
                       "convert the scan to NIfTI")
    # before inflating: absurd dimensions are refused first; pixdim decides the voxel size only
    # without an sform, and only then is the file's own pixdim read
    check_header(img, path, raw_pixdim(path, img) if int(img.header["sform_code"]) <= 0 else None)
    if path.name.lower().endswith(".gz"):
        # nibabel reads only the bytes it needs and never reaches the gzip trailer, so a file
        # damaged in a copy would load with wrong voxels: the file is inflated once, here, with
        # its checksum checked, and the image is read from those bytes.
        img = type(img).from_bytes(gunzip_checked(path))
    return img


def gunzip_checked(path: Path) -> bytes:
    """The decompressed bytes of a gzip file, every member's CRC and length checked (zlib);
    bytes after the stream are ignored, as gzip and nibabel do. Raises BmlError."""
    import zlib

    parts = []
    try:
        with open(path, "rb") as f:
            d = zlib.decompressobj(wbits=31)  # gzip framing
            while True:
                chunk = d.unused_data or f.read(1 << 22)
                if not chunk:
                    break
                if d.eof:  # another member follows, or bytes after the stream that readers ignore
                    if not chunk.startswith(b"\x1f\x8b"):
                        break
                    d = zlib.decompressobj(wbits=31)
                parts.append(d.decompress(chunk))
            if not d.eof:
                raise EOFError("the stream ends before its last block")
    except (OSError, EOFError, zlib.error) as exc:
        raise BmlError(f"the compressed data are corrupt or cut short ({type(exc).__name__}: {exc})", path,
                       "copy or export the scan again; `gzip -t` shows the damage") from None
    return b"".join(parts)


def read_label_map(path: str | os.PathLike, img: nib.spatialimages.SpatialImage | None = None) -> np.ndarray:
    """A label map's voxels, checked: a readable NIfTI of whole numbers that names the femur
    (label 1). An MR image given by mistake has thousands of grey values and is refused.
    `img`: the file already opened by read_header_checked."""
    img = img if img is not None else read_header_checked(path)
    try:
        lab = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise BmlError(f"cannot read the label map's voxels ({type(exc).__name__})", path,
                       "copy or export it again") from None
    # bincount is ~20x faster than unique on the usual unsigned label maps
    counts = np.bincount(lab.ravel()) if lab.dtype.kind == "u" else None
    values = np.flatnonzero(counts) if counts is not None else np.unique(lab)
    hint = "give label maps with 1 femur, 2 femoral cartilage, ..., 7 femoral lesion"
    whole = np.isfinite(values) if values.dtype.kind == "f" else np.ones(values.size, bool)
    whole[whole] = np.mod(values[whole], 1) == 0  # inf and NaN are not labels, and np.mod would warn
    if values.size <= 64 and not whole.all():
        raise BmlError(f"not a label map: a voxel holds {values[~whole][0]:g}, not a whole-number label", path, hint)
    if values.size > 64 or 1 not in values:
        raise BmlError(f"not a label map ({values.size} distinct value{'s' if values.size != 1 else ''}; label 1, "
                       f"the femur, {'present' if 1 in values else 'missing'})", path, hint)
    odd = values[(values < 0) | (values > MAX_LABEL)]
    if odd.size:  # a label numbering has small non-negative numbers; -1 or 1e9 is a value of something else
        raise BmlError(f"not a label map: a voxel holds {odd[0]:g}, not a label (0-{MAX_LABEL})", path, hint)
    # a lesion (7) is femur too
    n_femur = int(counts[1] + (counts[7] if counts.size > 7 else 0)) if counts is not None \
        else int(np.count_nonzero((lab == 1) | (lab == 7)))
    femur_mm3 = n_femur * voxel_volume_mm3(img)
    if femur_mm3 < MIN_FEMUR_LABEL_MM3:
        raise BmlError(f"the femur (label 1, with any lesion 7) is only {femur_mm3:.0f} mm³: too small for a knee's "
                       f"(at least {MIN_FEMUR_LABEL_MM3 / 1000:g} cm³)", path,
                       "check the voxel size in its header, or leave this label map out")
    return lab


def voxel_volume_mm3(img) -> float:
    """One voxel's volume from the affine (sform or qform as nibabel chose), in mm³."""
    return float(abs(np.linalg.det(np.asarray(img.affine, float)[:3, :3])))


def raw_pixdim(path: Path, img) -> np.ndarray | None:
    """pixdim[1:4] as the file holds it. nibabel's loader sets a zero pixdim to 1 (with a
    warning), so a qform-only header with a zero voxel size would be read as 1 mm voxels."""
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as f:
            return np.asarray(type(img.header).from_fileobj(f, check=False)["pixdim"][1:4], dtype=float)
    except Exception:  # noqa: BLE001 - nib.load read it a moment ago; the checked header stands
        return None


def check_header(img: nib.spatialimages.SpatialImage, path, pixdim_in_file=None) -> None:
    """Everything a NIfTI header can tell that makes the image unusable. Raises BmlError.
    `pixdim_in_file`: pixdim[1:4] read without nibabel's fixes (raw_pixdim)."""
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
    # Without qform or sform the file says nothing of which way is left-right, so the
    # sagittal slices cannot be found (nibabel would silently assume 1 mm voxels, LAS).
    if int(hdr["qform_code"]) <= 0 and int(hdr["sform_code"]) <= 0:
        raise BmlError("the header has no orientation (qform_code and sform_code are both 0)", path,
                       "convert from the DICOM again (e.g. dcm2niix) or give bmltrt the DICOM folder")
    pixdim = np.asarray(hdr["pixdim"][1:4] if pixdim_in_file is None else pixdim_in_file, dtype=float)
    if int(hdr["sform_code"]) <= 0 and (not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0)):
        raise BmlError(f"the header's voxel size (pixdim {tuple(float(v) for v in pixdim)}) has zero, "
                       "negative or NaN entries", path, "fix the header (pixdim) or convert the scan again")
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
            unit = hdr.get_xyzt_units()[0] if hasattr(hdr, "get_xyzt_units") else "mm"
            if unit in ("meter", "micron"):  # like nibabel and most tools, the affine is read in mm
                raise BmlError(f"absurd voxel spacing {tuple(round(float(v), 4) for v in z)} mm: the header "
                               f"gives its lengths in {unit}s", path, "convert the image to millimetres (as "
                               "scanners and dcm2niix write it)")
            raise BmlError(f"absurd voxel spacing {tuple(round(float(v), 4) for v in z)} mm",
                           path, f"spacing must lie in [{MIN_SPACING_MM}, {MAX_SPACING_MM}] mm; fix the header")


def qform_sform_disagreement(img) -> str:
    """How the header's two orientations differ, where both are set and differ by more than
    half a voxel somewhere in the volume (a flip, another orientation, a shift); "" if not."""
    hdr = img.header
    if int(hdr["qform_code"]) <= 0 or int(hdr["sform_code"]) <= 0:
        return ""
    q, s = hdr.get_qform(), hdr.get_sform()
    q_codes, s_codes = ("".join(ornt2axcodes(io_orientation(a))) for a in (q, s))
    if q_codes != s_codes:
        return f"{q_codes} against {s_codes}"
    shape = np.asarray(img.shape[:3], float) - 1
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0]) for j in (0, shape[1]) for k in (0, shape[2])])
    apart = float(np.abs((corners @ (q - s).T)[:, :3]).max())
    voxel = float(np.sqrt((s[:3, :3] ** 2).sum(axis=0)).min())
    return f"by up to {apart:.1f} mm" if apart > voxel / 2 else ""


def load_scan(path: str | os.PathLike, force_orientation: bool = False, is_mask: bool = False,
              stem: str | None = None) -> Scan:
    """Load, validate and reorient one scan. Raises BmlError with one clear line.

    Masks (``is_mask``) may be constant (an empty lesion mask) and skip the sagittal check;
    `stem` names the outputs when not the file's name.
    """
    path = Path(path)
    return scan_from_image(read_header_checked(path), path, force_orientation, is_mask, stem=stem)


def image_from_array(array, affine) -> nib.Nifti1Image:
    """A NIfTI image of an array on a RAS affine (voxel index -> mm), qform/sform code 1."""
    if isinstance(array, nib.spatialimages.SpatialImage):
        raise BmlError("an image and an affine: the image has its own", hint="pass the image alone, or its array "
                       "with the affine (e.g. image.get_fdata(), affine)")
    arr = np.asanyarray(array)
    try:
        aff = np.asarray(affine, dtype=float)
    except (TypeError, ValueError):
        raise BmlError(f"the affine is not a matrix of numbers ({type(affine).__name__})",
                       hint="give the 4x4 voxel-to-RAS-mm matrix") from None
    if aff.shape != (4, 4):
        raise BmlError(f"the affine must be 4x4, not {aff.shape}", hint="give the voxel-to-RAS-mm matrix")
    if not np.isfinite(aff).all():
        raise BmlError("the affine has NaN or Inf entries", hint="give the voxel-to-RAS-mm matrix")
    if not np.allclose(aff[3], [0, 0, 0, 1]):
        raise BmlError(f"the affine's last row is {aff[3].tolist()}, not [0, 0, 0, 1]",
                       hint="give the voxel-to-RAS-mm matrix (a projective row is not a voxel grid)")
    if abs(np.linalg.det(aff[:3, :3])) < 1e-9:
        raise BmlError("the affine is not invertible (a zero voxel size, or axes that coincide)",
                       hint="give the voxel-to-RAS-mm matrix")
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    elif arr.dtype.kind in "iu" and arr.dtype.itemsize > 4 or arr.dtype == np.float16 or arr.dtype.kind == "f" \
            and arr.dtype.itemsize > 8:
        arr = arr.astype(np.float32)  # NIfTI tools choke on 64-bit integers; float16 and float128 have no NIfTI code
    elif arr.dtype.kind not in "iufc":
        raise BmlError(f"the array holds {arr.dtype} values, not numbers", hint="give an array of voxel intensities")
    img = nib.Nifti1Image(arr, aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return img


def scan_from_image(img: nib.spatialimages.SpatialImage, source, force_orientation: bool = False,
                    is_mask: bool = False, stem: str | None = None) -> Scan:
    """Validate and reorient an image that is already open (from a file, DICOM or memory)."""
    path = Path(str(source))
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise BmlError(f"not a NIfTI image ({type(img).__name__})", path, "give a nibabel Nifti1Image")
    check_header(img, path)
    try:
        raw = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise BmlError(f"cannot read the image data, file truncated or corrupt ({type(exc).__name__})",
                       path, "re-export or re-copy the scan") from None
    if raw.ndim > 3:
        raw = raw.reshape(raw.shape[:3])
    if raw.dtype.kind == "b":
        raw = raw.astype(np.uint8)
    with np.errstate(over="ignore", invalid="ignore"):  # reported below as one line, not as a warning
        data = np.asarray(raw, dtype=np.float32)
    finite = np.isfinite(data)
    if not finite.all():
        if raw.dtype.kind == "f" and np.isfinite(raw[~finite]).any():  # finite, but beyond float32
            slope, inter = (float(getattr(img.dataobj, a, np.nan)) for a in ("slope", "inter"))
            unscaled = (not np.isfinite(slope) or slope == 1.0) and (not np.isfinite(inter) or inter == 0.0)
            if unscaled:  # the stored values themselves are too large, not the header's scaling
                raise BmlError(f"{int((~finite).sum())} voxels are beyond the float32 range (|value| > 3.4e38)", path,
                               "fix the reconstruction, or rescale the image before saving it")
            raise BmlError(f"the header's scale factor (scl_slope {slope:g}, scl_inter {inter:g}) takes the voxels "
                           "beyond float32", path, "fix scl_slope/scl_inter in the header (e.g. with nibabel)")
        bad = int((~finite).sum())
        raise BmlError(f"{bad} voxel{' is' if bad == 1 else 's are'} NaN or Inf", path,
                       "fix the reconstruction or replace them (e.g. fslmaths -nan)")
    if not is_mask and float(data.max()) == float(data.min()):
        raise BmlError(f"the image is constant ({float(data.min())}): no contrast", path,
                       "check that this is the right series")
    ornt = io_orientation(img.affine)
    axcodes = tuple(ornt2axcodes(ornt))
    zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))
    warnings: list[str] = []
    disagree = qform_sform_disagreement(img)
    if disagree:
        warnings.append(f"the header's qform and sform disagree ({disagree}); the sform was used, as nibabel and "
                        "FSL do (ITK-based tools read the qform): check which one is right")
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
                input_axcodes=axcodes, warnings=warnings, stem=stem)


def nifti_bytes(img: nib.spatialimages.SpatialImage, gz: bool) -> bytes:
    """The file's bytes; gzip like nibabel (level 1, no time stamp: same input, same bytes)."""
    import gzip

    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=1, mtime=0) if gz else raw


def write_nifti(img: nib.spatialimages.SpatialImage, path: str | os.PathLike, gz: bool | None = None) -> Path:
    """Write to exactly `path`, whatever its name ends in (compressed when `gz`)."""
    path = Path(path)
    gz = path.name.lower().endswith(".gz") if gz is None else gz
    path.write_bytes(nifti_bytes(img, gz))
    return path


def write_nifti_atomic(img: nib.spatialimages.SpatialImage, out_path: str | os.PathLike,
                       protect: tuple[os.PathLike, ...] = ()) -> Path:
    """Write atomically (never a partial file), refusing to replace a protected input."""
    out_path = Path(out_path)
    for p in protect:
        if Path(p).exists() and out_path.exists() and os.path.samefile(p, out_path):
            raise BmlError("refusing to overwrite an input scan", out_path, "choose another output folder")
    gz = out_path.name.lower().endswith(".gz")
    return atomic_write(out_path, lambda tmp: write_nifti(img, tmp, gz))


def mask_image_like(mask_working: np.ndarray, scan: Scan) -> nib.spatialimages.SpatialImage:
    """A uint8 image of the mask on the input's grid, affine and qform/sform codes."""
    src = scan.image
    mask_in = scan.to_input_grid(np.asarray(mask_working).astype(np.uint8))
    if len(src.shape) > 3:  # a single-volume 4D input (x, y, z, 1) gets a mask of its own shape
        mask_in = mask_in.reshape(src.shape)
    hdr = src.header.copy()
    hdr.set_data_dtype(np.uint8)
    out = type(src)(mask_in, src.affine, header=hdr)
    # The constructor may rewrite sform/qform; restore the input's exactly.
    out.set_qform(src.header.get_qform(), code=int(src.header["qform_code"]))
    out.set_sform(src.header.get_sform(), code=int(src.header["sform_code"]))
    sform_zooms = np.sqrt((src.header.get_sform()[:3, :3] ** 2).sum(axis=0))
    if int(src.header["sform_code"]) > 0 and int(src.header["qform_code"]) <= 0 \
            and not np.allclose(out.header["pixdim"][1:4], sform_zooms, rtol=1e-3):
        # The sform is the geometry and pixdim (which only a qform uses) is off: zero in the
        # file, which nibabel reads as 1. Tools that take the voxel size from pixdim
        # (fslstats -V) must get the sform's.
        out.header["pixdim"][1:4] = sform_zooms
    out.header.set_slope_inter(1.0, 0.0)
    out.header["cal_min"], out.header["cal_max"] = 0, 1
    out.header["descrip"] = MASK_DESCRIP
    return out


def save_mask_like(mask_working: np.ndarray, scan: Scan, out_path: str | os.PathLike) -> Path:
    return write_nifti_atomic(mask_image_like(mask_working, scan), out_path, protect=(scan.path,))
