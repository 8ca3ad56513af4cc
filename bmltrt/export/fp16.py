"""float32 ONNX graph -> FP16 graph with float32 islands (for strongly typed TensorRT).

Why our own pass and not ModelOpt's AutoCast or onnxconverter-common: onnxconverter-common
leaves a no-op float Cast typed FLOAT inside FP16 regions (invalid graph) and rounds the
DFT constants to FP16 even inside a "float32 island"; ModelOpt AutoCast works, but its
``[onnx]`` extra pulls onnxruntime-gpu and CuPy (which replace ``onnxruntime`` and fake a GPU
on a machine without one), and the plain wheel needs a ``--no-deps`` install that a
pyproject extra cannot express. Our graphs use about 20 ops; the pass below is ~150 lines
of ``onnx``, deterministic, and every island decision is ours and recorded.

Every node runs in FP16 except the float32 islands:
- ``norm``: InstanceNormalization and BatchNormalization. InstanceNorm reduces over the
  whole slice volume (its per-channel sum of squares reaches 3.7e7 on real inputs, far
  over 65504); BatchNorm's running variances underflow in FP16 (1/sqrt(var + eps) of a
  rounded variance). TensorRT fuses the Casts around them.
- ``dft``: the FourierUnit (nodes in a ``/fu/`` scope) and every MatMul with a constant
  operand (the cos/sin DFT matrices): the constants stay exact float32, and so do the
  spectra (the DC term of a 56x56 map is 56x its mean).
- ``range``: any node with a float input or output whose calibrated max |x| exceeds the
  bound (default 1e4, a 6.5x margin to FP16's 65504), and any node with a float constant
  that FP16 cannot hold.
Weights of FP16 nodes are stored FP16; an initialiser used by both kinds is stored twice.
Inputs and outputs stay float32 (``keep_io_types``) unless asked otherwise. Casts are
inserted where a tensor crosses an island border, one per tensor and direction.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bmltrt.export.graph import is_float, remove_unused, tensor_dtypes

FP16_MAX = 65504.0
DEFAULT_BOUND = 1.0e4
NORM_OPS = ("InstanceNormalization", "BatchNormalization")
# Inputs that stay float32 whatever the node's precision (ONNX types them separately).
_FIXED_FP32_INPUTS = {"Resize": {1, 2}}
_F32, _F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def island_reasons(model: onnx.ModelProto, ranges: dict[str, float] | None = None,
                   bound: float = DEFAULT_BOUND, norm: bool = True, dft: bool = True) -> dict[str, str]:
    """node name -> why it stays float32 (nodes not listed run in FP16)."""
    g = model.graph
    consts = {t.name: t for t in g.initializer}
    dtypes = tensor_dtypes(model)
    reasons = {}
    for n in g.node:
        if norm and n.op_type in NORM_OPS:
            reasons[n.name] = "norm"
        elif dft and ("/fu/" in n.name or (n.op_type == "MatMul" and any(
                i in consts and len(consts[i].dims) >= 2 for i in n.input))):
            reasons[n.name] = "dft"
        if n.name in reasons:
            continue
        for i in n.input:
            if i in consts and is_float(consts[i].data_type):
                a = numpy_helper.to_array(consts[i])
                if a.size and float(np.abs(a).max()) > FP16_MAX:
                    reasons[n.name] = "range"
        if ranges:
            tensors = [t for t in list(n.input) + list(n.output) if t and is_float(dtypes.get(t))]
            if any(ranges.get(t, 0.0) > bound for t in tensors):
                reasons[n.name] = "range"
    return reasons


def to_fp16(model: onnx.ModelProto, ranges: dict[str, float] | None = None, bound: float = DEFAULT_BOUND,
            keep_io_types: bool = True, norm: bool = True, dft: bool = True) -> tuple[onnx.ModelProto, dict]:
    """The FP16 graph and a record of its islands: {"bound", "rules", "nodes": {name: reason},
    "counts": {reason: n}, "fp16_nodes": n, "casts": n}."""
    src = onnx.ModelProto()
    src.CopyFrom(model)
    del src.graph.value_info[:]
    dtypes = tensor_dtypes(src)
    reasons = island_reasons(src, ranges, bound, norm, dft)
    g = src.graph
    inits = {t.name: t for t in g.initializer}

    # each node's precision; each float tensor's dtype in the new graph
    node_dt = {n.name: (_F32 if n.name in reasons else _F16) for n in g.node}
    new_dt = {}
    for vi in g.input:
        if vi.name not in inits:
            new_dt[vi.name] = _F32 if keep_io_types else _F16
    for n in g.node:
        for o in n.output:
            if is_float(dtypes.get(o)):
                new_dt[o] = node_dt[n.name]

    # initialisers: converted where only FP16 nodes use them, duplicated where both do
    users: dict[str, set] = {}
    for n in g.node:
        for k, i in enumerate(n.input):
            if i in inits and is_float(inits[i].data_type) and k not in _FIXED_FP32_INPUTS.get(n.op_type, ()):
                users.setdefault(i, set()).add(node_dt[n.name])
    new_inits, init_as = [], {}
    for t in g.initializer:
        kinds = users.get(t.name, set())
        if _F16 in kinds and t.data_type == _F32:
            h = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16),
                                        t.name if kinds == {_F16} else f"{t.name}__fp16")
            init_as[(t.name, _F16)] = h.name
            new_inits.append(h)
            if kinds != {_F16}:
                new_inits.append(t)
        else:
            new_inits.append(t)
        init_as.setdefault((t.name, _F32), t.name)
        new_dt.setdefault(t.name, t.data_type)

    nodes, casts = [], {}

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            out = f"{name}__to_{'fp16' if to == _F16 else 'fp32'}"
            nodes.append(helper.make_node("Cast", [name], [out], name=out, to=to))
            casts[key] = out
        return casts[key]

    for n in g.node:
        want = node_dt[n.name]
        new = onnx.NodeProto()
        new.CopyFrom(n)
        for k, i in enumerate(n.input):
            if not i or not is_float(dtypes.get(i)):
                continue
            need = _F32 if k in _FIXED_FP32_INPUTS.get(n.op_type, ()) else want
            if i in inits:
                new.input[k] = init_as.get((i, need), i)
            elif new_dt.get(i) != need:
                new.input[k] = cast(i, need)
        if n.op_type == "Cast" and is_float(helper.get_attribute_value(n.attribute[0])):
            for a in new.attribute:
                if a.name == "to":
                    a.i = want
        if n.op_type == "ConstantOfShape" and is_float(dtypes.get(n.output[0])):
            for a in new.attribute:
                if a.name == "value":
                    a.t.CopyFrom(numpy_helper.from_array(
                        numpy_helper.to_array(a.t).astype(np.float16 if want == _F16 else np.float32), a.t.name))
        nodes.append(new)

    # graph inputs/outputs
    outputs = {o.name for o in g.output}
    for vi in g.input:
        if vi.name not in inits and is_float(vi.type.tensor_type.elem_type):
            vi.type.tensor_type.elem_type = new_dt[vi.name]
    for vi in g.output:
        if not is_float(vi.type.tensor_type.elem_type):
            continue
        target = _F32 if keep_io_types else _F16
        have = new_dt.get(vi.name)
        if have != target:  # rename the producer's output, cast into the declared name
            inner = f"{vi.name}__{'fp16' if have == _F16 else 'fp32'}"
            for nd in nodes:
                for k, o in enumerate(nd.output):
                    if o == vi.name:
                        nd.output[k] = inner
                for k, i in enumerate(nd.input):
                    if i == vi.name:
                        nd.input[k] = inner
            nodes.append(helper.make_node("Cast", [inner], [vi.name], name=f"{vi.name}__cast_out", to=target))
        vi.type.tensor_type.elem_type = target
    assert outputs == {o.name for o in g.output}

    del g.node[:]
    g.node.extend(_toposort(nodes, {vi.name for vi in g.input} | {t.name for t in new_inits}))
    del g.initializer[:]
    g.initializer.extend(new_inits)
    out = remove_unused(src)
    counts: dict[str, int] = {}
    for r in reasons.values():
        counts[r] = counts.get(r, 0) + 1
    record = {
        "bound": bound, "keep_io_types": keep_io_types,
        "rules": {"norm": "InstanceNormalization/BatchNormalization in float32" if norm else "off",
                  "dft": "FourierUnit (/fu/ scope) and MatMuls with constant DFT matrices in float32" if dft else "off",
                  "range": f"nodes whose calibrated max |activation| exceeds {bound:g}"
                           + ("" if ranges else " (no calibration given)")},
        "counts": dict(sorted(counts.items())), "fp16_nodes": sum(1 for v in node_dt.values() if v == _F16),
        "fp32_nodes": len(reasons), "casts": sum(1 for n in out.graph.node if n.name.endswith(("__to_fp16", "__to_fp32",
                                                                                               "__cast_out"))),
        "nodes": dict(sorted(reasons.items())),
    }
    return out, record


def _toposort(nodes: list, available: set[str]) -> list:
    """Stable topological order (casts were appended where first needed)."""
    have = set(available) | {""}
    pending = list(nodes)
    order = []
    while pending:
        rest = []
        progressed = False
        for n in pending:
            if all(i in have for i in n.input):
                order.append(n)
                have.update(n.output)
                progressed = True
            else:
                rest.append(n)
        if not progressed:
            raise ValueError(f"graph has a cycle or a missing input near node {rest[0].name!r}")
        pending = rest
    return order
