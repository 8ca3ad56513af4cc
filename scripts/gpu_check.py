"""Parity and per-stage timings of the detect loop on each backend that can run here.

    python scripts/gpu_check.py OUTDIR [--cpu] [--cases 2] [--runs 10] [--slices N]

On a GPU: every GPU backend available (torch fp32 = eager float32, the baseline; torch
fp16; each with CUDA graphs; TensorRT fp16/fp32 when engines are built; ONNX Runtime's
CUDA provider) against ONNX Runtime on the CPU: lesion and femur Dice on phantom scans
(thresholds 0.98 and 0.99), and the stage timings of a 448x448x36 phantom (median of
--runs after a warm-up; upload to download measured by CUDA events, end to end by the
wall clock). Also whether the host ran ahead of the device through the whole loop (a
synchronisation anywhere, also inside torch or TensorRT, would make it wait).

--cpu (what scripts/gpu_check.sh --dry-run and the CPU tests run): the same parity and
timing code with numpy: ONNX Runtime on the CPU against itself in the GPU's static-shape
mode. Writes OUTDIR/gpu_check.json; the last line says PASSED or FAILED (exit 1).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LESION_DICE, FEMUR_DICE = 0.98, 0.99


def dice(a, b) -> float:
    a, b = np.asarray(a).astype(bool), np.asarray(b).astype(bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def device_info(cpu: bool) -> dict:
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "python": platform.python_version(), "machine": platform.machine()}
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
        from machine import machine_info

        info["host"] = machine_info()
    except Exception:
        pass
    if cpu:
        info["device"] = "cpu"
        return info
    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    info.update(device=name, compute_capability=f"{props['major']}.{props['minor']}",
                memory_gib=round(props["totalGlobalMem"] / 2**30, 1), cupy=cp.__version__,
                cuda_runtime=cp.cuda.runtime.runtimeGetVersion(), cuda_driver=cp.cuda.runtime.driverGetVersion())
    for mod in ("torch", "tensorrt", "onnxruntime"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    return info


def configurations(cpu: bool) -> list[dict]:
    """Backends to measure: {id, backend, device, precision, options, config}."""
    if cpu:
        return [{"id": "onnxruntime-cpu-static", "backend": "onnxruntime", "device": "cpu", "precision": "fp32",
                 "options": {}, "config": {"static_shapes": True, "seg_batch_size": 4}}]
    from bmltrt.optional import optional_import
    from bmltrt.runtime import engines
    from bmltrt.runtime.backends import gpu_available, torch_cuda
    from bmltrt.runtime.models import ModelStore

    store = ModelStore.open()
    out = []
    if torch_cuda()[0] and optional_import("bmltrt.runtime.onnx_torch")[0] is not None:
        precs = ["fp32"] + (["fp16"] if "fp16" in store.precisions("segmenter") else [])
        for p in precs:
            for graphs in (False, True):
                out.append({"id": f"torch-{p}" + ("-cudagraphs" if graphs else ""), "backend": "torch",
                            "device": "gpu", "precision": p, "options": {"cuda_graphs": graphs}, "config": {}})
    for p in ("fp16", "fp32"):
        if engines.tensorrt_ready(store, None, p):
            for graphs in (False, True):
                out.append({"id": f"tensorrt-{p}" + ("-cudagraphs" if graphs else ""), "backend": "tensorrt",
                            "device": "gpu", "precision": p, "options": {"cuda_graphs": graphs}, "config": {}})
    if gpu_available()[0]:
        out.append({"id": "onnxruntime-cuda", "backend": "onnxruntime", "device": "gpu", "precision": "fp32",
                    "options": {}, "config": {}})
    return out


def make_detector(cfg: dict, resolution: int | None = None):
    from bmltrt.pipeline import DetectConfig, Detector
    from bmltrt.runtime.backends import make_backend

    be, warns = make_backend(cfg["backend"], cfg["device"], precision=cfg["precision"], **cfg["options"])
    if warns:
        raise RuntimeError("; ".join(warns))
    return Detector(be, DetectConfig(resolution=resolution, **cfg["config"]))


def phantom_scans(root: Path, cases: int, slices: int | None):
    """[(name, scan, truth lesion, truth femur)] of seeded phantoms (the first with lesions)."""
    from bmltrt.io import load_scan
    from bmltrt.synth.dataset import write_case
    from bmltrt.synth.phantom import PhantomConfig, make_phantom

    out = []
    for i in range(cases):
        ph = make_phantom([3 + i, 0], PhantomConfig(n_lesions=(2, 2) if i % 2 == 0 else (0, 0)))
        write_case(root, "c", f"case{i}", ph)
        scan = load_scan(root / "c" / "images" / f"case{i}.nii.gz")
        les, fem = ph.lesion, ph.femur
        if slices:
            per = les.reshape(les.shape[0], -1).sum(1)
            c = int(np.clip(np.argmax(per) if per.any() else len(per) // 2, slices // 2, len(per) - slices + slices // 2))
            sl = slice(c - slices // 2, c - slices // 2 + slices)
            scan.data, les, fem = np.ascontiguousarray(scan.data[sl]), les[sl], fem[sl]
        out.append((f"case{i}", scan, les, fem))
    return out


def parity(ref_det, det, scans) -> dict:
    rows, ok = [], True
    for name, scan, truth, truth_femur in scans:
        a, b = ref_det.detect(scan), det.detect(scan)
        row = {"case": name, "lesion_dice_vs_cpu": round(dice(b.lesion, a.lesion), 5),
               "femur_dice_vs_cpu": round(dice(b.femur, a.femur), 5),
               "lesion_voxels": [int(a.lesion.sum()), int(b.lesion.sum())],
               "lesion_dice_vs_truth": [round(dice(a.lesion, truth), 4), round(dice(b.lesion, truth), 4)],
               "femur_dice_vs_truth": [round(dice(a.femur, truth_femur), 4), round(dice(b.femur, truth_femur), 4)],
               "identical": bool(np.array_equal(a.lesion, b.lesion) and np.array_equal(a.femur, b.femur))}
        row["pass"] = row["lesion_dice_vs_cpu"] >= LESION_DICE and row["femur_dice_vs_cpu"] >= FEMUR_DICE
        ok &= row["pass"]
        rows.append(row)
    return {"thresholds": {"lesion_dice": LESION_DICE, "femur_dice": FEMUR_DICE}, "cases": rows, "pass": bool(ok)}


def timings(det, scan, runs: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        det.detect(scan)
    rows = [det.detect(scan).timings for _ in range(runs)]
    med = {k[:-2] + "_ms": round(float(np.median([r[k] for r in rows])) * 1000, 3) for k in rows[0]}
    out = {"median_ms": med, "runs": runs, "shape": list(scan.data.shape),
           "stages_sum_ms": round(sum(v for k, v in med.items() if k != "total_ms"), 3)}
    if det.xp is not np:
        out["host_ran_ahead"] = host_ran_ahead(det, scan)
        reads = getattr(det.backend, "host_reads", None)
        if reads is not None:
            out["torch_host_reads_per_forward"] = dict(reads)
    return out


def host_ran_ahead(det, scan) -> bool:
    """Queue ~1 s of spinning on the loop's stream, then the whole loop: if the host gets
    back before the spin ends, nothing in the loop waited for the device (a check that,
    unlike cupyx.allow_synchronize, also sees synchronisations inside torch or TensorRT)."""
    import cupy as cp

    spin = cp.RawKernel(r'''
    __device__ unsigned long long bml_now() {
        unsigned long long t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        return t;
    }
    extern "C" __global__ void bml_spin(unsigned long long ns) {
        unsigned long long t0 = bml_now();
        while (bml_now() - t0 < ns) { }
    }''', "bml_spin")
    with det._on_stream():
        vol = det.upload(scan)
        done = cp.cuda.Event()
        spin((1,), (1,), (np.uint64(1_000_000_000),))  # one second
        done.record(det.stream)
        det.run_loop(vol, scan.spacing)
        ahead = not done.query()
    cp.cuda.Device().synchronize()
    return bool(ahead)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--cpu", action="store_true", help="numpy only: exercise the code without a GPU")
    ap.add_argument("--cases", type=int, default=2, help="phantom scans for parity")
    ap.add_argument("--runs", type=int, default=10, help="timed runs per backend (after a warm-up)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    ap.add_argument("--resolution", type=int, default=None, help="inpainting resolution (default: the models')")
    ap.add_argument("--slices", type=int, default=None, help="crop scans to this many slices (tests)")
    a = ap.parse_args(argv)
    a.outdir.mkdir(parents=True, exist_ok=True)
    from bmltrt.pipeline import DetectConfig, Detector
    from bmltrt.runtime.backends import make_backend

    res = {"check": "bmltrt gpu_check", "mode": "cpu (numpy, dry run)" if a.cpu else "gpu",
           **device_info(a.cpu), "configurations": {}}
    ref_det = Detector(make_backend("onnxruntime", "cpu")[0], DetectConfig(resolution=a.resolution))
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        scans = phantom_scans(Path(tmp), a.cases, a.slices)
        timing_scan = scans[0][1]
        res["cpu_reference"] = {"backend": "onnxruntime-cpu",
                                "timings": timings(ref_det, timing_scan, max(1, min(a.runs, 3)), a.warmup)}
        confs = configurations(a.cpu)
        if not confs:
            res["note"] = "no GPU backend: install torch with CUDA, or TensorRT and build engines"
            ok = False
        for cfg in confs:
            row = {k: cfg[k] for k in ("backend", "device", "precision", "options")}
            try:
                det = make_detector(cfg, a.resolution)
                row["parity"] = parity(ref_det, det, scans)
                row["timings"] = timings(det, timing_scan, a.runs, a.warmup)
                ok &= row["parity"]["pass"]
                det.backend.close()
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
                ok = False
            res["configurations"][cfg["id"]] = row
            print(f"{cfg['id']}: " + (row.get("error") or
                  f"parity {'ok' if row['parity']['pass'] else 'FAILED'}, "
                  f"total {row['timings']['median_ms']['total_ms']:.1f} ms"), flush=True)
    base = res["configurations"].get("torch-fp32", {}).get("timings", {}).get("median_ms", {}).get("total_ms")
    if base:
        res["speedup_vs_torch_fp32_eager"] = {k: round(base / v["timings"]["median_ms"]["total_ms"], 2)
                                              for k, v in res["configurations"].items() if "timings" in v}
    res["passed"] = bool(ok)
    out = a.outdir / "gpu_check.json"
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")
    print("PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
