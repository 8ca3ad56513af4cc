import itertools

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, ornt_transform
from typer.testing import CliRunner

from bmltrt.cli import app
from bmltrt.errors import BmlError
from bmltrt.io import load_scan, save_mask_like
from bmltrt.io.nifti import _WORKING_ORNT

from conftest import save_nifti

# Working grid: 6 sagittal slices of 3 mm, rows 0.7 mm (S->I), columns 0.5 mm (A->P).
WORK_SPACING = {0: 3.0, 2: 0.7, 1: 0.5}  # by RAS axis: x (L-R), z (S-I), y (A-P)


def _all_orientations():
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((1, -1), repeat=3):
            yield np.array([[perm[i], flips[i]] for i in range(3)], float)


def _stored(work, target_ornt):
    """The working array as it would be stored in `target_ornt`, and that image's affine."""
    data = apply_orientation(work, ornt_transform(_WORKING_ORNT, target_ornt))
    aff = np.eye(4)
    aff[:3, :3] = 0
    for i, (ras_axis, flip) in enumerate(target_ornt):
        aff[int(ras_axis), i] = flip * WORK_SPACING[int(ras_axis)]
    aff[:3, 3] = (10.0, -20.0, 5.0)
    return data, aff


def test_48_orientations_load_alike_and_masks_map_back(tmp_path):
    rng = np.random.default_rng(0)
    work = rng.integers(1, 1000, size=(6, 9, 11)).astype(np.int16)  # distinct sizes expose swaps
    mask = (rng.random(work.shape) > 0.7).astype(np.uint8)
    n = 0
    for k, ornt in enumerate(_all_orientations()):
        data, aff = _stored(work, ornt)
        img = nib.Nifti1Image(data, aff)
        img.set_qform(aff, code=1)
        img.set_sform(aff, code=2)
        p = tmp_path / f"o{k}.nii.gz"
        nib.save(img, str(p))
        scan = load_scan(p)
        assert np.array_equal(scan.data, work.astype(np.float32)), f"orientation {ornt.tolist()}"
        assert np.allclose(scan.spacing, (3.0, 0.7, 0.5))
        out = save_mask_like(mask, scan, tmp_path / f"m{k}.nii.gz")
        back = nib.load(str(out))
        expect, _ = _stored(mask, ornt)
        assert back.shape == data.shape
        assert np.array_equal(np.asanyarray(back.dataobj), expect)
        assert np.allclose(back.affine, aff)
        assert int(back.header["qform_code"]) == 1 and int(back.header["sform_code"]) == 2
        assert back.get_data_dtype() == np.uint8
        n += 1
    assert n == 48


def test_coronal_acquisition_refused_unless_forced(tmp_path):
    aff = np.diag([0.5, 3.0, 0.5, 1.0])  # thick axis is anterior-posterior: coronal
    p = save_nifti(tmp_path / "cor.nii.gz", np.random.default_rng(1).random((8, 6, 8)).astype(np.float32), aff)
    with pytest.raises(BmlError, match="coronal"):
        load_scan(p)
    scan = load_scan(p, force_orientation=True)
    assert scan.warnings and "forced" in scan.warnings[0]


def test_input_never_overwritten(tmp_path):
    p = save_nifti(tmp_path / "scan.nii.gz", np.random.default_rng(2).random((4, 5, 6)).astype(np.float32),
                   np.diag([3.0, 0.5, 0.5, 1]))
    scan = load_scan(p)
    before = p.read_bytes()
    with pytest.raises(BmlError, match="overwrite"):
        save_mask_like(np.zeros(scan.data.shape, np.uint8), scan, p)
    assert p.read_bytes() == before


# ---- bad inputs: one line, exit 2, nothing written ---------------------------------

def _good(tmp_path, name="good.nii"):
    return save_nifti(tmp_path / name, np.random.default_rng(3).random((8, 8, 4)).astype(np.float32) * 100)


def _with_header_dims(src, dst, dims: dict):
    """Copy an uncompressed .nii to `dst` with header dim[k] = v for k, v in dims (data untouched)."""
    hdr = nib.load(str(src)).header.copy()
    for k, v in dims.items():
        hdr["dim"][k] = v
    raw = bytearray(src.read_bytes())
    raw[:348] = hdr.binaryblock
    dst.write_bytes(bytes(raw))
    src.unlink()
    return dst


