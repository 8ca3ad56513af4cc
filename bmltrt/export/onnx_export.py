"""Export trained checkpoints to ONNX and write the models manifest.

The inpainter is exported with the matrix-product DFT (no ONNX DFT op, which TensorRT
parses only from 11.2 on): one graph per resolution, the cos/sin matrices baked in as
float32 constants. Batch is dynamic; spatial sizes are fixed per graph.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from bmltrt.errors import BmlError
from bmltrt.io.atomic import atomic_write

OPSET = 17
MANIFEST = "manifest.json"
# Ops every TensorRT 10.x parser handles; the exported graphs must stay inside this set.
TENSORRT10_SAFE_OPS = {
    "Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization", "Relu", "LeakyRelu",
    "Sigmoid", "Add", "Sub", "Mul", "Div", "MatMul", "Gemm", "Concat", "Slice", "Split", "Pad",
    "MaxPool", "Constant", "Reshape", "Transpose", "Neg", "Cast", "Shape", "Gather", "Unsqueeze",
    "Squeeze", "Identity", "ReduceMean", "Pow", "Sqrt", "Resize", "Softmax", "Clip", "Where",
    "Equal", "ConstantOfShape", "Expand", "Range", "Floor", "Tile",
}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def graph_ops(path: Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _export(module, example, path: Path, input_name: str, output_name: str):
    import torch

    module.eval()

    def write(tmp):
        with torch.no_grad():
            torch.onnx.export(module, (example,), tmp, input_names=[input_name], output_names=[output_name],
                              dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                              opset_version=OPSET, dynamo=False, do_constant_folding=True)

    atomic_write(path, write, suffix=".onnx")


def _check_against_torch(module, example, path: Path, atol: float) -> float:
    import onnxruntime as ort
    import torch

    with torch.no_grad():
        ref = module(example).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: example.numpy()})[0]
    err = float(np.abs(got - ref).max())
    if err > atol:
        raise BmlError(f"ONNX Runtime output differs from torch by {err:.2e} (> {atol})", path)
    return err


def export_segmenter(ckpt: dict, out_dir: Path, name: str = "segmenter") -> dict:
    import torch

    from bmltrt.models.unetpp import SegmenterConfig, SegmenterLogits, build_segmenter

    cfg = SegmenterConfig.from_dict(ckpt["config"]["segmenter"])
    net = build_segmenter(cfg)
    net.load_state_dict(ckpt["modules"]["net"])
    module = SegmenterLogits(net).eval()
    example = torch.from_numpy(np.random.default_rng(0).random((2, 1) + tuple(cfg.patch), np.float32))
    path = Path(out_dir) / f"{name}.onnx"
    _export(module, example, path, "image", "logits")
    err = _check_against_torch(module, example, path, atol=1e-3)
    return _entry(path, "segmenter", ckpt, {"config": cfg.to_dict(), "max_abs_err_vs_torch": err})


def export_inpainter(ckpt: dict, out_dir: Path) -> dict:
    import torch

    from bmltrt.models.lama import InpainterConfig, LamaGenerator

    cfg = InpainterConfig.from_dict(ckpt["config"]["inpainter"])
    res = int(ckpt["config"]["resolution"])
    gen = LamaGenerator(cfg, fft_impl="torch")
    gen.load_state_dict(ckpt["modules"]["gen"])
    gen.set_fft_impl("matmul").eval()
    rng = np.random.default_rng(0)
    img = rng.random((2, 1, res, res), np.float32)
    mask = np.zeros_like(img)
    mask[:, :, res // 4: res // 2, res // 4: 3 * res // 4] = 1
    example = torch.from_numpy(np.concatenate([img * (1 - mask), mask], axis=1))
    path = Path(out_dir) / f"inpainter_{res}.onnx"
    _export(gen, example, path, "masked_and_mask", "generated")
    err = _check_against_torch(gen, example, path, atol=1e-4)
    return _entry(path, "inpainter", ckpt, {"config": cfg.to_dict(), "resolution": res, "fft": "matmul",
                                             "max_abs_err_vs_torch": err})


def _entry(path: Path, kind: str, ckpt: dict, extra: dict) -> dict:
    ops = graph_ops(path)
    if "DFT" in ops:
        raise BmlError("the exported graph holds a DFT op (TensorRT < 11.2 cannot parse it)", path)
    hist = ckpt.get("history") or [{}]
    return {"file": path.name, "kind": kind, "sha256": sha256_of(path), "bytes": path.stat().st_size,
            "precision": "fp32", "opset": OPSET, "ops": sorted(ops),
            "tensorrt10_safe": ops <= TENSORRT10_SAFE_OPS,
            "trained": {"steps": ckpt.get("step"), "metrics": ckpt.get("metrics", {}), "last": hist[-1],
                        "options": ckpt.get("options", {})}, **extra}


def export_models(segmenter: Path | None, inpainters: list[Path], out_dir: Path,
                  default_resolution: int = 256) -> dict:
    from bmltrt.training.checkpoint import load

    out_dir = Path(out_dir)
    man_path = out_dir / MANIFEST
    manifest = json.loads(man_path.read_text()) if man_path.exists() else {"format": "bmltrt-models-1", "models": {}}
    if segmenter:
        manifest["models"]["segmenter"] = export_segmenter(load(segmenter), out_dir)
    for p in inpainters:
        e = export_inpainter(load(p), out_dir)
        manifest["models"][f"inpainter_{e['resolution']}"] = e
    manifest["default_resolution"] = default_resolution
    atomic_write(man_path, lambda p: Path(p).write_text(json.dumps(manifest, indent=1, sort_keys=True)))
    return manifest
