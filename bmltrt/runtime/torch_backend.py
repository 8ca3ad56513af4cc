"""torch backend (`--backend torch`): the shipped ONNX graphs, run in torch, CPU or CUDA.

Why build the modules from the ONNX graphs rather than ship torch weights: the graphs are
what TensorRT and ONNX Runtime run, with their sha256 in the manifest, so the three
backends run the very same weights and the very same float32 islands, and there is
nothing else to ship or keep in step. `OnnxGraphModule` (bmltrt.runtime.onnx_torch)
runs a graph op by op, every tensor in the dtype the graph gives it.

Precision: fp32 runs the float32 graph; fp16 runs the FP16 graph of
`bmltrt export --precision fp16` (FP16 weights and activations, float32 I/O, float32
islands where FP16 is unsafe: the DFT matrix products, the norm reductions). Not
autocast and not `.half()` on the float32 graph: the islands are decided once, in the
export, and torch then computes what a strongly typed TensorRT engine computes.

On CUDA the backend runs on the detect loop's cupy stream (a torch ExternalStream on the
same handle) and arrays cross between cupy and torch by DLPack, without copies or host
round trips. Two options, off by default because nobody has measured them on a GPU here:
CUDA-graph capture per batch shape (`cuda_graphs`) and `torch.compile` (`compile`).
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np

from bmltrt.errors import BmlError
from bmltrt.optional import cupy_with_gpu
from bmltrt.runtime.backends import BackendBase, is_cupy, new_stream
from bmltrt.runtime.specs import model_path


# Inputs that OnnxGraphModule's ops read on the host (shapes, slice bounds, pads, axes,
# clip limits): op -> input positions. On CUDA such a constant on the device costs a
# device synchronisation per op and per forward (`.tolist()`, `.item()`).
HOST_PARAMS = {"Reshape": (1,), "Slice": (1, 2, 3, 4), "Pad": (1, 2, 3), "Clip": (1, 2), "Unsqueeze": (1,),
               "Squeeze": (1,), "Split": (1,)}


def keep_host_params_on_cpu(mod) -> tuple[int, int]:
    """Move the graph constants that ops only read on the host back to the CPU.

    Returns (moved, left): constants moved, and host-read inputs that still come from the
    device (computed in the graph, e.g. from a Shape op: each is a synchronisation per
    forward). Works on OnnxGraphModule's node list; a module without one is left alone.
    """
    nodes, buffer_of = getattr(mod, "_nodes", None), getattr(mod, "_buffer_of", None)
    if nodes is None or buffer_of is None:
        return 0, 0
    uses: dict[str, list[bool]] = {}
    for op, _name, ins, _outs, _attrs in nodes:
        for i, t in enumerate(ins):
            if t:
                uses.setdefault(t, []).append(i in HOST_PARAMS.get(op, ()))
    moved = 0
    for tname, key in buffer_of.items():
        u = uses.get(tname)
        if u and all(u):
            buf = getattr(mod, key)
            if buf.device.type != "cpu":
                mod._buffers[key] = buf.cpu()
                moved += 1
    left = sum(1 for op, _n, ins, _o, _a in nodes for i, t in enumerate(ins)
               if t and i in HOST_PARAMS.get(op, ()) and t not in buffer_of)
    return moved, left


class TorchBackend(BackendBase):
    name = "torch"

    def __init__(self, store, device: str = "cpu", precision: str = "fp32", stream=None,
                 cuda_graphs: bool = False, compile: bool = False, threads: int | None = None):
        try:
            import torch
        except ImportError:
            raise BmlError("the torch backend needs torch", hint="pip install 'bmltrt[train]' "
                           "(or use --backend onnxruntime)") from None
        try:
            from bmltrt.runtime.onnx_torch import OnnxGraphModule
        except ImportError as exc:
            raise BmlError(f"the torch backend needs bmltrt.runtime.onnx_torch ({exc})",
                           hint="update bmltrt, or use --backend onnxruntime") from None
        super().__init__(store, device, precision)
        self._torch = torch
        self._module_cls = OnnxGraphModule
        self.cuda_graphs = bool(cuda_graphs) and device == "gpu"
        self.compile = bool(compile)
        self._modules: dict = {}
        self._graphs: dict = {}
        self.host_reads: dict[str, int] = {}  # per model: host reads left per forward on CUDA
        if threads:
            torch.set_num_threads(int(threads))
        if device == "gpu":
            if not torch.cuda.is_available():
                raise BmlError("the torch backend on the GPU needs a CUDA build of torch and a GPU",
                               hint="pip install torch (CUDA build), or use --device cpu")
            self.tdev = torch.device("cuda", torch.cuda.current_device())
            cp, _ = cupy_with_gpu()
            if cp is not None:  # the loop runs in cupy; torch works on the loop's stream
                self.xp = cp
                self.stream = stream or new_stream(cp)
                self._tstream = torch.cuda.ExternalStream(self.stream.ptr, device=self.tdev)
            else:  # no cupy: numpy loop, each batch copied to and from the GPU
                self._tstream = torch.cuda.Stream(device=self.tdev)
        else:
            self.tdev = torch.device("cpu")
            self._tstream = None

    def module(self, model: str):
        if model not in self._modules:
            path = model_path(self.store, model, self.precision)
            try:
                mod = self._module_cls(path, device=str(self.tdev))
            except BmlError:
                raise
            except Exception as exc:
                raise BmlError(f"torch cannot run the {model} graph ({type(exc).__name__}: {exc})", path,
                               "use --backend onnxruntime") from None
            mod = mod.eval()
            if self.tdev.type == "cuda":
                self.host_reads[model] = keep_host_params_on_cpu(mod)[1]
            if self.compile:
                mod = self._torch.compile(mod)
            self._modules[model] = mod
        return self._modules[model]

    def prepare(self, models) -> None:
        for m in models:
            self.spec(m)  # the graph's shapes against the manifest's, before any scan
            self.module(m)

    def _stream_ctx(self):
        return self._torch.cuda.stream(self._tstream) if self._tstream is not None else contextlib.nullcontext()

    def _to_torch(self, a, dtype):
        torch = self._torch
        if is_cupy(a):
            t = torch.from_dlpack(a)  # zero-copy, ordered on the current (loop's) stream
        else:
            t = torch.from_numpy(np.ascontiguousarray(a))
            if self.tdev.type == "cuda":
                t = t.to(self.tdev, non_blocking=False)
        return t.to(dtype) if t.dtype != dtype else t

    def _run(self, model, spec, batch, out):
        torch = self._torch
        in_dtype = getattr(torch, spec.input.dtype)
        with torch.inference_mode(), self._stream_ctx():
            x = self._to_torch(batch, in_dtype).contiguous()
            y = self._forward(model, x)
            if isinstance(y, (tuple, list)):
                y = y[0]
            y = y.float() if y.dtype != torch.float32 else y
            if out is not None and (is_cupy(out) or self.tdev.type == "cpu"):
                target = torch.from_dlpack(out) if is_cupy(out) else torch.from_numpy(out)
                target.copy_(y.reshape(target.shape))
                return out
            if is_cupy(batch):
                import cupy

                res = cupy.from_dlpack(y.contiguous())
            else:
                res = y.detach().cpu().numpy()
            return self._deliver(res, out)

    def _forward(self, model, x):
        mod = self.module(model)
        if not self.cuda_graphs:
            return mod(x)
        try:
            return self._replay(model, mod, x)
        except Exception as exc:
            warnings.warn(f"CUDA-graph capture failed for {model} ({type(exc).__name__}: {exc}); "
                          "running without CUDA graphs")
            self.cuda_graphs = False
            return mod(x)

    def _replay(self, model, mod, x):
        torch = self._torch
        key = (model, tuple(x.shape), x.dtype)
        if key not in self._graphs:
            static_in = x.clone()
            for _ in range(2):  # warm-up on the capture stream (allocator, cudnn plans)
                mod(static_in)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self._tstream):
                static_out = mod(static_in)
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        out = static_out[0] if isinstance(static_out, (tuple, list)) else static_out
        return out.clone()  # the next replay overwrites static_out

    def _release(self) -> None:
        self._graphs.clear()
        self._modules.clear()
