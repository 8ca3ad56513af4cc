"""One small interface for every inference engine.

A backend runs a named network ("segmenter", "inpainter_256", ...) on a batch and says
its device and precision. Its arrays are those of the detect loop (`xp`): numpy on the
CPU, cupy on the GPU, where it works on the loop's CUDA stream (`stream`) and may write
into a given output buffer, so a batch never leaves the device. It knows its models'
input/output specs from the manifest, and closes cleanly (also as a context manager).

- ONNX Runtime (`onnxruntime`): the reference; CPU, or CUDA with I/O binding so that
  cupy inputs and outputs stay on the device.
- torch (`bmltrt.runtime.torch_backend`): the ONNX graphs run in torch on the CPU or
  CUDA, fp32 or FP16; arrays pass between torch and cupy by DLPack.
- TensorRT (`bmltrt.runtime.tensorrt_backend`): FP16/fp32 engines from
  `bmltrt build-engines`, cupy buffers, `execute_async_v3` on the loop's stream.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

import numpy as np

from bmltrt.errors import BmlError
from bmltrt.optional import cupy_with_gpu, optional_import
from bmltrt.runtime.models import ModelStore
from bmltrt.runtime.specs import ModelSpec, model_path, model_spec

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")
DEVICES = ("auto", "cpu", "gpu")
PRECISIONS = ("auto", "fp32", "fp16")


@runtime_checkable
class Backend(Protocol):
    name: str
    device: str  # "cpu" or "gpu"
    precision: str  # "fp32" or "fp16"
    store: ModelStore  # where the models and their manifest are
    xp: ModuleType  # the loop's array module: numpy, or cupy on the GPU
    stream: Any  # the cupy.cuda.Stream the backend runs on (None on the CPU)

    def spec(self, model: str) -> ModelSpec: ...

    def run(self, model: str, batch, out=None):
        """Outputs of `model` for `batch` (an array of `xp`), float32, as an array of the
        batch's module; written into `out` (and `out` returned) when given."""

    def close(self) -> None: ...

    def __enter__(self): ...

    def __exit__(self, *exc) -> None: ...


def is_cupy(a) -> bool:
    return type(a).__module__.startswith("cupy")


class BackendBase:
    """Shared plumbing: specs, argument checks, output delivery, close()."""

    name = "base"

    def __init__(self, store: ModelStore, device: str = "cpu", precision: str = "fp32", stream=None):
        if getattr(store, "precision", precision) != precision:  # entry()/path() give this precision's graph
            store = dataclasses.replace(store, precision=precision)
        self.store = store
        self.device = device
        self.precision = precision
        self.xp = np
        self.stream = stream
        self._specs: dict[str, ModelSpec] = {}
        self._closed = False

    def spec(self, model: str) -> ModelSpec:
        if model not in self._specs:
            self._specs[model] = model_spec(self.store, model, self.precision)
        return self._specs[model]

    def prepare(self, models) -> None:
        """Load the named models now (errors surface before the first scan)."""

    def run(self, model: str, batch, out=None):
        if self._closed:
            raise RuntimeError(f"the {self.name} backend is closed")
        spec = self.spec(model)
        n = spec.check_batch(batch)
        if out is not None and tuple(out.shape) != spec.output.with_batch(n):
            raise ValueError(f"{model}: output buffer has shape {tuple(out.shape)}, "
                             f"expected {spec.output.with_batch(n)}")
        return self._run(model, spec, batch, out)

    def _run(self, model: str, spec: ModelSpec, batch, out):
        raise NotImplementedError

    @staticmethod
    def _deliver(result, out):
        """`result` as float32 (or copied into `out`)."""
        if out is None:
            return result.astype(np.float32, copy=False) if result.dtype != np.float32 else result
        out[...] = result
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()

    def _release(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.device} {self.precision}>"


MAX_THREADS = 1024


