"""The backend interface with numpy (ONNX Runtime, torch on the CPU), the torch backend's
masks against ONNX Runtime's, and the detect loop's code path with numpy (the same code
the GPU runs with cupy, static shapes included)."""

import numpy as np
import pytest

from bmltrt.errors import BmlError
from bmltrt.io import load_scan
from bmltrt.pipeline import DetectConfig, Detector, StageClock
from bmltrt.runtime.backends import Backend, OnnxRuntimeBackend, make_backend

from conftest import needs_torch


def _batch(model, n=2, seed=0):
    rng = np.random.default_rng(seed)
    if model == "segmenter":
        return rng.random((n, 1, 16, 112, 112), np.float32)
    r = int(model.split("_")[1])
    x = rng.random((n, 1, r, r), np.float32) * 0.6
    m = np.zeros_like(x)
    m[..., r // 4: r // 2, r // 4: 3 * r // 4] = 1
    return np.concatenate([x * (1 - m), m], axis=1)


def test_onnxruntime_backend_interface_with_numpy():
    be, warns = make_backend("onnxruntime", "cpu")
    assert isinstance(be, Backend) and not warns
    assert be.xp is np and be.stream is None and be.device == "cpu" and be.precision == "fp32"
    assert be.store.root.exists()
    spec = be.spec("inpainter_128")
    x = _batch("inpainter_128", 3)
    y = be.run("inpainter_128", x)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == spec.output.with_batch(3)
    out = np.full((3, 1, 128, 128), np.nan, np.float32)
    assert be.run("inpainter_128", x, out=out) is out and np.array_equal(out, y)
    view = np.zeros((5, 1, 128, 128), np.float32)[1:4]  # a slice of a larger buffer, as the loop passes
    be.run("inpainter_128", x, out=view)
    assert np.array_equal(view, y)
    with pytest.raises(ValueError, match="expected"):
        be.run("inpainter_128", x[:, :1])
    with pytest.raises(ValueError, match="output buffer"):
        be.run("inpainter_128", x, out=np.zeros((2, 1, 128, 128), np.float32))
    with be:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        be.run("inpainter_128", x)


def test_make_backend_checks_its_arguments():
    for kw, msg in (({"backend": "tvm", "device": "cpu"}, "unknown backend"),
                    ({"backend": "auto", "device": "tpu"}, "unknown device"),
                    ({"backend": "auto", "device": "cpu", "precision": "int8"}, "unknown precision")):
        with pytest.raises(BmlError, match=msg):
            make_backend(**kw)
    be, _ = make_backend("auto", "cpu")
    assert isinstance(be, OnnxRuntimeBackend) and be.device == "cpu"


def test_detector_rejects_bad_batch_sizes():
    be, _ = make_backend("onnxruntime", "cpu")
    with pytest.raises(BmlError, match="at least 1"):
        Detector(be, DetectConfig(batch_size=0))
    det = Detector(be, DetectConfig(seg_batch_size=3))
    assert det.seg_batch == 3 and not det.static and Detector(be).seg_batch == 2


def test_stage_clock_on_the_cpu():
    c = StageClock(np)
    c.mark("a_s")
    c.mark("b_s")
    t = c.seconds()
    assert list(t) == ["a_s", "b_s"] and all(v >= 0 for v in t.values())


@pytest.fixture(scope="module")
def small_scan(phantom_case):
    """14 sagittal slices of the phantom around its largest lesion: the whole method, a
    third of the work."""
    scan = load_scan(phantom_case[0])
    per_slice = phantom_case[1].lesion.reshape(phantom_case[1].lesion.shape[0], -1).sum(1)
    s = int(np.clip(np.argmax(per_slice), 7, scan.data.shape[0] - 7))
    scan.data = np.ascontiguousarray(scan.data[s - 7:s + 7])
    return scan


def _dice(a, b):
    a, b = a.astype(bool), b.astype(bool)
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.fixture(scope="module")
def ort_small(small_scan):
    be, _ = make_backend("onnxruntime", "cpu")
    return Detector(be, DetectConfig(resolution=128)).detect(small_scan)


def test_static_shapes_loop_with_numpy_equals_the_cpu_loop(small_scan, ort_small):
    """The GPU's code path (every slice through the inpainter, no data-dependent shapes,
    the packed single download) run with numpy gives the CPU path's masks exactly."""
    be, _ = make_backend("onnxruntime", "cpu")
    det = Detector(be, DetectConfig(resolution=128, static_shapes=True, seg_batch_size=4, batch_size=5))
    assert det.static
    d = det.detect(small_scan)
    assert ort_small.lesion.sum() > 0 and ort_small.femur.sum() > 0
    assert np.array_equal(d.femur, ort_small.femur) and np.array_equal(d.lesion, ort_small.lesion)
    assert d.report["slices_inpainted"] == ort_small.report["slices_inpainted"] < small_scan.data.shape[0]
    assert np.array_equal(d.normalized, ort_small.normalized)
    assert {"upload_s", "femur_s", "inpaint_s", "postprocess_s", "download_s", "total_s"} <= set(d.timings)
    # run_loop and download, as the GPU test drives them
    vol = det.upload(small_scan)
    norm, femur, lesion, keep = det.run_loop(vol, small_scan.spacing)
    n_h, f_h, l_h, k_h = det.download(norm, femur, lesion, keep)
    assert f_h.dtype == np.uint8 and np.array_equal(l_h, d.lesion) and k_h.dtype == bool


@needs_torch
@pytest.mark.slow
def test_torch_backend_masks_equal_onnxruntime_on_the_cpu(small_scan, ort_small):
    pytest.importorskip("bmltrt.runtime.onnx_torch")
    be, warns = make_backend("torch", "cpu", precision="fp32")
    assert be.name == "torch" and be.xp is np and not warns
    x = _batch("inpainter_128", 2)
    ref, _ = make_backend("onnxruntime", "cpu")
    out = np.zeros((2, 1, 128, 128), np.float32)
    assert be.run("inpainter_128", x, out=out) is out
    assert np.abs(out - ref.run("inpainter_128", x)).max() < 1e-4
    d = Detector(be, DetectConfig(resolution=128)).detect(small_scan)
    assert d.report["backend"] == "torch"
    # stated in the README: masks identical, or Dice >= 0.99 (float sums in another order)
    assert np.array_equal(d.lesion, ort_small.lesion) or _dice(d.lesion, ort_small.lesion) >= 0.99
    assert np.array_equal(d.femur, ort_small.femur) or _dice(d.femur, ort_small.femur) >= 0.99
    be.close()


@needs_torch
def test_torch_backend_fp16_needs_fp16_graphs():
    pytest.importorskip("bmltrt.runtime.onnx_torch")
    be, _ = make_backend("torch", "cpu", precision="fp16")
    if "fp16" not in be.store.precisions("segmenter"):
        with pytest.raises(BmlError, match="fp16"):
            be.run("inpainter_128", _batch("inpainter_128", 1))
        return
    y = be.run("inpainter_128", _batch("inpainter_128", 2))
    assert y.dtype == np.float32 and np.isfinite(y).all()
