"""GPU probe: CuPy post-processing vs numpy, and torch generator throughput / FP16 error.

    python benchmarks/gpu_probe.py OUT.json [--checkpoint runs/defaults/inpainter_256.pt]

Needs CuPy and a CUDA GPU (torch optional). Writes one JSON with the device name and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import numpy as np


def _median_time(fn, n=7, sync=None):
    fn()
    if sync:
        sync()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def postprocess_probe(res: dict):
    import cupy as cp

    from bmltrt.io import load_scan
    from bmltrt.pipeline import Detector
    from bmltrt.postprocess import lesion_mask
    from bmltrt.runtime.backends import make_backend
    from bmltrt.runtime.preprocess import normalize_intensity
    from bmltrt.synth.dataset import write_case
    from bmltrt.synth.phantom import PhantomConfig, make_phantom

    ph = make_phantom([7, 0], PhantomConfig(n_lesions=(2, 2)))
    write_case("/tmp/probe", "p", "knee", ph)
    scan = load_scan("/tmp/probe/p/images/knee.nii.gz")
    det = Detector(make_backend("onnxruntime", "cpu")[0])
    norm = normalize_intensity(scan.data)
    femur = det.segment_femur(norm, scan.spacing)
    comp, sl = det.inpaint(norm, femur, scan.spacing)
    x, xt, fm = norm[sl], comp[sl], femur[sl]
    px = (scan.spacing[1], scan.spacing[2])
    ref = lesion_mask(x, xt, fm, px)
    gx, gxt, gfm = cp.asarray(x), cp.asarray(xt), cp.asarray(fm)
    got = lesion_mask(gx, gxt, gfm, px)
    res["postprocess"] = {
        "slices": int(np.count_nonzero(sl)), "shape": list(x.shape),
        "cupy_equals_numpy": bool(np.array_equal(cp.asnumpy(got), ref)),
        "mismatched_pixels": int((cp.asnumpy(got) != ref).sum()),
        "numpy_s": _median_time(lambda: lesion_mask(x, xt, fm, px), n=3),
        "cupy_s": _median_time(lambda: lesion_mask(gx, gxt, gfm, px), sync=cp.cuda.Device().synchronize),
    }


def generator_probe(res: dict, checkpoint: str | None):
    import torch

    from bmltrt.models.lama import INPAINTER_PRESETS, InpainterConfig, LamaGenerator

    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    out = {}
    for preset in ("tiny", "big"):
        for r in (128, 192, 256, 320, 448):
            g = LamaGenerator(INPAINTER_PRESETS[preset], fft_impl="matmul").to(dev).eval()
            bs = 16 if preset == "tiny" else 8
            x = torch.rand(bs, 2, r, r, device=dev)
            row = {}
            with torch.no_grad():
                row["fp32_slices_per_s"] = bs / _median_time(lambda: g(x), n=5, sync=torch.cuda.synchronize)
                with torch.autocast("cuda", dtype=torch.float16):
                    row["fp16_autocast_slices_per_s"] = bs / _median_time(lambda: g(x), n=5, sync=torch.cuda.synchronize)
            out[f"{preset}_{r}"] = {k: round(v, 1) for k, v in row.items()}
            del g
    res["torch_generator_throughput"] = {"batch": "16 (tiny) / 8 (big)", "fft": "matmul (DFT as GEMM)",
                                         "tf32": False, "results": out}
    if checkpoint:
        ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
        cfg = InpainterConfig.from_dict(ck["config"]["inpainter"])
        r = int(ck["config"]["resolution"])
        g = LamaGenerator(cfg, fft_impl="matmul")
        g.load_state_dict(ck["modules"]["gen"])
        g = g.to(dev).eval()
        gen = torch.Generator().manual_seed(0)
        img = torch.rand(8, 1, r, r, generator=gen) * 0.4
        m = torch.zeros_like(img)
        m[..., r // 4: r // 2, r // 4: 3 * r // 4] = 1
        x = torch.cat([img * (1 - m), m], 1).to(dev)
        with torch.no_grad():
            ref = g(x).float()
            half = g.half()(x.half()).float()  # FourierUnit keeps its DFT matmuls in float32
        res["fp16_numerics"] = {"checkpoint": checkpoint, "resolution": r,
                                "max_abs_err_fp16_vs_fp32": float((half - ref).abs().max()),
                                "mean_abs_err": float((half - ref).abs().mean()),
                                "any_nan": bool(torch.isnan(half).any())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--checkpoint", default=None)
    a = ap.parse_args()
    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(0)
    res = {"date": datetime.date.today().isoformat(), "device": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
           "cupy": cp.__version__, "python": platform.python_version()}
    for name, fn in (("postprocess", lambda: postprocess_probe(res)),
                     ("generator", lambda: generator_probe(res, a.checkpoint))):
        try:
            fn()
        except Exception as exc:  # keep what the other probe measured
            res[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
    try:
        import torch
        res["torch"] = torch.__version__
    except ImportError:
        res["torch"] = None
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