def threads_from_env() -> int | None:
    """$BMLTRT_THREADS as a thread count; None where it is unset, empty or 0 (every usable
    core). Anything else that is not a whole number 1-MAX_THREADS is a user error: a typo
    there would otherwise be a traceback, or a count ONNX Runtime takes silently."""
    raw = os.environ.get("BMLTRT_THREADS", "").strip()
    if raw in ("", "0"):
        return None
    n = int(raw) if raw.isascii() and raw.isdigit() else 0  # not int(): it takes "١٢" and "1_0"
    if not 1 <= n <= MAX_THREADS:
        raise BmlError(f"BMLTRT_THREADS={raw!r} is not a thread count (1-{MAX_THREADS})",
                       hint="unset it (every usable core), or set a whole number such as 4")
    return n


def new_stream(cp):
    """A non-blocking CUDA stream for the loop (never the legacy default stream)."""
    return cp.cuda.Stream(non_blocking=True)


class OnnxRuntimeBackend(BackendBase):
    name = "onnxruntime"

    def __init__(self, store: ModelStore, device: str = "cpu", threads: int | None = None,
                 precision: str = "fp32", stream=None):
        import onnxruntime as ort

        super().__init__(store, device, precision)
        self._ort = ort
        self.threads = threads or threads_from_env()
        self._sessions: dict = {}
        if device == "gpu":
            cp, _ = cupy_with_gpu()
            cuda_opts: dict = {}
            if cp is not None:  # the loop runs in cupy; ORT runs on the loop's stream
                self.xp = cp
                self.stream = stream or new_stream(cp)
                cuda_opts = {"device_id": int(cp.cuda.Device().id), "user_compute_stream": str(self.stream.ptr)}
            self.providers = [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]
        else:
            self.providers = ["CPUExecutionProvider"]

    def session(self, model: str):
        if model not in self._sessions:
            opts = self._ort.SessionOptions()
            opts.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.log_severity_level = 3
            if self.threads:
                opts.intra_op_num_threads = self.threads
            path = model_path(self.store, model, self.precision)
            try:
                self._sessions[model] = self._ort.InferenceSession(str(path), opts, providers=self.providers)
            except Exception as exc:
                raise BmlError(f"ONNX Runtime cannot load {model} ({type(exc).__name__})", path,
                               "re-export or reinstall the models") from None
        return self._sessions[model]

    def prepare(self, models) -> None:
        for m in models:
            self.spec(m)  # the graph's shapes against the manifest's, before any scan
            self.session(m)

    def _run(self, model, spec, batch, out):
        sess = self.session(model)
        if self.xp is np or not is_cupy(batch):
            host = batch.get() if is_cupy(batch) else batch
            res = sess.run([spec.output.name],
                           {spec.input.name: np.ascontiguousarray(host, dtype=spec.input.np_dtype)})[0]
            if is_cupy(batch):  # came from cupy: hand cupy back
                import cupy

                res = cupy.asarray(res)
            return self._deliver(res, out)
        # CUDA with I/O binding: ORT reads and writes the cupy buffers in place.
        cp = self.xp
        n = batch.shape[0]
        x = cp.ascontiguousarray(batch, dtype=spec.input.np_dtype)
        y_shape = spec.output.with_batch(n)
        direct = out is not None and out.dtype == spec.output.np_dtype and out.flags.c_contiguous
        y = out if direct else cp.empty(y_shape, spec.output.np_dtype)
        dev = int(cp.cuda.Device().id)
        io = sess.io_binding()
        io.bind_input(spec.input.name, "cuda", dev, spec.input.np_dtype.type, x.shape, x.data.ptr)
        io.bind_output(spec.output.name, "cuda", dev, spec.output.np_dtype.type, y_shape, y.data.ptr)
        sess.run_with_iobinding(io)
        return y if direct else self._deliver(y, out)

    def _release(self) -> None:
        self._sessions.clear()


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


