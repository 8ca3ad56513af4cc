"""Checks every shipped graph passes: the ONNX checker, strict shape inference, the
TensorRT 10.3 parser's op list (JetPack 6), the declared signature, polygraphy's linter.

``check_graph(path)`` returns a dict of results and raises BmlError on the first failure
when ``strict``; the test suite and ``bmltrt export`` both call it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx

from bmltrt.errors import BmlError

# ONNX ops the TensorRT 10.3 ONNX parser imports (JetPack 6 ships TensorRT 10.3).
# Source: onnx/onnx-tensorrt, docs/operators.md at the 10.1-GA release (the matrix is not
# republished per minor release), plus its CHANGELOG.md for 10.2 ("minor changes to op
# importers for GRU and Squeeze") and 10.3 ("tensor `axes` inputs for Slice nodes"): no
# op was added in 10.2 or 10.3. Not in this list and never to appear in our graphs: DFT,
# STFT (10.5), the window ops (10.4), any op of a custom domain (needs a plugin).
# Restrictions that matter to us, from the same table: Pad `axes` must be an initializer
# (tensor axes only from 10.4), Slice `axes` must be an initializer, MaxPool 2D/3D only with
# dilations 1, types FP32/FP16 for the float ops.
TENSORRT_10_3_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast
CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool
GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid HardSwish
Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu
Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence
RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid
Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan
Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
FORBIDDEN_OPS = frozenset({"DFT", "STFT", "BlackmanWindow", "HammingWindow", "HannWindow", "MelWeightMatrix"})
TENSORRT_MIN_OPSET, TENSORRT_MAX_OPSET = 9, 20  # TensorRT 10.x parser
_TRT_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}


def op_problems(model: onnx.ModelProto) -> list[str]:
    """Why TensorRT 10.3 could not parse this graph ([] when it can)."""
    probs = []
    g = model.graph
    inits = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    for o in model.opset_import:
        if o.domain not in ("", "ai.onnx"):
            probs.append(f"custom op domain {o.domain!r} (needs a TensorRT plugin)")
        elif not TENSORRT_MIN_OPSET <= o.version <= TENSORRT_MAX_OPSET:
            probs.append(f"opset {o.version} outside TensorRT 10's {TENSORRT_MIN_OPSET}-{TENSORRT_MAX_OPSET}")
    for n in g.node:
        if n.domain not in ("", "ai.onnx"):
            probs.append(f"node {n.name!r}: op {n.domain}.{n.op_type} of a custom domain")
        elif n.op_type in FORBIDDEN_OPS or n.op_type not in TENSORRT_10_3_OPS:
            probs.append(f"node {n.name!r}: op {n.op_type} is not parsed by TensorRT 10.3")
        elif n.op_type in ("Pad", "Slice"):
            if len(n.input) > 3 and n.input[3] and n.input[3] not in inits:  # `axes` (Pad and Slice)
                probs.append(f"node {n.name!r}: {n.op_type} axes must be an initializer for TensorRT 10.3")
        elif n.op_type == "MaxPool":
            a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
            if any(d != 1 for d in a.get("dilations", [])) or len(a.get("kernel_shape", [])) not in (2, 3):
                probs.append(f"node {n.name!r}: MaxPool must be 2D/3D with dilations 1")
    return probs


def signature(model: onnx.ModelProto) -> dict:
    """Inputs and outputs: name, dtype, shape (dim names for dynamic ones)."""
    def one(vi):
        t = vi.type.tensor_type
        return {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                "shape": [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]}
    inits = {t.name for t in model.graph.initializer}
    return {"inputs": [one(v) for v in model.graph.input if v.name not in inits],
            "outputs": [one(v) for v in model.graph.output]}


def signature_problems(sig: dict) -> list[str]:
    probs = []
    for kind in ("inputs", "outputs"):
        for t in sig[kind]:
            shape = t["shape"]
            if not shape or shape[0] != "batch":
                probs.append(f"{kind[:-1]} {t['name']!r}: first dim must be the dynamic 'batch', got {shape}")
            if any(not isinstance(d, int) or d <= 0 for d in shape[1:]):
                probs.append(f"{kind[:-1]} {t['name']!r}: only the batch may be dynamic, got {shape}")
            if t["dtype"] not in ("float32", "float16"):
                probs.append(f"{kind[:-1]} {t['name']!r}: dtype {t['dtype']}")
    return probs


def polygraphy_lint(path: Path) -> dict:
    """`polygraphy check lint` (ONNX checker + ONNX Runtime run + graph hygiene). Skipped
    (status "unavailable") when polygraphy is not installed."""
    exe = shutil.which("polygraphy") or (str(Path(sys.executable).parent / "polygraphy")
                                         if (Path(sys.executable).parent / "polygraphy").exists() else None)
    if exe is None:
        try:
            import polygraphy  # noqa: F401
        except ImportError:
            return {"status": "unavailable", "detail": "polygraphy not installed (pip install 'bmltrt[export]')"}
        cmd = [sys.executable, "-m", "polygraphy"]
    else:
        cmd = [exe]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "lint.json"
        r = subprocess.run(cmd + ["check", "lint", str(path), "-o", str(report)], capture_output=True,
                           text=True, timeout=600)
        summary = json.loads(report.read_text()) if report.exists() else {}
    lints = summary.get("lint_entries", [])
    errors = [e for e in lints if e.get("level") in ("exception", "error")]
    warnings = [e for e in lints if e.get("level") == "warning"]
    status = "passed" if r.returncode == 0 and not errors else "failed"
    detail = "; ".join(e.get("message", "")[:200] for e in errors[:3]) or (
        (r.stderr.strip().splitlines() or [""])[-1][:200] if status == "failed" else "")
    return {"status": status, "errors": len(errors), "warnings": len(warnings), "detail": detail}


def check_graph(path: Path, lint: bool = True, strict: bool = True) -> dict:
    """All checks on one ONNX file; raises BmlError on the first failure when strict."""
    from bmltrt.export.graph import strict_check

    path = Path(path)
    model = onnx.load(str(path))
    res = {"onnx_checker_full": "passed", "strict_shape_inference": "passed"}
    try:
        strict_check(model, path)
    except BmlError:
        if strict:
            raise
        res["onnx_checker_full"] = res["strict_shape_inference"] = "failed"
    probs = op_problems(model)
    res["tensorrt_10_3_ops"] = "passed" if not probs else "failed: " + "; ".join(probs[:3])
    sig = signature(model)
    sprobs = signature_problems(sig)
    res["signature"] = "passed" if not sprobs else "failed: " + "; ".join(sprobs)
    if lint:
        res["polygraphy_lint"] = polygraphy_lint(path)
    if strict:
        bad = [k for k, v in res.items() if isinstance(v, str) and v.startswith("failed")]
        if lint and res["polygraphy_lint"]["status"] == "failed":
            bad.append(f"polygraphy_lint ({res['polygraphy_lint']['detail']})")
        if bad:
            raise BmlError(f"graph check failed: {', '.join(bad)}: "
                           + "; ".join(str(res.get(b, "")) for b in bad if b in res)[:400], path)
    return res
