"""One small interface for every inference engine.

A backend runs a named network ("segmenter", "inpainter_256", ...) on a batch and says
its device and precision. ONNX Runtime is the reference (CPU; CUDA provider when
present). TensorRT and torch backends plug in behind the same three members.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from bmltrt.errors import BmlError
from bmltrt.optional import optional_import
from bmltrt.runtime.models import ModelStore

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")
DEVICES = ("auto", "cpu", "gpu")


class Backend(Protocol):
    name: str
    device: str  # "cpu" or "gpu"
    precision: str  # "fp32" or "fp16"

    def run(self, model: str, batch): ...


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, store: ModelStore, device: str = "cpu", threads: int | None = None, precision: str = "fp32"):
        import onnxruntime as ort

        self._ort = ort
        self.precision = precision
        self.store = ModelStore(store.root, store.manifest, precision)
        self.device = device
        self.providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "gpu"
                          else ["CPUExecutionProvider"])
        self.threads = threads or int(os.environ.get("BMLTRT_THREADS", "0")) or None
        self._sessions: dict = {}

    def session(self, model: str):
        if model not in self._sessions:
            opts = self._ort.SessionOptions()
            opts.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.log_severity_level = 3
            if self.threads:
                opts.intra_op_num_threads = self.threads
            path = self.store.path(model)
            try:
                self._sessions[model] = self._ort.InferenceSession(str(path), opts, providers=self.providers)
            except Exception as exc:
                raise BmlError(f"ONNX Runtime cannot load {model} ({type(exc).__name__})", path,
                               "re-export or reinstall the models") from None
        return self._sessions[model]

    def run(self, model: str, batch):
        sess = self.session(model)
        host = batch.get() if hasattr(batch, "get") and not isinstance(batch, np.ndarray) else batch
        inp = sess.get_inputs()[0]
        dt = np.float16 if inp.type == "tensor(float16)" else np.float32
        out = sess.run(None, {inp.name: np.ascontiguousarray(host, dtype=dt)})[0].astype(np.float32, copy=False)
        if host is not batch:  # came from cupy: hand cupy back
            import cupy

            return cupy.asarray(out)
        return out


def gpu_available() -> tuple[bool, str]:
    """(True, "") only when a CUDA device exists *and* ONNX Runtime can use it. The device
    is asked of the CUDA driver (bmltrt.doctor.cuda_devices), never inferred from the
    providers an onnxruntime-gpu wheel lists: those appear without any GPU."""
    from bmltrt.doctor import cuda_devices

    n, why = cuda_devices()
    if n < 1:
        return False, why
    ort, _ = optional_import("onnxruntime")
    if ort is None or "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "ONNX Runtime has no CUDA provider (install onnxruntime-gpu)"
    return True, ""


def make_backend(backend: str, device: str, models_dir=None, precision: str = "fp32") -> tuple[Backend, list[str]]:
    """Backend for the asked name, device and precision; falls back to the CPU with a warning."""
    if backend not in BACKENDS:
        raise BmlError(f"unknown backend {backend!r}", hint=f"choose one of {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise BmlError(f"unknown device {device!r}", hint=f"choose one of {', '.join(DEVICES)}")
    if backend in ("tensorrt", "torch"):
        raise BmlError(f"the {backend} backend is not available in this version of bmltrt",
                       hint="use --backend onnxruntime (or auto)")
    warnings = []
    store = ModelStore.open(models_dir, precision)
    resolved = device
    if device in ("auto", "gpu"):
        ok, why = gpu_available()
        resolved = "gpu" if ok else "cpu"
        if device == "gpu" and not ok:
            warnings.append(f"--device gpu asked for, but {why}: running on the CPU")
    if precision == "fp16" and resolved == "cpu":
        warnings.append("--precision fp16 runs the FP16 graphs, but ONNX Runtime on a CPU does not compute in FP16 "
                        "(it casts to float32 around each op): slower, and no FP16 numerics check")
    return OnnxRuntimeBackend(store, resolved, precision=precision), warnings