def torch_cuda() -> tuple[bool, str]:
    """Can the torch backend run on CUDA here?"""
    from bmltrt.doctor import cuda_devices

    n, why = cuda_devices()
    if n < 1:
        return False, why
    torch, why = optional_import("torch")
    if torch is None:
        return False, f"torch is not installed ({why})"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device (a CPU build of torch, or no GPU)"
    return True, ""


def make_backend(backend: str, device: str, models_dir=None, precision: str = "auto", engines_dir=None,
                 cuda_graphs: bool = False, torch_compile: bool = False) -> tuple[Backend, list[str]]:
    """Backend for the asked name, device and precision; falls back to the CPU with a warning.

    `auto` picks, on a GPU: TensorRT when its engines for these models are built,
    then torch on CUDA, then ONNX Runtime's CUDA provider; else ONNX Runtime on the CPU.
    Precision `auto` is fp16 for TensorRT (what `build-engines` builds by default) and
    fp32 for the others.
    """
    if backend not in BACKENDS:
        raise BmlError(f"unknown backend {backend!r}", hint=f"choose one of {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise BmlError(f"unknown device {device!r}", hint=f"choose one of {', '.join(DEVICES)}")
    if precision not in PRECISIONS:
        raise BmlError(f"unknown precision {precision!r}", hint=f"choose one of {', '.join(PRECISIONS)}")
    if engines_dir is not None and Path(engines_dir).exists() and not Path(engines_dir).is_dir():
        raise BmlError("the engines path is a file, not a folder", engines_dir,
                       "pass the folder `bmltrt build-engines` wrote (--engines)")
    warnings: list[str] = []
    store = ModelStore.open(models_dir)
    if backend == "auto":
        backend = _auto_backend(device, precision, store, engines_dir)
    if backend == "tensorrt":
        if device == "cpu":
            raise BmlError("the tensorrt backend runs on a GPU only", hint="use --device gpu or auto, or "
                           "--backend onnxruntime/torch on the CPU")
        from bmltrt.runtime.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(store, "fp16" if precision == "auto" else precision, engines_dir,
                               cuda_graphs=cuda_graphs), warnings
    prec = "fp32" if precision == "auto" else precision
    if backend == "torch":
        from bmltrt.runtime.torch_backend import TorchBackend

        resolved = "cpu"
        if device in ("auto", "gpu"):
            ok, why = torch_cuda()
            resolved = "gpu" if ok else "cpu"
            if device == "gpu" and not ok:
                warnings.append(f"--device gpu asked for, but {why}: running on the CPU")
        return TorchBackend(store, resolved, prec, cuda_graphs=cuda_graphs, compile=torch_compile), warnings
    resolved = device
    if device in ("auto", "gpu"):
        ok, why = gpu_available()
        resolved = "gpu" if ok else "cpu"
        if device == "gpu" and not ok:
            warnings.append(f"--device gpu asked for, but {why}: running on the CPU")
    if prec == "fp16" and resolved == "cpu":
        warnings.append("--precision fp16 runs the FP16 graphs, but ONNX Runtime on a CPU does not compute in FP16 "
                        "(it casts to float32 around each op): slower, and no FP16 numerics check")
    return OnnxRuntimeBackend(store, resolved, precision=prec), warnings


def _auto_backend(device: str, precision: str, store: ModelStore, engines_dir) -> str:
    from bmltrt.doctor import cuda_devices
    from bmltrt.runtime import engines

    if device == "cpu" or cuda_devices()[0] < 1:  # asks the driver: cheap, and no wheel fools it
        return "onnxruntime"

    if engines.tensorrt_ready(store, engines_dir, "fp16" if precision == "auto" else precision):
        return "tensorrt"
    ok, _ = torch_cuda()
    if ok and optional_import("bmltrt.runtime.onnx_torch")[0] is not None:
        return "torch"
    return "onnxruntime"
