"""What goes in and out of each network: names, dtypes and shapes, from the manifest.

A spec has one dynamic dimension, the batch (the first); everything else is fixed per
graph (the segmenter's patch, the inpainter's resolution). Backends use the specs to
check batches and allocate outputs; `bmltrt build-engines` derives the TensorRT
optimisation profiles from them.

Where the manifest lists the tensors (``"io": {"inputs", "outputs"}``, each name, dtype and
shape with a string or -1 for the batch: manifest format 2), that is used. Older manifests lack them, and the graphs
they describe declare some output shapes wrongly (the inpainter's output reads
``(batch, 1, batch, ...)``), so the spec is then made from the manifest's kind and config
(patch, resolution) with the tensor names read from the ONNX graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bmltrt.errors import BmlError

DTYPES = {"float32": np.float32, "float16": np.float16, "fp32": np.float32, "fp16": np.float16,
          "float": np.float32, "half": np.float16}
_ONNX_ELEM = {1: "float32", 10: "float16"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "float32" or "float16"
    shape: tuple  # -1 for the batch dimension

    @property
    def np_dtype(self):
        return np.dtype(DTYPES[self.dtype])

    def with_batch(self, n: int) -> tuple[int, ...]:
        return tuple(int(n) if d == -1 else int(d) for d in self.shape)

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelSpec:
    model: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input(self) -> TensorSpec:
        return self.inputs[0]

    @property
    def output(self) -> TensorSpec:
        return self.outputs[0]

    def check_batch(self, batch) -> int:
        """Batch size of `batch`, after checking its shape against the input spec."""
        spec = self.input
        shape = tuple(batch.shape)
        if len(shape) != len(spec.shape) or any(d != -1 and d != s for d, s in zip(spec.shape, shape)) \
                or shape[0] < 1:
            raise ValueError(f"{self.model}: input {spec.name} has shape {shape}, expected {spec.shape} "
                             "(-1: any batch)")
        return shape[0]

    def to_dict(self) -> dict:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}


def _tensor_from_manifest(d: dict) -> TensorSpec:
    shape = tuple(-1 if (not isinstance(s, int) or s < 0) else int(s) for s in d["shape"])
    dtype = str(d.get("dtype", "float32")).lower()
    if dtype not in DTYPES:
        raise BmlError(f"manifest tensor {d.get('name')!r} has an unknown dtype {dtype!r}")
    return TensorSpec(str(d["name"]), "float16" if DTYPES[dtype] is np.float16 else "float32", shape)


def graph_io(path: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """[(name, dtype)] of the graph's inputs and outputs (initializers excluded)."""
    ins, outs = graph_tensors(path)
    return [r[:2] for r in ins], [r[:2] for r in outs]


def graph_tensors(path: Path) -> tuple[list[tuple[str, str, tuple]], list[tuple[str, str, tuple]]]:
    """[(name, dtype, shape)] of the graph's inputs and outputs (initializers excluded; -1 for
    a symbolic dimension), from one read of the file."""
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # a damaged file whose sha256 was written into the manifest too
        raise BmlError(f"cannot read the graph ({type(exc).__name__})", path,
                       "export the models again with `bmltrt export`, or reinstall them") from None
    inits = {i.name for i in m.graph.initializer}

    def rows(vals):
        return [(v.name, _ONNX_ELEM.get(v.type.tensor_type.elem_type, "float32"),
                 tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim))
                for v in vals if v.name not in inits]

    return rows(m.graph.input), rows(m.graph.output)


def check_graph_matches(spec: ModelSpec, graph: tuple[list, list], onnx_path: Path) -> ModelSpec:
    """A graph swapped under the manifest (another resolution, same sha256 written in) would
    fail deep inside the runtime; say so in one line instead."""
    for want, (name, dtype, got) in zip(spec.inputs + spec.outputs, graph[0] + graph[1]):
        if (want.name, want.dtype) != (name, dtype):
            raise BmlError(f"{spec.model}: the graph's tensor {name} ({dtype}) is {want.name} ({want.dtype}) in the "
                           "manifest", onnx_path, "re-export the models with `bmltrt export`")
        if len(want.shape) != len(got) or any(w != -1 and g != -1 and w != g for w, g in zip(want.shape, got)):
            raise BmlError(f"{spec.model}: the graph's tensor {want.name} has shape {list(got)}, the manifest "
                           f"says {list(want.shape)}", onnx_path, "re-export the models with `bmltrt export`")
    return spec


