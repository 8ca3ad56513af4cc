"""Clean-up of exported ONNX graphs, before any precision pass and before shipping.

The TorchScript exporter leaves shape arithmetic in the graph (every reflect/edge pad
computes its pads from Constant/ConstantOfShape/Concat/Reshape/Slice/Transpose/Cast, every
``torch.chunk`` from Shape/Gather/Add/Div/Mul), no-op float->float Casts, and a wrong
output shape on the inpainter (``(batch, 1, batch, ...)``: its dynamic-axes names
collide with inferred ones). ``clean`` folds all of that into initialisers, removes the
no-op Casts, declares the signature (dynamic batch only), and re-checks it with strict
shape inference. Pure ``onnx``; deterministic (same graph in, same bytes out).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bmltrt.errors import BmlError

BATCH = "batch"
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
# Ops never folded even with constant inputs (randomness, or results too big to bake in).
_NO_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
_FOLD_LIMIT = 1 << 16  # elements: fold only small results (shape arithmetic), never weights x weights


def _eval_node(node: onnx.NodeProto, values: dict[str, np.ndarray], opset: int) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    ins = [i for i in node.input if i]
    g = helper.make_graph(
        [node], "fold",
        [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(values[i].dtype), values[i].shape)
         for i in dict.fromkeys(ins)],
        [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in node.output if o])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    return ReferenceEvaluator(m).run(None, {i: values[i] for i in dict.fromkeys(ins)})


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _static_shapes(model: onnx.ModelProto) -> dict[str, list]:
    inferred = onnx.shape_inference.infer_shapes(model)
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return out


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Evaluate every node whose inputs are all known, and Shape(x)[i] of static dims; the
    results become initialisers. Repeats until nothing changes."""
    opset = _opset(model)
    changed = True
    while changed:
        changed = False
        g = model.graph
        values = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        shapes = _static_shapes(model)
        keep, new_inits = [], []
        for node in g.node:
            res = None
            if node.op_type == "Constant":
                res = [numpy_helper.to_array(node.attribute[0].t)] if node.attribute[0].name == "value" else None
            elif node.op_type == "Shape":
                sh = shapes.get(node.input[0])
                a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
                if sh is not None and all(d is not None for d in sh[a.get("start", 0):a.get("end", None)]):
                    res = [np.array(sh[a.get("start", 0):a.get("end", None)], np.int64)]
            elif node.op_type == "Gather" and node.input[0] in shapes and node.input[1] in values:
                # Gather(Shape(x), static index) where the gathered dims are static
                prod = next((n for n in g.node if node.input[0] in n.output), None)
                if prod is not None and prod.op_type == "Shape" and not any(a.name in ("start", "end")
                                                                             for a in prod.attribute):
                    sh = shapes.get(prod.input[0])
                    idx = values[node.input[1]]
                    if sh is not None:
                        picked = np.take(np.array([-1 if d is None else d for d in sh], np.int64), idx)
                        if (picked >= 0).all():
                            res = [picked.astype(np.int64)]
            elif (node.op_type not in _NO_FOLD and node.domain in ("", "ai.onnx") and node.input
                  and all((not i) or i in values for i in node.input)):
                if sum(values[i].size for i in node.input if i) <= _FOLD_LIMIT:
                    res = _eval_node(node, values, opset)
                    if any(np.asarray(r).size > _FOLD_LIMIT for r in res):
                        res = None
            if res is None:
                keep.append(node)
                continue
            for name, arr in zip(node.output, res):
                arr = np.asarray(arr)
                values[name] = arr
                new_inits.append(numpy_helper.from_array(arr, name))
            changed = True
        if changed:
            del g.node[:]
            g.node.extend(keep)
            g.initializer.extend(new_inits)
            model = remove_unused(model)
    return model


