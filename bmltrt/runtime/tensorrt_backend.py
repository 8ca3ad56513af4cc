"""TensorRT backend: plans from `bmltrt build-engines`, run on the detect loop's stream.

Each engine is deserialised once (only a plan whose sidecar matches this GPU, TensorRT
version and ONNX file; anything else is refused with one line, see `engines`). All
device memory comes from CuPy's memory pool: the I/O buffers are the loop's cupy arrays
(or the given output buffer), and each context's activation memory is a cupy buffer
(`ExecutionContextAllocationStrategy.USER_MANAGED` + `set_device_memory`). A batch runs
as `set_input_shape`, `set_tensor_address`, `execute_async_v3(stream)`; nothing waits
for the device. Optional CUDA-graph capture per batch shape (`cuda_graphs=True`, off by
default: not measured yet). No pycuda.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bmltrt.errors import BmlError
from bmltrt.io.checksum import file_sha256
from bmltrt.optional import cupy_with_gpu
from bmltrt.runtime import engines
from bmltrt.runtime.backends import BackendBase, is_cupy, new_stream
from bmltrt.runtime.specs import model_path


@dataclass
class _Engine:
    engine: object
    context: object
    memory: object  # cupy buffer holding the context's activations
    input: str
    output: str
    in_dtype: np.dtype
    out_dtype: np.dtype
    max_batch: int
    plan: Path
    graphs: dict = field(default_factory=dict)  # batch shape -> (static in, static out, cupy Graph)


class TensorRTBackend(BackendBase):
    name = "tensorrt"

    def __init__(self, store, precision: str = "fp16", engines_dir=None, stream=None, cuda_graphs: bool = False):
        self._trt = engines.require_tensorrt()
        cp, why = cupy_with_gpu()
        if cp is None:
            raise BmlError(f"the tensorrt backend needs CuPy and a CUDA GPU: {why}", hint=engines.INSTALL_CUPY)
        super().__init__(store, "gpu", precision)
        self.xp = cp
        self.stream = stream or new_stream(cp)
        self.engines_dir = Path(engines_dir) if engines_dir else engines.default_engines_dir()
        self.gpu = engines.current_gpu()
        self.cuda_graphs = cuda_graphs
        trt = self._trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engines: dict[str, _Engine] = {}

    # -- loading ------------------------------------------------------------------
    def _engine(self, model: str) -> _Engine:
        if model in self._engines:
            return self._engines[model]
        trt, cp = self._trt, self.xp
        onnx = model_path(self.store, model, self.precision)
        plan, meta = engines.find_plan(self.engines_dir, model, self.precision, file_sha256(onnx),
                                       trt.__version__, self.gpu)
        engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise BmlError(f"TensorRT could not deserialise the {model} engine", plan,
                           "rebuild it with `bmltrt build-engines --force`")
        context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        size = int(engine.device_memory_size_v2)
        memory = cp.empty(max(size, 1), cp.uint8)  # from CuPy's pool, 256-byte aligned
        context.set_device_memory(memory.data.ptr, size)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        ins = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if n not in ins]
        spec = self.spec(model)
        if ins != [spec.input.name] or outs != [spec.output.name]:
            raise BmlError(f"the {model} engine has inputs {ins} and outputs {outs}, the manifest "
                           f"{spec.input.name} -> {spec.output.name}", plan, "rebuild with `bmltrt build-engines`")
        max_batch = int(engine.get_tensor_profile_shape(ins[0], 0)[2][0])
        e = _Engine(engine, context, memory, ins[0], outs[0], np.dtype(trt.nptype(engine.get_tensor_dtype(ins[0]))),
                    np.dtype(trt.nptype(engine.get_tensor_dtype(outs[0]))), max_batch, plan)
        self._engines[model] = e
        return e

    def prepare(self, models) -> None:
        for m in models:
            self.spec(m)  # the graph's shapes against the manifest's, before any scan
            self._engine(m)

    # -- running ------------------------------------------------------------------
    def _run(self, model, spec, batch, out):
        cp = self.xp
        e = self._engine(model)
        with self.stream:
            x = cp.ascontiguousarray(batch if is_cupy(batch) else cp.asarray(batch), dtype=e.in_dtype)
            n = x.shape[0]
            shape = spec.output.with_batch(n)
            direct = out is not None and is_cupy(out) and out.dtype == e.out_dtype and out.flags.c_contiguous
            y = out if direct else cp.empty(shape, e.out_dtype)
            for i in range(0, n, e.max_batch):  # a batch larger than the profile runs in pieces
                self._execute(e, x[i:i + e.max_batch], y[i:i + e.max_batch])
            if direct:
                return y
            y = y.astype(cp.float32, copy=False)
            if out is not None:
                out[...] = y if is_cupy(out) else y.get()
                return out
            return y if is_cupy(batch) else y.get()

    def _execute(self, e: _Engine, x, y):
        if self.cuda_graphs:
            try:
                self._replay(e, x, y)
                return
            except Exception as exc:  # capture can fail (driver, TensorRT version): run plainly
                warnings.warn(f"CUDA-graph capture failed for {e.plan.name} ({type(exc).__name__}: {exc}); "
                              "running without CUDA graphs")
                self.cuda_graphs = False
        ctx = e.context
        ctx.set_input_shape(e.input, tuple(x.shape))
        ctx.set_tensor_address(e.input, x.data.ptr)
        ctx.set_tensor_address(e.output, y.data.ptr)
        if not ctx.execute_async_v3(self.stream.ptr):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for {e.plan.name}")

    def _replay(self, e: _Engine, x, y):
        cp = self.xp
        key = tuple(x.shape)
        if key not in e.graphs:
            ctx = e.context
            s_in = cp.empty(key, e.in_dtype)
            s_out = cp.empty(tuple(y.shape), e.out_dtype)
            ctx.set_input_shape(e.input, key)
            ctx.set_tensor_address(e.input, s_in.data.ptr)
            ctx.set_tensor_address(e.output, s_out.data.ptr)
            # TensorRT: run once after a shape change, before capturing
            if not ctx.execute_async_v3(self.stream.ptr):
                raise RuntimeError("execute_async_v3 failed before capture")
            self.stream.begin_capture()
            try:
                ok = ctx.execute_async_v3(self.stream.ptr)
            finally:
                graph = self.stream.end_capture()
            if not ok:
                raise RuntimeError("execute_async_v3 failed during capture")
            e.graphs[key] = (s_in, s_out, graph)
        s_in, s_out, graph = e.graphs[key]
        s_in[...] = x
        graph.launch(self.stream)
        y[...] = s_out

    def _release(self) -> None:
        for e in self._engines.values():
            e.graphs.clear()
            e.context = None
            e.engine = None
        self._engines.clear()
        self._runtime = None