def spec_from_entry(model: str, entry: dict, onnx_path: Path | None = None) -> ModelSpec:
    """The I/O spec of one manifest entry (see the module docstring)."""
    io = entry.get("io") if isinstance(entry.get("io"), dict) else entry
    graph = graph_tensors(onnx_path) if onnx_path is not None else None
    if io.get("inputs") and io.get("outputs"):
        spec = ModelSpec(model, tuple(_tensor_from_manifest(t) for t in io["inputs"]),
                         tuple(_tensor_from_manifest(t) for t in io["outputs"]))
        return check_graph_matches(spec, graph, onnx_path) if graph else spec
    kind, cfg = entry.get("kind"), entry.get("config", {})
    if kind == "segmenter":
        patch = tuple(int(p) for p in cfg["patch"])
        in_shape, out_shape = (-1, 1) + patch, (-1, 2) + patch
        names = (("image", "float32"), ("logits", "float32"))
    elif kind == "inpainter":
        r = int(entry["resolution"])
        in_shape, out_shape = (-1, 2, r, r), (-1, 1, r, r)
        names = (("masked_and_mask", "float32"), ("generated", "float32"))
    else:
        raise BmlError(f"model {model!r} has an unknown kind {kind!r} in the manifest")
    (in_name, in_dt), (out_name, out_dt) = names
    if graph:
        ins, outs = graph
        if len(ins) != 1 or len(outs) != 1:
            raise BmlError(f"{model}: expected one input and one output, the graph has {len(ins)} and {len(outs)}",
                           onnx_path)
        (in_name, in_dt, _), (out_name, out_dt, _) = ins[0], outs[0]
    spec = ModelSpec(model, (TensorSpec(in_name, in_dt, in_shape),), (TensorSpec(out_name, out_dt, out_shape),))
    return check_graph_matches(spec, graph, onnx_path) if graph else spec


def model_path(store, model: str, precision: str = "fp32") -> Path:
    """The graph of `model` at `precision` ("fp32" or "fp16").

    FP16 graphs come from `bmltrt export --precision fp16` (a precision-aware
    ``ModelStore.path(name, precision=...)``); a store without them says so.
    """
    if precision not in ("fp32", "fp16"):
        raise BmlError(f"unknown precision {precision!r}", hint="choose fp32 or fp16")
    if _takes_precision(store.path):
        return store.path(model, precision=precision)
    if precision == "fp32":  # a ModelStore that knows one precision only
        return store.path(model)
    raise BmlError(f"the models folder has no FP16 graph of {model}", store.root,
                   "export FP16 graphs with `bmltrt export --precision fp16`, or use --precision fp32")


def model_entry(store, model: str, precision: str = "fp32") -> dict:
    """The manifest entry of `model` at `precision` (falls back to the plain entry)."""
    if _takes_precision(store.entry):
        return store.entry(model, precision=precision)
    return store.entry(model)


def _takes_precision(fn) -> bool:
    import inspect

    try:
        return "precision" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def model_spec(store, model: str, precision: str = "fp32") -> ModelSpec:
    path = model_path(store, model, precision)
    return spec_from_entry(model, model_entry(store, model, precision), path)


def optimization_profile(spec: ModelSpec, max_batch: int, opt_batch: int, min_batch: int = 1) -> dict:
    """{input name: (min, opt, max) shapes} for a TensorRT optimisation profile: the batch
    dimension (-1) spans min..max with opt in between; every other dimension is fixed."""
    if not 1 <= min_batch <= max_batch:
        raise BmlError(f"--max-batch {max_batch} must be at least {min_batch}")
    opt = min(max(int(opt_batch), min_batch), max_batch)
    prof = {}
    for t in spec.inputs:
        dyn = [i for i, d in enumerate(t.shape) if d == -1]
        if dyn != [0]:
            raise BmlError(f"{spec.model}: input {t.name} has shape {t.shape}; only the batch (first) "
                           "dimension may be dynamic", hint="re-export the model")
        prof[t.name] = (t.with_batch(min_batch), t.with_batch(opt), t.with_batch(max_batch))
    return prof
