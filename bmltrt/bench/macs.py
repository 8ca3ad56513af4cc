"""Multiply-accumulates per sample counted from an ONNX graph (the roofline's numerator).

Conv, ConvTranspose, MatMul and Gemm, with shapes from shape inference on the graph with
its batch fixed to 1: ONNX Runtime's symbolic shape inference (it follows the Shape ->
ConstantOfShape -> Pad chains of the exported graphs, where plain ``onnx.shape_inference``
stops), else ``onnx.shape_inference``. Everything else (adds, norms, activations, resizes) is
memory-bound and not counted. The DFT's MatMuls are reported on their own line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

COUNTED = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def _attr(node, name, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _with_batch_one(model):
    """A copy whose graph inputs have a batch of 1, shape-inferred."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    init = {i.name for i in m.graph.initializer}
    for vi in m.graph.input:
        if vi.name in init:
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = 1
    for vi in list(m.graph.value_info):  # stale symbolic shapes would win over the new ones
        m.graph.value_info.remove(vi)
    for vi in m.graph.output:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = 1
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        out = SymbolicShapeInference.infer_shapes(m, auto_merge=True)
        if out is not None:
            return out
    except Exception:  # an op it does not know: plain ONNX inference below
        pass
    return onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)


def _shapes(model) -> dict[str, list[int | None]]:
    out = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for i in model.graph.initializer:
        out[i.name] = list(i.dims)
    return out


def node_macs(node, shapes: dict) -> int | None:
    """MACs of one node, None when a shape is unknown (or the op is not counted)."""
    def shape(name):
        s = shapes.get(name)
        return None if s is None or any(d is None for d in s) else s

    if node.op_type in ("Conv", "ConvTranspose"):
        x, w = shape(node.input[0]), shape(node.input[1])
        y = shape(node.output[0])
        if x is None or w is None or y is None:
            return None
        kernel = int(np.prod(w[2:]))
        if node.op_type == "Conv":  # w: (Cout, Cin/group, k...); every output element
            return int(np.prod(y)) * w[1] * kernel
        # ConvTranspose, w: (Cin, Cout/group, k...): every input element meets the kernel
        return int(np.prod(x)) * w[1] * kernel
    if node.op_type == "MatMul":
        a, b = shape(node.input[0]), shape(node.input[1])
        y = shape(node.output[0])
        if a is None or b is None or y is None:
            return None
        k = a[-1]
        return int(np.prod(y)) * k
    if node.op_type == "Gemm":
        a, y = shape(node.input[0]), shape(node.output[0])
        if a is None or y is None:
            return None
        k = a[0] if _attr(node, "transA", 0) else a[-1]
        return int(np.prod(y)) * k
    return None


def count_macs(path_or_model) -> dict:
    """{"total": MACs per sample, "by_op": {op: MACs}, "dft_matmul": MACs of MatMul nodes,
    "uncounted": [names of counted-op nodes whose shapes were unknown]}."""
    import onnx

    model = onnx.load(str(path_or_model)) if isinstance(path_or_model, (str, Path)) else path_or_model
    inferred = _with_batch_one(model)
    shapes = _shapes(inferred)
    by_op: dict[str, int] = {}
    unknown = []
    for node in inferred.graph.node:
        if node.op_type not in COUNTED:
            continue
        n = node_macs(node, shapes)
        if n is None:
            unknown.append(node.name or node.output[0])
            continue
        by_op[node.op_type] = by_op.get(node.op_type, 0) + n
    total = sum(by_op.values())
    return {"total": int(total), "by_op": {k: int(v) for k, v in sorted(by_op.items())},
            "matmul_share": round(by_op.get("MatMul", 0) / total, 4) if total else 0.0, "uncounted": unknown}


# Known peaks (multiply-accumulates per second = FLOP/s / 2), dense, from vendor datasheets.
GPU_PEAKS = {
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): FP32 67 TFLOPS, FP16 tensor 989.5 TFLOPS dense
    "H100 80GB HBM3": {"fp32": 33.5e12, "fp16": 494.7e12, "source": "NVIDIA H100 datasheet (SXM5): FP32 67 TFLOPS, "
                       "FP16 Tensor Core 989.5 TFLOPS dense; MAC = 2 FLOP"},
    # NVIDIA H200 datasheet (SXM): same compute as H100 SXM
    "H200": {"fp32": 33.5e12, "fp16": 494.7e12, "source": "NVIDIA H200 datasheet (SXM): FP32 67 TFLOPS, "
             "FP16 Tensor Core 989.5 TFLOPS dense; MAC = 2 FLOP"},
}


def gpu_peak(name: str, precision: str) -> tuple[float | None, str]:
    for key, p in GPU_PEAKS.items():
        if key.lower() in name.lower():
            return p.get(precision), p["source"]
    return None, ""


def cpu_peak(cores: int, flags: set[str], mhz: float | None) -> tuple[float | None, str]:
    """An *estimate* of the CPU's float32 MAC/s peak: cores x FMA lanes per cycle x clock.

    Lanes per cycle: 16 with AVX-512 (one 512-bit FMA per cycle, the conservative figure:
    Intel server parts with two FMA units reach 32; AMD Zen 4 executes 512-bit as 2 x 256),
    16 with AVX2+FMA (two 256-bit FMA units), else 4. The clock is /proc/cpuinfo's
    "cpu MHz" at the time of the run (no turbo assumed). None without a clock.
    """
    if not mhz:
        return None, ""
    if "avx512f" in flags:
        lanes, why = 16, "AVX-512: 16 fp32 FMA lanes/cycle assumed (one 512-bit FMA per cycle)"
    elif "avx2" in flags and "fma" in flags:
        lanes, why = 16, "AVX2+FMA: 2 x 8 fp32 FMA lanes/cycle assumed"
    else:
        lanes, why = 4, "SSE: 4 fp32 lanes/cycle assumed"
    peak = cores * lanes * mhz * 1e6
    return peak, (f"estimate, not a datasheet figure: {cores} cores x {lanes} MAC/cycle x {mhz:.0f} MHz "
                  f"(/proc/cpuinfo); {why}")
