"""detect --precision fp16 end to end; GPU detection that a GPU wheel cannot fool."""

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from bmltrt.cli import app

from conftest import REPO, has_gpu, needs_torch


@pytest.fixture(scope="module")
def both_precisions(tmp_path_factory):
    """The shipped models with FP16 graphs made from their float32 graphs by the CLI (no
    calibration, no lint: fast)."""
    if not __import__("conftest").has_torch():
        pytest.skip("torch not installed")
    out = tmp_path_factory.mktemp("models")
    r = CliRunner().invoke(app, ["export", "--from-onnx", str(REPO / "export"), "--precision", "both", "--out",
                                 str(out), "--calibration-cases", "0", "--no-lint"])
    assert r.exit_code == 0, r.output + r.stderr
    assert "PASSED" in r.output and "inpainter_448" in r.output and "segmenter_fp16.onnx" in r.output
    man = json.loads((out / "manifest.json").read_text())
    assert sorted(man["files"]) == sorted(f"{n}{s}.onnx" for n in man["models"] for s in ("", "_fp16"))
    return out


@needs_torch
def test_detect_fp16_runs_and_agrees_with_fp32(both_precisions, phantom_case, tmp_path):
    from bmltrt.io import load_scan

    scan, _ = phantom_case
    masks = {}
    for prec in ("fp32", "fp16"):
        r = CliRunner().invoke(app, ["detect", str(scan), "-o", str(tmp_path / prec), "--models", str(both_precisions),
                                     "--precision", prec, "--device", "cpu"])
        assert r.exit_code == 0, r.output + r.stderr
        warned = "ONNX Runtime on a CPU does not compute in FP16" in r.stderr
        assert warned == (prec == "fp16")
        rep = json.loads((tmp_path / prec / "knee_report.json").read_text())
        assert rep["precision"] == prec
        assert rep["models"]["segmenter"]["file"] == ("segmenter.onnx" if prec == "fp32" else "segmenter_fp16.onnx")
        masks[prec] = {k: load_scan(tmp_path / prec / f"knee_{k}.nii.gz", is_mask=True).data > 0
                       for k in ("bml", "femur")}

    def dice(a, b):
        return 1.0 if not (a.any() or b.any()) else 2 * (a & b).sum() / (a.sum() + b.sum())

    assert masks["fp32"]["bml"].any()
    assert dice(masks["fp16"]["femur"], masks["fp32"]["femur"]) >= 0.99
    assert dice(masks["fp16"]["bml"], masks["fp32"]["bml"]) >= 0.98


def test_no_cuda_device_means_no_gpu_whatever_the_wheels_say(monkeypatch):
    """Faked 'no device' (what the CUDA driver would say): gpu_available is False even where
    onnxruntime-gpu or CuPy are installed, and --device gpu falls back with the reason."""
    from bmltrt import doctor
    from bmltrt.runtime.backends import gpu_available, make_backend

    monkeypatch.setenv("BMLTRT_NO_GPU", "1")
    assert doctor.cuda_devices()[0] == 0
    ok, why = gpu_available()
    assert not ok and "no CUDA device" in why
    be, warns = make_backend("auto", "gpu")
    assert be.device == "cpu" and any("no CUDA device" in w for w in warns)
    rows = {r["component"]: r for r in doctor.check()}
    assert not rows["gpu"]["ok"] and "no CUDA device" in rows["gpu"]["detail"]


def test_cuda_visible_devices_hides_every_device():
    """The driver applies CUDA_VISIBLE_DEVICES: with none visible there is no GPU (on any machine)."""
    code = "from bmltrt.doctor import cuda_devices; print(cuda_devices()[0])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": "-1"}, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "0", r.stderr


def test_gpu_answer_matches_the_driver():
    from bmltrt.doctor import cuda_devices
    from bmltrt.runtime.backends import gpu_available

    n, _ = cuda_devices()
    if n == 0:
        assert gpu_available()[0] is False
    elif not has_gpu():
        pytest.skip("a CUDA device without CuPy")
    else:
        assert n >= 1


def test_unknown_precision_is_one_line(tmp_path, phantom_case):
    scan, _ = phantom_case
    r = CliRunner().invoke(app, ["detect", str(scan), "-o", str(tmp_path), "--precision", "int8"])
    assert r.exit_code == 2 and "unknown precision" in r.stderr


def test_shipped_folder_without_fp16_says_how_to_make_it(tmp_path, phantom_case):
    from bmltrt.runtime.models import ModelStore

    if "fp16" in ModelStore.open(REPO / "export").precisions("segmenter"):
        pytest.skip("the shipped models have FP16 graphs")
    scan, _ = phantom_case
    r = CliRunner().invoke(app, ["detect", str(scan), "-o", str(tmp_path), "--precision", "fp16"])
    assert r.exit_code == 2 and "bmltrt export --precision" in r.stderr
    assert np.all([not p.name.endswith("_bml.nii.gz") for p in tmp_path.iterdir()])
