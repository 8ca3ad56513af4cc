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
from bmltrt.optional import cupy_with_gpu, optional_import
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
    precision = "fp32"

    def __init__(self, store: ModelStore, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        self._ort = ort
        self.store = store
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
        out = sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(host, dtype=np.float32)})[0]
        if host is not batch:  # came from cupy: hand cupy back
            import cupy

            return cupy.asarray(out)
        return out


def gpu_available() -> tuple[bool, str]:
    ort, _ = optional_import("onnxruntime")
    if ort is not None and "CUDAExecutionProvider" in ort.get_available_providers():
        return True, ""
    cp, why = cupy_with_gpu()
    if cp is None:
        return False, why or "no CUDA device"
    return False, "ONNX Runtime has no CUDA provider (install onnxruntime-gpu)"


def make_backend(backend: str, device: str, models_dir=None) -> tuple[Backend, list[str]]:
    """Backend for the asked name and device; falls back to the CPU with a warning."""
    if backend not in BACKENDS:
        raise BmlError(f"unknown backend {backend!r}", hint=f"choose one of {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise BmlError(f"unknown device {device!r}", hint=f"choose one of {', '.join(DEVICES)}")
    if backend in ("tensorrt", "torch"):
        raise BmlError(f"the {backend} backend is not available in this version of bmltrt",
                       hint="use --backend onnxruntime (or auto)")
    warnings = []
    store = ModelStore.open(models_dir)
    resolved = device
    if device in ("auto", "gpu"):
        ok, why = gpu_available()
        resolved = "gpu" if ok else "cpu"
        if device == "gpu" and not ok:
            warnings.append(f"--device gpu asked for, but {why}: running on the CPU")
    return OnnxRuntimeBackend(store, resolved), warnings
