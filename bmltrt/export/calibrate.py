"""Calibration data and activation ranges for the FP16 pass.

Calibration scans are phantoms made in memory from a fixed seed (``make_phantom``; the
same seed gives byte-identical scans), so an export needs no dataset and its calibration
is reproducible. The float32 pipeline runs on them (ONNX Runtime) and every batch that
reaches a network is recorded: segmenter patches and, per resolution, inpainter batches
(slice, femur-blanked slice, mask). Their sha256 goes into the manifest.

Activation ranges: the float32 graph runs op by op in torch (OnnxGraphModule) on the
recorded inputs, keeping each tensor's max |x|. InstanceNormalization's per-channel sum
of squares (what an FP16 reduction would accumulate) is recorded too.
"""

from __future__ import annotations

import hashlib

import numpy as np

from bmltrt.errors import stop_if_terminated

FP16_MAX = 65504.0
MAX_PATCHES = 8  # segmenter patches kept per calibration set
MAX_SLICES = 32  # inpainter slices kept per resolution


class _Recorder:
    """A backend that runs ONNX Runtime (float32) and keeps every batch it is given."""

    def __init__(self, inner):
        self.inner = inner
        self.name, self.device, self.precision, self.store = inner.name, inner.device, inner.precision, inner.store
        self.batches: dict[str, list[np.ndarray]] = {}

    def run(self, model, batch):
        self.batches.setdefault(model, []).append(np.asarray(batch, np.float32).copy())
        return self.inner.run(model, batch)


def _spread(arr: np.ndarray, n: int) -> np.ndarray:
    if len(arr) <= n:
        return arr
    return arr[np.linspace(0, len(arr) - 1, n).round().astype(int)]


def calibration_inputs(store, cases: int = 2, seed: int = 11, resolutions=None) -> tuple[dict, dict]:
    """({model name: float32 batch array}, record with the seeds and sha256) from `cases`
    phantom knees with 1-3 lesions each, run through the float32 pipeline in `store` (the
    inpainters with the phantom's true femur as the mask)."""
    from bmltrt.pipeline import DetectConfig, Detector
    from bmltrt.runtime.backends import OnnxRuntimeBackend
    from bmltrt.runtime.preprocess import normalize_intensity
    from bmltrt.synth.phantom import PhantomConfig, make_phantom

    rec = _Recorder(OnnxRuntimeBackend(store, "cpu"))
    resolutions = list(resolutions or store.resolutions())
    for i in range(cases):
        ph = make_phantom([seed, i], PhantomConfig(n_lesions=(1, 3)))
        norm = normalize_intensity(ph.image.astype(np.float32))
        det = Detector(rec, DetectConfig(resolution=resolutions[0]))
        det.femur_probability(norm, ph.spacing)  # records the segmenter's patches (no mask needed)
        # The inpainters are calibrated on the phantom's true femur: what they are given must
        # not hang on how good the segmenter is (an untrained one may find no femur at all).
        femur = ph.femur.astype(bool)
        for res in resolutions:
            stop_if_terminated()  # minutes of work: a SIGTERM whose exception was lost stops here
            det = Detector(rec, DetectConfig(resolution=res))
            det.inpaint(norm, femur, ph.spacing)
    data = {}
    for name, bs in sorted(rec.batches.items()):
        arr = np.concatenate(bs)
        data[name] = _spread(arr, MAX_PATCHES if name == "segmenter" else MAX_SLICES)
    h = hashlib.sha256()
    per = {}
    for name, arr in sorted(data.items()):
        d = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
        per[name] = {"shape": list(arr.shape), "sha256": d}
        h.update(name.encode() + d.encode())
    record = {"source": f"make_phantom([{seed}, i], PhantomConfig(n_lesions=(1, 3))) for i in range({cases}); "
                        "float32 pipeline (ONNX Runtime CPU; inpainters on the true femur), every network input recorded",
              "cases": cases, "seed": seed, "sha256": h.hexdigest(), "inputs": per}
    return data, record


def activation_ranges(model, batches: np.ndarray, batch_size: int = 4) -> dict:
    """{"tensors": {name: max|x|}, "max_abs", "max_tensor", "margin_to_fp16_max",
    "instancenorm_sumsq_max"} of a float32 graph on calibration batches."""
    import torch

    from bmltrt.runtime.onnx_torch import OnnxGraphModule

    mod = OnnxGraphModule(model)
    peak: dict[str, float] = {}
    sumsq = [0.0]

    def hook(name, op, ins, outs, res):
        for o, r in zip(outs, res):
            if torch.is_tensor(r) and r.is_floating_point() and r.numel():
                v = float(r.detach().abs().max())
                if not np.isfinite(v):
                    v = float("inf")
                peak[o] = max(peak.get(o, 0.0), v)
        if op == "InstanceNormalization":
            x = ins[0].double()
            sumsq[0] = max(sumsq[0], float((x * x).flatten(2).sum(-1).max()))

    with torch.no_grad():
        for i in range(0, len(batches), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(batches[i:i + batch_size]))
            for inp in mod.input_names:
                peak[inp] = max(peak.get(inp, 0.0), float(x.abs().max()))
            mod.run((x,), hook=hook)
    top = max(peak, key=peak.get) if peak else None
    mx = peak[top] if top else 0.0
    return {"tensors": peak, "max_abs": mx, "max_tensor": top,
            "margin_to_fp16_max": (FP16_MAX / mx) if mx else None,
            "instancenorm_sumsq_max": sumsq[0] or None}


def fp16_tensors(model, island_nodes) -> set[str]:
    """Outputs of the nodes that run in FP16 (not in an island)."""
    return {o for n in model.graph.node if n.name not in island_nodes for o in n.output}


def range_summary(ranges: dict, fp16: set[str] | None = None) -> dict:
    """The manifest's short form: overall max, and the max over tensors computed in FP16,
    each with its margin to 65504."""
    def g(v, d=5):
        return None if v is None else float(f"{v:.{d}g}")

    out = {"max_abs": g(ranges["max_abs"]), "max_tensor": ranges["max_tensor"],
           "margin_to_fp16_max": g(ranges["margin_to_fp16_max"], 4),
           "instancenorm_sumsq_max": g(ranges["instancenorm_sumsq_max"], 4)}
    if fp16 is not None:
        t = {k: v for k, v in ranges["tensors"].items() if k in fp16}
        top = max(t, key=t.get) if t else None
        out["fp16_max_abs"] = g(t[top]) if top else None
        out["fp16_max_tensor"] = top
        out["fp16_margin_to_fp16_max"] = g(FP16_MAX / t[top], 4) if top and t[top] else None
    return out