def _make_bad(kind, d):
    rng = np.random.default_rng(4)
    vol = (rng.random((8, 8, 4)) * 100).astype(np.float32)
    if kind == "missing":
        return d / "nope.nii.gz"
    if kind == "not_nifti":
        p = d / "notes.nii"
        p.write_text("this is not an image\n" * 40)
        return p
    if kind == "wrong_extension":
        p = d / "scan.png"
        p.write_bytes(b"\x89PNG\r\n")
        return p
    if kind == "truncated_gzip":
        p = save_nifti(d / "trunc.nii.gz", (rng.random((40, 40, 10)) * 1000).astype(np.float32))
        b = p.read_bytes()
        p.write_bytes(b[: len(b) // 2])
        return p
    if kind in ("bad_crc", "damaged_tail"):
        # nibabel never reads the gzip trailer: both loaded silently, with wrong voxels in
        # the second, before the stream was checked to its end
        p = save_nifti(d / f"{kind}.nii.gz", (rng.random((40, 40, 10)) * 1000).astype(np.float32))
        b = bytearray(p.read_bytes())
        if kind == "bad_crc":
            b[-8:-4] = bytes(x ^ 0xFF for x in b[-8:-4])
        else:
            b[-300:-200] = bytes(100)
        p.write_bytes(bytes(b))
        return p
    if kind == "scl_overflow":  # a scale factor that takes int16 voxels beyond float32
        img = nib.Nifti1Image((vol * 100).astype(np.int16), np.diag([3.0, 0.5, 0.5, 1.0]))
        img.header.set_slope_inter(1e38, 0)
        p = d / "scl.nii.gz"
        nib.save(img, str(p))
        return p
    if kind == "float64_huge":  # stored values beyond float32, no scaling in the header
        v = vol.astype(np.float64)
        v[0, 0, 0] = 1e300
        img = nib.Nifti1Image(v, np.diag([3.0, 0.5, 0.5, 1.0]))
        p = d / "huge.nii.gz"
        nib.save(img, str(p))
        return p
    if kind == "2d":
        return save_nifti(d / "flat.nii.gz", vol[:, :, 0])
    if kind == "4d_many":
        return save_nifti(d / "dyn.nii.gz", np.stack([vol] * 3, -1))
    if kind == "nan_inf":
        v = vol.copy()
        v[0, 0, 0], v[1, 1, 1] = np.nan, np.inf
        return save_nifti(d / "nan.nii.gz", v)
    if kind == "constant":
        return save_nifti(d / "const.nii.gz", np.full((8, 8, 4), 7.0, np.float32))
    if kind == "zero_length":
        return _with_header_dims(save_nifti(d / "zero.nii", vol), d / "zero_axis.nii", {2: 0})
    if kind == "singular_affine":
        aff = np.diag([3.0, 0.5, 0.5, 1.0])
        aff[:3, 1] = aff[:3, 0]  # two axes point the same way
        img = nib.Nifti1Image(vol, aff)
        img.set_qform(None, code=0)
        img.set_sform(aff, code=1)
        p = d / "singular.nii.gz"
        nib.save(img, str(p))
        return p
    if kind == "absurd_spacing":
        return save_nifti(d / "spacing.nii.gz", vol, np.diag([500.0, 0.5, 0.5, 1]))
    if kind == "oversize_dims":
        return _with_header_dims(save_nifti(d / "big0.nii", vol), d / "oversize.nii", {1: 30000, 2: 30000, 3: 30000})
    if kind == "complex":
        return save_nifti(d / "cplx.nii.gz", vol.astype(np.complex64))
    if kind == "rgb":
        rgb = np.zeros((8, 8, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
        return save_nifti(d / "rgb.nii.gz", rgb)
    raise ValueError(kind)


BAD = ["missing", "not_nifti", "wrong_extension", "truncated_gzip", "bad_crc", "damaged_tail", "scl_overflow", "float64_huge", "2d", "4d_many", "nan_inf", "constant",
       "zero_length", "singular_affine", "absurd_spacing", "oversize_dims", "complex", "rgb"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_gives_one_line_and_exit_2(tmp_path, kind):
    src = tmp_path / "in"
    src.mkdir()
    bad = _make_bad(kind, src)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["detect", str(bad), "-o", str(out)])
    assert res.exit_code == 2, res.output
    err = res.stderr
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in res.output + err
    if kind != "missing":
        assert str(bad.name) in lines[0]
    if kind in ("truncated_gzip", "bad_crc", "damaged_tail"):
        assert "corrupt" in lines[0], lines[0]
    if kind == "scl_overflow":
        assert "scale factor" in lines[0], lines[0]
    if kind == "float64_huge":
        assert "1 voxels are beyond the float32 range" in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_load_scan_accepts_4d_with_one_volume(tmp_path):
    vol = np.random.default_rng(5).random((8, 8, 4, 1)).astype(np.float32)
    scan = load_scan(save_nifti(tmp_path / "one.nii.gz", vol))
    assert scan.data.ndim == 3
    from bmltrt.io.nifti import mask_image_like

    mask = np.zeros(scan.data.shape, np.uint8)
    mask[(0,) * 3] = 1
    out = mask_image_like(mask, scan)  # the mask has the input's shape, (8, 8, 4, 1)
    assert out.shape == vol.shape and int(out.header["dim"][0]) == 4 and int(np.asarray(out.dataobj).sum()) == 1


def test_bytes_after_the_gzip_stream_are_ignored_like_gzip_does(tmp_path):
    """Some tools pad files; nibabel and `gzip -t` accept them, and the checksum check must too."""
    vol = (np.random.default_rng(6).random((40, 40, 10)) * 1000).astype(np.float32)
    p = save_nifti(tmp_path / "padded.nii.gz", vol)
    p.write_bytes(p.read_bytes() + b"\0" * 512 + b"junk")
    assert np.allclose(load_scan(p).data.sum(), vol.sum(), rtol=1e-5)


def test_voxel_volume_of_a_sheared_grid_is_the_affines_determinant():
    """Volumes are voxels x |det(affine)|: on a sheared grid the product of the voxel
    spacings (the column norms) overstates them (4.4 % for a shear of 0.3)."""
    from bmltrt.io.nifti import scan_from_image

    data = np.random.default_rng(0).random((12, 20, 30)).astype(np.float32)
    shear = np.eye(4)
    shear[1, 2] = 0.3
    for affine in (np.diag([3.0, 0.5, 0.5, 1.0]), shear @ np.diag([3.0, 0.5, 0.5, 1.0])):
        scan = scan_from_image(nib.Nifti1Image(data, affine), "x.nii.gz")
        assert scan.voxel_volume_mm3 == pytest.approx(abs(np.linalg.det(affine[:3, :3])))


def test_the_overlay_shows_the_whole_femur_and_every_lesion():
    """The montage covers the femur from its first slice to its last, and on a thin-slice scan
    whose lesions span more slices than it has room for, still shows each lesion (its largest
    slice) and says how many slices with lesion it leaves out."""
    from bmltrt.report import FEMUR_TILES, MAX_LESION_TILES, montage_slices, overlay_image

    n = 200
    femur = np.zeros((n, 24, 24), bool)
    femur[20:181, 4:20, 4:20] = True
    lesion = np.zeros_like(femur)
    lesion[40:70, 6:14, 6:14] = True  # a large lesion on 30 slices
    lesion[150:154, 8:10, 8:10] = True  # a small one on 4 slices, smaller on each than the first
    lesion[152, 8:11, 8:11] = True  # (its largest slice: 152)
    shown, les_shown, total = montage_slices(femur, lesion)
    assert total == 34 and 152 in les_shown and len(les_shown) == MAX_LESION_TILES
    assert set(les_shown) <= set(shown) and shown[0] == 20 and shown[-1] == 180
    assert len(set(shown) - set(les_shown)) <= FEMUR_TILES + 1
    assert np.diff(shown).max() <= np.ceil(161 / FEMUR_TILES)  # no stretch of femur left out
    sheet = overlay_image(np.random.default_rng(0).random(femur.shape), femur, lesion, (3.0, 0.5, 0.5), "t")
    assert sheet.width > 0
    few = np.zeros_like(femur)
    few[60:63, 6:14, 6:14] = True
    shown, les_shown, total = montage_slices(femur, few)
    assert les_shown == [60, 61, 62] and total == 3 and {60, 61, 62} <= set(shown)


def test_normalisation_does_not_depend_on_the_scale_a_scan_is_stored_at():
    """A scan stored at 1e-9 or 1e-30 of its values is the same scan (its range was floored at
    1e-6, so it read dimmer and the femur shrank)."""
    from bmltrt.runtime.preprocess import normalize_intensity

    v = np.random.default_rng(3).gamma(2.0, 100.0, (8, 32, 32)).astype(np.float32)
    ref = normalize_intensity(v)
    for scale in (1e-30, 1e-9, 1e-6, 1e6, 1e30):
        assert np.allclose(normalize_intensity((v * np.float32(scale)).astype(np.float32)), ref, atol=1e-5), scale
    assert not normalize_intensity(np.full((4, 4, 4), 7.0, np.float32)).any()  # constant: zeros, no NaN
