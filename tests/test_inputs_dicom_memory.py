"""DICOM series, in-memory detection, thin slices, the knee rules on real scans, output naming."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from bmltrt.cli import app
from bmltrt.io import load_scan
from bmltrt.io.outputs import OutputSet, is_output_name, strip_nifti_suffix

from conftest import SHARED_DATA, needs_shared

DICOM_DIR = SHARED_DATA / "real" / "dicom" / "pymskt_mese_t2"
TWIN = SHARED_DATA / "real" / "pymskt_mese_t2_echo1_TE6.3.nii.gz"
needs_dicom = pytest.mark.skipif(not (DICOM_DIR.exists() and TWIN.exists()), reason="../shared/data not present")


# ---- naming ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, stem", [
    ("k.nii.gz", "k"), ("K.NII.GZ", "K"), ("k.nii", "k"), ("k.Nii", "k"), ("my knee.v2.nii.gz", "my knee.v2"),
    ("ü knee [L].nii.gz", "ü knee [L]"), ("a.b.c", "a.b.c"), (".nii.gz", ".nii.gz"),
])
def test_output_stems(name, stem):
    assert strip_nifti_suffix(name) == stem


def test_output_names(tmp_path):
    paths = OutputSet(tmp_path, "my knee.v2").paths
    assert sorted(p.name for p in paths.values()) == ["my knee.v2_bml.nii.gz", "my knee.v2_femur.nii.gz",
                                                       "my knee.v2_overlay.png", "my knee.v2_report.json"]
    assert is_output_name("K_BML.NII.GZ") and is_output_name("k_report.json") and not is_output_name("k.nii.gz")


# ---- DICOM -------------------------------------------------------------------------------

@needs_dicom
def test_dicom_series_matches_its_nifti_twin():
    from bmltrt.io.dicom import find_series, read_series

    series = find_series(DICOM_DIR)
    assert len(series) == 1 and len(series[0].echo_times) == 8 and series[0].echo == 1
    assert series[0].stem == "pymskt_mese_t2_echo1"
    img = read_series(series[0])
    twin = nib.load(str(TWIN))
    assert np.array_equal(np.asanyarray(img.dataobj), np.asanyarray(twin.dataobj))
    assert np.allclose(img.affine, twin.affine, atol=1e-4)
    later = read_series(find_series(DICOM_DIR, echo=3)[0])
    assert later.shape == img.shape and np.allclose(later.affine, img.affine)
    assert not np.array_equal(np.asanyarray(later.dataobj), np.asanyarray(img.dataobj))


@needs_dicom
def test_dicom_shuffled_names_give_the_same_volume(tmp_path):
    from bmltrt.io.dicom import find_series, read_series

    files = sorted(DICOM_DIR.glob("*.dcm"))
    rng = np.random.default_rng(0)
    for i, f in zip(rng.permutation(len(files)), files):  # names no longer in slice order
        shutil.copy2(f, tmp_path / f"IM{i:04d}")
    img = read_series(find_series(tmp_path)[0])
    twin = nib.load(str(TWIN))
    assert np.array_equal(np.asanyarray(img.dataobj), np.asanyarray(twin.dataobj))


@needs_dicom
def test_detect_on_a_dicom_folder_writes_nifti_on_its_grid(tmp_path):
    res = CliRunner().invoke(app, ["detect", str(DICOM_DIR), "-o", str(tmp_path)])
    assert res.exit_code == 0, res.stderr
    bml = nib.load(str(tmp_path / "pymskt_mese_t2_echo1_bml.nii.gz"))
    twin = nib.load(str(TWIN))
    assert bml.shape == twin.shape and np.allclose(bml.affine, twin.affine, atol=1e-4)
    rep = json.loads((tmp_path / "pymskt_mese_t2_echo1_report.json").read_text())
    assert rep["input"]["shape"] == [256, 256, 24] and rep["input"]["spacing_mm"] == pytest.approx([0.625, 0.625, 4.0],
                                                                                                  abs=1e-3)


# ---- the knee rules never fire on real knees or phantoms ----------------------------------

@needs_shared
@pytest.mark.parametrize("name", ["pykneer_qdess_echo2_oailike_448x448x40.nii.gz",
                                  "pykneer_qdess_echo1_oailike_448x448x40.nii.gz",
                                  "pymskt_mese_t2_echo1_TE6.3.nii.gz"])
def test_knee_rules_pass_real_scans(name):
    from bmltrt.io.knee_input import MIN_NEIGHBOUR_CORRELATION, check_knee_input, neighbour_correlation

    p = SHARED_DATA / "real" / name
    if not p.exists():
        pytest.skip(f"{name} absent")
    scan = load_scan(p)
    assert check_knee_input(scan) == []
    assert neighbour_correlation(scan.data) > 3 * MIN_NEIGHBOUR_CORRELATION


def test_knee_rules_pass_phantoms(phantom_case, healthy_case):
    from bmltrt.io.knee_input import check_knee_input

    for path, _ in (phantom_case, healthy_case):
        assert check_knee_input(load_scan(path)) == []


# ---- in memory, thin slices ---------------------------------------------------------------

@pytest.fixture(scope="module")
def checked_result(phantom_case, detector):
    scan_path, _ = phantom_case
    return detector.detect_checked(load_scan(scan_path))


def test_detect_image_from_array_and_affine(phantom_case, detector, checked_result):
    scan_path, _ = phantom_case
    img = nib.load(str(scan_path))
    d = detector.detect_image(np.asanyarray(img.dataobj), img.affine, name="mem")
    assert d.scan.name == "mem"
    assert np.array_equal(d.lesion, checked_result.lesion) and np.array_equal(d.femur, checked_result.femur)



def test_detect_image_checks_a_nifti_image_like_a_file(detector):
    from bmltrt.errors import BmlError

    img = nib.Nifti1Image(np.random.default_rng(0).random((8, 20, 20)).astype(np.float32), np.diag([3, .5, .5, 1.]))
    with pytest.raises(BmlError, match="noise"):
        detector.detect_image(img, name="noise")


def test_detect_image_refuses_an_array_without_affine(detector):
    from bmltrt.errors import BmlError

    with pytest.raises(BmlError, match="affine"):
        detector.detect_image(np.zeros((4, 4, 4), np.float32))


def test_thin_slices_are_brought_to_the_models_grid_and_back(phantom_case, detector, checked_result):
    """A 0.75 mm-slice copy of the phantom (each 3 mm slice four times) must give the same masks."""
    scan_path, _ = phantom_case
    scan = load_scan(scan_path)
    thin = np.repeat(scan.data, 4, axis=0)  # working order: slices first
    # array axes L->R, S->I, A->P (the working order) on a RAS affine
    img = nib.Nifti1Image(thin, np.array([[0.75, 0, 0, 0], [0, 0, -scan.spacing[2], 0],
                                          [0, -scan.spacing[1], 0, 0], [0, 0, 0, 1.0]]))
    d = detector.detect_image(img, name="thin")
    assert d.report["model_grid"]["slices"] == scan.data.shape[0]
    assert d.report["model_grid"]["slice_mm"] == pytest.approx(3.0)
    assert d.lesion.shape == thin.shape
    assert np.array_equal(d.femur, np.repeat(checked_result.femur, 4, axis=0))
    assert np.array_equal(d.lesion, np.repeat(checked_result.lesion, 4, axis=0))
    assert d.report["lesion_volume_mm3"] == pytest.approx(checked_result.report["lesion_volume_mm3"], rel=1e-6)


def test_model_files_are_verified_once_per_file(monkeypatch):
    import hashlib

    from bmltrt.runtime import models
    from bmltrt.runtime.models import ModelStore

    store = ModelStore.open()
    store.path("segmenter")  # hashed (or already hashed by an earlier test)
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    for _ in range(3):
        store.path("segmenter")
    assert calls == [] and any("segmenter.onnx" in k[0] for k in models._VERIFIED)


@needs_dicom
def test_detect_image_of_a_read_series_is_named_after_the_series(detector, monkeypatch):
    """detect_image(read_series(...)) named its outputs "image"; `name=` still wins."""
    from bmltrt.io.dicom import find_series, read_series

    img = read_series(find_series(DICOM_DIR)[0])
    monkeypatch.setattr(detector, "detect_checked", lambda scan, progress=None: scan)  # the naming only
    assert detector.detect_image(img).stem == "pymskt_mese_t2_echo1"
    assert detector.detect_image(img, name="left knee").stem == "left knee"
    from bmltrt.errors import BmlError

    for bad in ("a/b", "..", "", "a\x00b", "tab\tname"):
        with pytest.raises(BmlError, match="cannot name output files"):
            detector.detect_image(img, name=bad)
    plain = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine)
    assert detector.detect_image(plain).stem == "image"