def remove_noop_casts(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop Identity and Cast-to-own-type nodes (float->float), rewiring their consumers."""
    g = model.graph
    dtypes = tensor_dtypes(model)
    outputs = {o.name for o in g.output}
    rename = {}
    keep = []
    for node in g.node:
        src = node.input[0] if node.input else None
        noop = node.op_type == "Identity" or (
            node.op_type == "Cast" and dtypes.get(src) == helper.get_attribute_value(node.attribute[0]))
        if noop and node.output[0] not in outputs:
            rename[node.output[0]] = rename.get(src, src)
            continue
        keep.append(node)
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del g.node[:]
    g.node.extend(keep)
    return model


def remove_unused(model: onnx.ModelProto) -> onnx.ModelProto:
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    return model


def tensor_dtypes(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor (inputs, initialisers, node outputs) by shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    out = {t.name: t.data_type for t in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.tensor_type.elem_type:
            out[vi.name] = vi.type.tensor_type.elem_type
    return out


def is_float(dtype: int | None) -> bool:
    return dtype in _FLOAT_TYPES


def set_signature(model: onnx.ModelProto, inputs: dict[str, list[int]], outputs: dict[str, list[int]],
                  dtype: int | None = None) -> onnx.ModelProto:
    """Declare input/output shapes as [batch, *static]; dims given after the batch."""
    g = model.graph
    for vi in list(g.input) + list(g.output):
        dims = inputs.get(vi.name, outputs.get(vi.name))
        if dims is None:
            continue
        t = vi.type.tensor_type
        if dtype is not None:
            t.elem_type = dtype
        t.ClearField("shape")
        d0 = t.shape.dim.add()
        d0.dim_param = BATCH
        for d in dims:
            t.shape.dim.add().dim_value = int(d)
    return model


def strict_check(model: onnx.ModelProto, what=None) -> onnx.ModelProto:
    """onnx.checker full check and strict shape inference; returns the inferred model."""
    try:
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise BmlError(f"the ONNX graph fails onnx.checker or strict shape inference: "
                       f"{str(exc).splitlines()[0][:300]}", what) from None
    # the declared outputs must agree with the inferred ones
    for o in model.graph.output:
        want = [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
        got_vi = next((v for v in inferred.graph.output if v.name == o.name), None)
        got = [d.dim_param or d.dim_value for d in got_vi.type.tensor_type.shape.dim] if got_vi else want
        if len(got) != len(want) or any(isinstance(a, int) and isinstance(b, int) and a != b
                                         for a, b in zip(want, got)):
            raise BmlError(f"output {o.name!r} declares shape {want} but the graph computes {got}", what)
    return inferred


def rename_anonymous_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """The exporter names folded weights by a global counter (``onnx::Conv_1295``); name them
    by their first consumer (``/stem/ffc/l2l/Conv.in1``) so names do not depend on it."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    taken = set(inits) | {o for n in g.node for o in n.output} | {i.name for i in g.input}
    rename = {}
    for node in g.node:
        for k, i in enumerate(node.input):
            if i in inits and i.startswith("onnx::") and i not in rename:
                new = f"{node.name or node.op_type}.in{k}"
                while new in taken:
                    new += "_"
                taken.add(new)
                rename[i] = new
    for t in g.initializer:
        t.name = rename.get(t.name, t.name)
    for node in g.node:
        for k, i in enumerate(node.input):
            if i in rename:
                node.input[k] = rename[i]
    return model


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    g = model.graph
    keep = []
    for node in g.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            g.initializer.append(t)
        else:
            keep.append(node)
    del g.node[:]
    g.node.extend(keep)
    return model


def clean(model: onnx.ModelProto, inputs: dict[str, list[int]], outputs: dict[str, list[int]],
          what=None) -> onnx.ModelProto:
    """The shipped form of a float32 graph: folded, no no-op casts, declared signature, checked."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    m = constants_to_initializers(m)
    m = set_signature(m, inputs, outputs)
    m = fold_constants(m)
    m = remove_noop_casts(m)
    m = remove_unused(m)
    m = rename_anonymous_initializers(m)
    # initialisers sorted by first use: deterministic and readable
    order = {}
    for node in m.graph.node:
        for i in node.input:
            order.setdefault(i, len(order))
    inits = sorted(m.graph.initializer, key=lambda t: order.get(t.name, len(order)))
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    strict_check(m, what)
    return m
