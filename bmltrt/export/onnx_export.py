"""Trained checkpoints -> clean float32 ONNX graphs (checked against torch).

The inpainter is exported with the matrix-product DFT (no ONNX DFT op, which TensorRT
parses only from 11.2 on): one graph per resolution, the cos/sin matrices baked in as
float32 constants. One set of generator weights exports at any resolution (the DFT
matrices are per resolution; the weights are not). Batch is dynamic; spatial sizes are
fixed per graph. ``bmltrt.export.build`` writes the models folder (both precisions).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

from bmltrt.errors import BmlError
from bmltrt.export.checks import TENSORRT_10_3_OPS

OPSET = 17
MANIFEST = "manifest.json"
TENSORRT10_SAFE_OPS = TENSORRT_10_3_OPS  # the old name
SEGMENTER_IO = ("image", "logits")
INPAINTER_IO = ("masked_and_mask", "generated")


def graph_ops(path) -> set[str]:
    import onnx

    m = path if isinstance(path, onnx.ModelProto) else onnx.load(str(path))
    return {n.op_type for n in m.graph.node}


def torch_to_onnx(module, example, input_name: str, output_name: str):
    """TorchScript export to an in-memory ModelProto (deterministic for the same weights)."""
    import onnx
    import torch

    module.eval()
    buf = io.BytesIO()
    # The tracer's warnings (constants from numpy, int() of shapes: the DFT matrices are
    # per-shape constants by design) and the legacy exporter's notices are not the user's to
    # act on; every graph is checked against the torch module instead (max_err_vs_torch).
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        torch.onnx.export(module, (example,), buf, input_names=[input_name], output_names=[output_name],
                          dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


def max_err_vs_torch(module, example, model, atol: float, what=None) -> float:
    import onnxruntime as ort
    import torch

    with torch.no_grad():
        ref = module(example).numpy()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: example.numpy()})[0]
    err = float(np.abs(got - ref).max())
    if err > atol:
        raise BmlError(f"ONNX Runtime output differs from torch by {err:.2e} (> {atol})", what)
    return err


def _trained(ckpt: dict) -> dict:
    hist = ckpt.get("history") or [{}]
    return {"steps": ckpt.get("step"), "metrics": ckpt.get("metrics", {}), "last": hist[-1],
            "options": ckpt.get("options", {})}


def segmenter_graph(ckpt: dict, what=None):
    """(clean float32 ModelProto, manifest fields) of a segmenter checkpoint."""
    import torch

    from bmltrt.export.graph import clean
    from bmltrt.models.unetpp import SegmenterConfig, SegmenterLogits, build_segmenter

    cfg = SegmenterConfig.from_dict(ckpt["config"]["segmenter"])
    net = build_segmenter(cfg)
    net.load_state_dict(ckpt["modules"]["net"])
    module = SegmenterLogits(net).eval()
    example = torch.from_numpy(np.random.default_rng(0).random((2, 1) + tuple(cfg.patch), np.float32))
    raw = torch_to_onnx(module, example, *SEGMENTER_IO)
    model = clean(raw, {SEGMENTER_IO[0]: [1, *cfg.patch]}, {SEGMENTER_IO[1]: [2, *cfg.patch]}, what)
    err = max_err_vs_torch(module, example, model, atol=1e-3, what=what)
    return model, {"kind": "segmenter", "config": cfg.to_dict(), "max_abs_err_vs_torch": err,
                   "trained": _trained(ckpt)}


def checkpoint_resolutions(ckpt: dict) -> list[int]:
    """Resolutions a generator checkpoint was trained at: ``resolutions`` (a list, several
    resolutions with one set of weights) or ``resolution`` (one)."""
    cfg = ckpt.get("config", {})
    if cfg.get("resolutions"):
        return [int(r) for r in cfg["resolutions"]]
    return [int(cfg["resolution"])] if cfg.get("resolution") else []


def inpainter_graph(ckpt: dict, resolution: int | None = None, what=None):
    """(clean float32 ModelProto, manifest fields) of a generator at one resolution
    (default: the one it was trained at)."""
    import torch

    from bmltrt.export.graph import clean
    from bmltrt.models.lama import InpainterConfig, LamaGenerator

    cfg = InpainterConfig.from_dict(ckpt["config"]["inpainter"])
    trained = checkpoint_resolutions(ckpt)
    if resolution is None and len(trained) != 1:
        raise BmlError("the checkpoint does not say one resolution", what, "pass --resolutions")
    res = int(resolution or trained[0])
    if res % (2 ** cfg.n_downsampling):
        raise BmlError(f"resolution {res} is not a multiple of {2 ** cfg.n_downsampling}", what)
    gen = LamaGenerator(cfg, fft_impl="torch")
    gen.load_state_dict(ckpt["modules"]["gen"])
    gen.set_fft_impl("matmul").eval()
    rng = np.random.default_rng(0)
    img = rng.random((2, 1, res, res), np.float32)
    mask = np.zeros_like(img)
    mask[:, :, res // 4: res // 2, res // 4: 3 * res // 4] = 1
    example = torch.from_numpy(np.concatenate([img * (1 - mask), mask], axis=1))
    raw = torch_to_onnx(gen, example, *INPAINTER_IO)
    model = clean(raw, {INPAINTER_IO[0]: [2, res, res]}, {INPAINTER_IO[1]: [1, res, res]}, what)
    err = max_err_vs_torch(gen, example, model, atol=1e-4, what=what)
    return model, {"kind": "inpainter", "config": cfg.to_dict(), "resolution": res, "trained_resolutions": trained,
                   "fft": "matmul", "max_abs_err_vs_torch": err, "trained": _trained(ckpt)}


def export_models(segmenter: Path | None, inpainters: list[Path], out_dir: Path,
                  default_resolution: int | None = None, **kw) -> dict:
    """float32 only, as before; see bmltrt.export.build.make_models for every option."""
    from bmltrt.export.build import make_models

    kw.setdefault("precision", "fp32")
    return make_models(out_dir, segmenter=segmenter, inpainters=list(inpainters),
                       default_resolution=default_resolution, **kw)


def generator_weights_from_graph(path) -> tuple[dict, dict]:
    """(state dict, config dict) of the generator in a float32 inpainter graph that
    `bmltrt export` wrote, so a shipped inpainter (whose checkpoint is not shipped) can be
    fine-tuned with --init.

    The TorchScript export folds each BatchNorm that follows a convolution into it and
    renames the weights after their nodes. A fresh generator with random weights is
    exported the same way to learn which initializer is which weight; a folded pair comes
    back as the folded convolution and an identity BatchNorm carrying its bias
    (gamma = sqrt(1 + eps), beta = b', mean 0, variance 1). That is exact with the
    BatchNorms in eval mode, so such a fine-tune freezes them (LamaGenerator.freeze_bn).
    """
    import onnx
    import torch
    from onnx import numpy_helper

    from bmltrt.models.lama import InpainterConfig, LamaGenerator
    from bmltrt.runtime.models import ModelStore

    store = ModelStore.open(Path(path).parent)  # one line when the manifest is missing or broken
    files = {n: {p: store.entry(n, p)["file"] for p in store.precisions(n)}
             for n, e in store.manifest.get("models", {}).items() if e.get("kind") == "inpainter"}
    name = next((n for n, f in files.items() if Path(path).name in f.values()), None)
    if name is None:
        raise BmlError("no inpainter of this graph in the manifest beside it", path,
                       "give a float32 inpainter graph of a models folder (e.g. export/inpainter_256.onnx)")
    if files[name].get("fp32") != Path(path).name:
        raise BmlError("not a float32 graph", path, "give inpainter_<R>.onnx, not the _fp16 graph")
    entry = store.entry(name, "fp32")
    try:
        graph = onnx.load(str(path)).graph
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: one line
        raise BmlError(f"not an ONNX graph ({type(e).__name__})", path) from None
    shipped = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    cfg = InpainterConfig.from_dict(entry["config"])
    res = int(entry.get("resolution") or 128)
    probe = LamaGenerator(cfg, fft_impl="torch")
    gen = torch.Generator().manual_seed(0)
    sd = {k: (torch.rand(v.shape, generator=gen) + 0.5 if v.dtype.is_floating_point else v)
          for k, v in probe.state_dict().items()}  # distinct, positive (variances) values
    model, _ = inpainter_graph({"config": {"inpainter": cfg.to_dict(), "resolutions": [res]},
                                "modules": {"gen": sd}}, res, what=path)
    probe_inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    if set(probe_inits) != set(shipped):
        raise BmlError("this graph's weights do not match its manifest's generator config", path)

    def find(a):
        hits = [n for n, x in probe_inits.items() if x.shape == a.shape and np.allclose(x, a, rtol=1e-4, atol=1e-6)]
        return hits[0] if len(hits) == 1 else None

    out = {}
    modules = dict(probe.named_modules())
    bn_names = {name for name, m in modules.items() if isinstance(m, torch.nn.BatchNorm2d)}
    for name, mod in modules.items():
        if not isinstance(mod, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            continue
        w = sd[name + ".weight"].numpy()
        hit = find(w)
        if hit:
            out[name + ".weight"] = shipped[hit]
            hit = find(sd[name + ".bias"].numpy()) if mod.bias is not None else None
            if hit:
                out[name + ".bias"] = shipped[hit]
            continue
        for bn in sorted(bn_names):  # the BatchNorm folded into this convolution
            g, b = sd[bn + ".weight"].numpy(), sd[bn + ".bias"].numpy()
            m, v = sd[bn + ".running_mean"].numpy(), sd[bn + ".running_var"].numpy()
            eps = modules[bn].eps
            s = g / np.sqrt(v + eps)
            ch = 1 if isinstance(mod, torch.nn.ConvTranspose2d) else 0
            if w.shape[ch] != s.size:
                continue
            folded = w * s.reshape([-1 if i == ch else 1 for i in range(w.ndim)])
            hw, hb = find(folded), find(b - m * s)
            if hw and hb:
                out[name + ".weight"] = shipped[hw]
                out[bn + ".weight"] = np.full(s.size, np.sqrt(1 + eps), np.float32)
                out[bn + ".bias"] = shipped[hb]
                out[bn + ".running_mean"] = np.zeros(s.size, np.float32)
                out[bn + ".running_var"] = np.ones(s.size, np.float32)
                bn_names.discard(bn)
                break
    for bn in bn_names:  # BatchNorms the export kept as they are
        for key in ("weight", "bias", "running_mean", "running_var"):
            hit = find(sd[f"{bn}.{key}"].numpy())
            if hit:
                out[f"{bn}.{key}"] = shipped[hit]
    missing = [k for k, v in sd.items() if v.dtype.is_floating_point and k not in out]
    if missing:
        raise BmlError(f"could not recover {len(missing)} generator weights from this graph (e.g. {missing[0]})", path)
    state = {k: torch.from_numpy(np.array(out[k], np.float32)) if k in out else v.clone() for k, v in sd.items()}
    return state, cfg.to_dict()
