"""GPU tests: skipped without CuPy and a CUDA device (scripts/gpu_check.sh runs them).

- the whole detect loop, after the upload, under cupyx.allow_synchronize(False);
- CPU/GPU parity on phantom scans: lesion Dice >= 0.98, femur Dice >= 0.99;
- the backends with cupy arrays, output buffers and the loop's stream.

Each GPU backend that can run here takes part: torch on CUDA (fp32, and fp16 when the
models folder has FP16 graphs), TensorRT (when its engines are built for this GPU),
ONNX Runtime's CUDA provider (when installed).
"""

import warnings

import numpy as np
import pytest

from bmltrt.io import load_scan
from bmltrt.pipeline import DetectConfig, Detector
from bmltrt.runtime.backends import make_backend

from conftest import needs_gpu

pytestmark = [needs_gpu, pytest.mark.gpu]

LESION_DICE, FEMUR_DICE = 0.98, 0.99


def _gpu_backends():
    """(id, backend name, precision) of each GPU backend that can run here."""
    from bmltrt.optional import optional_import
    from bmltrt.runtime import engines
    from bmltrt.runtime.backends import gpu_available, torch_cuda
    from bmltrt.runtime.models import ModelStore

    out = []
    if torch_cuda()[0] and optional_import("bmltrt.runtime.onnx_torch")[0] is not None:
        out.append(("torch-fp32", "torch", "fp32"))
        if "fp16" in ModelStore.open().precisions("segmenter"):
            out.append(("torch-fp16", "torch", "fp16"))
    for prec in ("fp16", "fp32"):
        if engines.tensorrt_ready(ModelStore.open(), None, prec):
            out.append((f"tensorrt-{prec}", "tensorrt", prec))
    if gpu_available()[0]:
        out.append(("onnxruntime-cuda", "onnxruntime", "fp32"))
    return out


def _params():
    try:
        found = _gpu_backends()
    except Exception:  # no GPU: the module is skipped anyway
        found = []
    return [pytest.param(b, p, id=i) for i, b, p in found] or [pytest.param(None, None, id="none")]


def _detector(backend, precision, **cfg):
    if backend is None:
        pytest.skip("no GPU backend here (torch with CUDA, TensorRT engines, or onnxruntime-gpu)")
    be, warns = make_backend(backend, "gpu", precision=precision)
    assert be.device == "gpu" and not warns
    return Detector(be, DetectConfig(**cfg))


def _dice(a, b):
    a, b = a.astype(bool), b.astype(bool)
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.fixture(scope="module")
def cpu_reference(phantom_case, healthy_case):
    be, _ = make_backend("onnxruntime", "cpu")
    det = Detector(be)
    return {name: det.detect(load_scan(case[0])) for name, case in (("knee", phantom_case), ("healthy", healthy_case))}


@pytest.mark.parametrize("backend,precision", _params())
def test_whole_loop_never_synchronises_after_the_upload(backend, precision, phantom_case):
    import cupy as cp
    import cupyx

    det = _detector(backend, precision)
    if backend == "onnxruntime":
        pytest.skip("ONNX Runtime's CUDA provider synchronises inside each run")
    assert det.static and det.xp is cp
    scan = load_scan(phantom_case[0])
    ref = det.detect(scan)  # warm-up: engines, cuDNN plans, memory pool, kernels compiled
    with det._on_stream():
        vol = det.upload(scan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # allow_synchronize is deprecated (it still works)
            with cupyx.allow_synchronize(False):
                norm, femur, lesion, keep = det.run_loop(vol, scan.spacing)
        _, femur_h, lesion_h, _ = det.download(norm, femur, lesion, keep)
    assert np.array_equal(femur_h, ref.femur) and np.array_equal(lesion_h, ref.lesion)


def test_allow_synchronize_catches_a_host_read():
    """The no-sync test would see a host read: a guard that the guard works."""
    import cupy as cp
    import cupyx

    a = cp.arange(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cupyx.allow_synchronize(False), pytest.raises(cupyx.DeviceSynchronized):
            int(a.sum())


@pytest.mark.parametrize("backend,precision", _params())
def test_cpu_gpu_parity_on_phantoms(backend, precision, phantom_case, healthy_case, cpu_reference):
    det = _detector(backend, precision)
    for name, case in (("knee", phantom_case), ("healthy", healthy_case)):
        ref = cpu_reference[name]
        d = det.detect(load_scan(case[0]))
        assert d.report["device"] == "gpu"
        assert _dice(d.femur, ref.femur) >= FEMUR_DICE, (name, _dice(d.femur, ref.femur))
        if ref.lesion.any() or d.lesion.any():
            assert _dice(d.lesion, ref.lesion) >= LESION_DICE, (name, _dice(d.lesion, ref.lesion))
        assert d.report["slices_inpainted"] == ref.report["slices_inpainted"]


@pytest.mark.parametrize("backend,precision", _params())
def test_backend_with_cupy_arrays_out_buffer_and_stream(backend, precision):
    import cupy as cp

    det = _detector(backend, precision)
    be = det.backend
    rng = np.random.default_rng(0)
    x = rng.random((3, 2, 128, 128), np.float32)
    x[:, 1] = (x[:, 1] > 0.7)
    ref, _ = make_backend("onnxruntime", "cpu")
    want = ref.run("inpainter_128", x)
    with be.stream:
        y = be.run("inpainter_128", cp.asarray(x))
        assert isinstance(y, cp.ndarray) and y.dtype == cp.float32
        buf = cp.full((5, 1, 128, 128), cp.nan, cp.float32)
        assert be.run("inpainter_128", cp.asarray(x), out=buf[1:4]) is not None
    tol = 2e-2 if precision == "fp16" else 2e-3
    assert np.abs(cp.asnumpy(y) - want).max() < tol
    assert np.abs(cp.asnumpy(buf[1:4]) - want).max() < tol and cp.isnan(buf[0]).all()
    be.close()


def test_pipeline_primitives_on_cupy_equal_numpy(phantom_case):
    """normalisation, resampling, the sliding window and the femur clean-up with cupy."""
    import cupy as cp

    from bmltrt.pipeline import largest_component_filled
    from bmltrt.runtime.preprocess import normalize_intensity, slices_to_square, zoom_to

    scan = load_scan(phantom_case[0])
    v = scan.data
    g = cp.asarray(v)
    n_np, n_cp = normalize_intensity(v), normalize_intensity(g)
    assert np.abs(cp.asnumpy(n_cp) - n_np).max() < 1e-5
    assert np.abs(cp.asnumpy(zoom_to(n_cp, (36, 100, 100))) - zoom_to(n_np, (36, 100, 100))).max() < 1e-4
    assert np.abs(cp.asnumpy(slices_to_square(n_cp[:4], 128)) - slices_to_square(n_np[:4], 128)).max() < 1e-4
    m = n_np > 0.6
    assert np.array_equal(cp.asnumpy(largest_component_filled(cp.asarray(m))), largest_component_filled(m))
