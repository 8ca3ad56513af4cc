"""FP16 against float32, honestly, on phantom scans: `bmltrt export-check MODELS --data DS`.

ONNX Runtime's CPU provider computes an FP16 graph in float32 behind casts, so it cannot
tell whether FP16 is safe. Here the FP16 graphs run op by op in torch (OnnxGraphModule),
each tensor in its own dtype: float16 tensors are rounded to float16 after every op,
float32 islands stay float32, as TensorRT runs a strongly typed network. The float32
reference runs on ONNX Runtime (float32 is float32 there). The whole method runs
twice per scan and resolution (float32 graphs, FP16 graphs) and the table says:
- NaN/Inf in any network output (FP16 run);
- segmenter: max |logit| difference on the same patches, femur-mask Dice FP16 vs float32;
- inpainter per resolution: max |reconstruction| difference on the same input batches,
  lesion-mask Dice FP16 vs float32 (pooled over the scans, and the worst scan);
- the calibrated activation ranges from the manifest, with their margin to 65504.
Targets (issue 8): no NaN/Inf, femur Dice >= 0.99, lesion Dice >= 0.98.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
import time
from pathlib import Path

import numpy as np

from bmltrt.errors import BmlError

FEMUR_DICE_MIN = 0.99
LESION_DICE_MIN = 0.98


class GraphBackend:
    """A minimal backend (the Detector's ``run(model, batch)``) on OnnxGraphModule, CPU.

    With ``reference`` (a float32 GraphBackend) every batch also runs there and the max
    |difference| per network is kept: network-level error on the FP16 pipeline's own inputs.
    Results of identical batches are cached (the segmenter's patches repeat per resolution;
    the float32 reference sees the float32 pipeline's batches again wherever the masks agree).
    """

    name = "torch-onnx-graph"
    device = "cpu"

    def __init__(self, store, precision: str, reference: "GraphBackend | None" = None, cache_all: bool = False):
        from bmltrt.runtime.models import ModelStore

        self.precision = precision
        self.store = ModelStore(store.root, store.manifest, precision)
        self.reference = reference
        self.cache_all = cache_all
        self._mods: dict = {}
        self._cache: dict = {}
        self.nonfinite: dict[str, int] = {}
        self.max_diff: dict[str, float] = {}
        self.seconds: dict[str, float] = {}

    def module(self, model):
        if model not in self._mods:
            from bmltrt.runtime.onnx_torch import OnnxGraphModule
            from bmltrt.runtime.specs import model_spec

            model_spec(self.store, model, self.precision)  # a graph swapped under the manifest: one line
            self._mods[model] = OnnxGraphModule(self.store.path(model, self.precision)).eval()
        return self._mods[model]

    def run(self, model, batch):
        import torch

        x = np.ascontiguousarray(batch, np.float32)
        key = (model, hashlib.sha1(x.tobytes()).hexdigest(), x.shape)
        if key in self._cache:
            return self._cache[key]
        mod = self.module(model)
        dt = mod.input_dtypes[0] or torch.float32
        t0 = time.perf_counter()
        with torch.no_grad():
            y = mod(torch.from_numpy(x).to(dt)).float().numpy()
        self.seconds[model] = self.seconds.get(model, 0.0) + time.perf_counter() - t0
        self.nonfinite[model] = self.nonfinite.get(model, 0) + int((~np.isfinite(y)).sum())
        if self.reference is not None:
            ref = self.reference.run(model, x)
            d = float(np.nanmax(np.abs(y - ref))) if y.size else 0.0
            self.max_diff[model] = max(self.max_diff.get(model, 0.0), d)
        if model == "segmenter" or self.cache_all:
            self._cache[key] = y
        return y


class CachedReference:
    """The float32 reference pipeline on ONNX Runtime (float32 is float32 there, and 3-4x
    faster than the op-by-op executor), every result cached by input bytes: the FP16 run's
    batches that equal the float32 run's cost nothing."""

    name = "onnxruntime"
    device = "cpu"
    precision = "fp32"

    def __init__(self, store):
        from bmltrt.runtime.backends import OnnxRuntimeBackend

        self.inner = OnnxRuntimeBackend(store, "cpu")
        self.store = self.inner.store
        self._cache: dict = {}
        self.nonfinite: dict[str, int] = {}
        self.seconds: dict[str, float] = {}

    def run(self, model, batch):
        x = np.ascontiguousarray(batch, np.float32)
        key = (model, hashlib.sha1(x.tobytes()).hexdigest(), x.shape)
        if key not in self._cache:
            t0 = time.perf_counter()
            y = self.inner.run(model, x)
            self.seconds[model] = self.seconds.get(model, 0.0) + time.perf_counter() - t0
            self.nonfinite[model] = self.nonfinite.get(model, 0) + int((~np.isfinite(y)).sum())
            self._cache[key] = y
        return self._cache[key]


def _dice(a, b) -> tuple[int, int]:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return int((a & b).sum()), int(a.sum() + b.sum())


def _ratio(inter: int, total: int) -> float:
    return 1.0 if total == 0 else 2.0 * inter / total


def parity_report(models_dir, data, split: str = "val", out_dir=None, resolutions=None, limit=None,
                  progress=print) -> dict:
    import torch

    from bmltrt.io import load_scan
    from bmltrt.pipeline import DetectConfig, Detector
    from bmltrt.runtime.models import ModelStore, select_resolutions
    from bmltrt.synth.dataset import case_paths

    store = ModelStore.open(models_dir, "fp32")
    resolutions = select_resolutions(store, resolutions)  # every one asked for, before the first is computed
    names = sorted(store.manifest.get("models", {}))
    missing = [n for n in names if "fp16" not in store.precisions(n)]
    if missing:
        raise BmlError(f"no FP16 graph for {', '.join(missing)}", store.root,
                       "make them with `bmltrt export --precision both`")
    cases = case_paths(Path(data), split)[:limit]
    if not cases:
        raise BmlError(f"no cases in split {split!r}", data, "make a dataset with `bmltrt synth`")
    b32 = CachedReference(store)
    b16 = GraphBackend(store, "fp16", reference=b32)
    femur = [0, 0]
    femur_cases = []
    lesion = {r: [0, 0] for r in resolutions}
    lesion_cases = {r: [] for r in resolutions}
    truth_dice = {r: {"fp32": [0, 0], "fp16": [0, 0]} for r in resolutions}
    t_start = time.perf_counter()
    done: list = []

    def make_report():
        seconds = time.perf_counter() - t_start
        rows, failed = [], []
        for name in ["segmenter"] + [f"inpainter_{r}" for r in resolutions]:
            e16 = store.entry(name, "fp16")
            ar = e16.get("activation_ranges") or {}
            isl = (e16.get("islands") or {}).get("counts", {})
            nonfinite = b16.nonfinite.get(name, 0)
            base = {"network": name.split("_")[0], "resolution": store.entry(name).get("resolution"),
                    "activation_max_abs": ar.get("max_abs"), "margin_to_65504": ar.get("margin_to_fp16_max"),
                    "instancenorm_sumsq_max": ar.get("instancenorm_sumsq_max")}
            rows.append({**base, "precision": "fp32", "file": store.entry(name, "fp32")["file"],
                         "nonfinite": b32.nonfinite.get(name, 0), "max_abs_diff_vs_fp32": 0.0,
                         "seconds": round(b32.seconds.get(name, 0.0), 1)})
            row = {**base, "precision": "fp16", "file": e16["file"], "nonfinite": nonfinite,
                   "max_abs_diff_vs_fp32": b16.max_diff.get(name), "float32_islands": isl,
                   "seconds": round(b16.seconds.get(name, 0.0), 1)}
            if nonfinite:
                failed.append(f"{name} fp16: {nonfinite} NaN/Inf values")
            if name == "segmenter":
                row["femur_dice_vs_fp32"] = _ratio(*femur)
                row["femur_dice_worst_case"] = min(femur_cases, key=lambda c: c[1])
                if row["femur_dice_vs_fp32"] < FEMUR_DICE_MIN or row["femur_dice_worst_case"][1] < FEMUR_DICE_MIN:
                    failed.append(f"femur Dice fp16 vs fp32 {row['femur_dice_vs_fp32']:.4f} "
                                  f"(worst {row['femur_dice_worst_case'][0]} {row['femur_dice_worst_case'][1]:.4f})")
            else:
                r = int(base["resolution"])
                row["lesion_dice_vs_fp32"] = _ratio(*lesion[r])
                row["lesion_dice_worst_case"] = min(lesion_cases[r], key=lambda c: c[1])
                row["lesion_dice_vs_truth"] = {p: _ratio(*v) for p, v in truth_dice[r].items()}
                if row["lesion_dice_vs_fp32"] < LESION_DICE_MIN:
                    failed.append(f"lesion Dice fp16 vs fp32 at {r}: {row['lesion_dice_vs_fp32']:.4f} "
                                  f"(worst {row['lesion_dice_worst_case'][0]} {row['lesion_dice_worst_case'][1]:.4f})")
            rows.append(row)

        from bmltrt import __version__

        report = {
            "what": "FP16 graphs run op by op in torch on the CPU (float16 tensors rounded after every op; "
                    "float16 Conv/MatMul accumulate in float32, as tensor cores do) against the float32 graphs "
                    "(ONNX Runtime CPU)",
            "date": datetime.date.today().isoformat(),
            "machine": {"cpu": _cpu(), "cores": _cores(), "system": f"{platform.system()} {platform.machine()}",
                        "python": platform.python_version(), "torch": torch.__version__, "bmltrt": __version__},
            "models_dir": str(store.root), "files": store.manifest.get("files", {}),
            "calibration": (store.manifest.get("calibration") or {}).get("sha256"),
            "data": str(data), "split": split, "cases": list(done),
            "cases_planned": [c[0] for c in cases], "resolutions": resolutions,
            "thresholds": {"femur_dice_vs_fp32": FEMUR_DICE_MIN, "lesion_dice_vs_fp32": LESION_DICE_MIN, "nonfinite": 0},
            "seconds": round(seconds, 1), "rows": rows, "failed": failed,
            "complete": len(done) == len(cases),
        }
        if out_dir is not None:  # after every scan: a long run leaves its table so far
            od = Path(out_dir)
            od.mkdir(parents=True, exist_ok=True)
            (od / "parity.json").write_text(json.dumps(report, indent=1) + "\n")
            (od / "parity.md").write_text(markdown(report))
        return report

    for k, (case, img_p, _fem_p, les_p) in enumerate(cases):
        scan = load_scan(img_p)
        truth = load_scan(les_p, is_mask=True).data > 0
        for j, res in enumerate(resolutions):
            progress(f"{case} ({k + 1}/{len(cases)}) resolution {res}")
            d32 = Detector(b32, DetectConfig(resolution=res)).detect(scan)
            d16 = Detector(b16, DetectConfig(resolution=res)).detect(scan)
            if j == 0:
                i, t = _dice(d16.femur, d32.femur)
                femur[0] += i
                femur[1] += t
                femur_cases.append((case, _ratio(i, t)))
            i, t = _dice(d16.lesion, d32.lesion)
            lesion[res][0] += i
            lesion[res][1] += t
            lesion_cases[res].append((case, _ratio(i, t)))
            for prec, det in (("fp32", d32), ("fp16", d16)):
                i, t = _dice(det.lesion, truth)
                truth_dice[res][prec][0] += i
                truth_dice[res][prec][1] += t
        done.append(case)
        report = make_report()
    return report


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cores() -> int:
    import os

    return os.cpu_count() or 0


def _f(v, fmt):
    return "-" if v is None else format(v, fmt)


def markdown(rep: dict) -> str:
    m = rep["machine"]
    lines = [
        f"# FP16 parity ({rep['date']})",
        "",
        f"{rep['what']}. Scans: {len(rep['cases'])} of split `{rep['split']}` ({', '.join(rep['cases'])}) of "
        f"`{rep['data']}`; "
        f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}. Targets: no NaN/Inf, femur Dice "
        f">= {rep['thresholds']['femur_dice_vs_fp32']}, lesion Dice >= {rep['thresholds']['lesion_dice_vs_fp32']} "
        "(FP16 masks against float32 masks). Max |diff|: network output (segmenter logits, inpainter "
        "reconstruction in [0, 1]) on the same inputs. Activation max: calibrated, float32 graph.",
        "",
        "| network | res | precision | NaN/Inf | max abs diff vs fp32 | femur Dice vs fp32 | lesion Dice vs fp32 "
        "(worst scan) | lesion Dice vs truth | activation max (margin to 65504) | float32 islands |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rep["rows"]:
        ref = r["precision"] == "fp32"
        fem = "-" if "femur_dice_vs_fp32" not in r else (
            f"{r['femur_dice_vs_fp32']:.4f} (worst {r['femur_dice_worst_case'][1]:.4f})")
        les = "-" if "lesion_dice_vs_fp32" not in r else (
            f"{r['lesion_dice_vs_fp32']:.4f} ({r['lesion_dice_worst_case'][1]:.4f})")
        truth = "-" if "lesion_dice_vs_truth" not in r else (
            f"fp32 {r['lesion_dice_vs_truth']['fp32']:.3f}, fp16 {r['lesion_dice_vs_truth']['fp16']:.3f}")
        act = "-" if r.get("activation_max_abs") is None else (
            f"{r['activation_max_abs']:.4g} ({r['margin_to_65504']:.0f}x)")
        if r.get("instancenorm_sumsq_max"):
            act += f"; InstanceNorm sum x^2 {r['instancenorm_sumsq_max']:.3g}"
        isl = "-" if ref else (", ".join(f"{k} {v}" for k, v in r.get("float32_islands", {}).items()) or "none")
        lines.append(f"| {r['network']} | {r['resolution'] or '-'} | {r['precision']} | {r['nonfinite']} | "
                     f"{'reference' if ref else _f(r['max_abs_diff_vs_fp32'], '.2e')} | {'' if ref else fem} | "
                     f"{'' if ref else les} | {'' if ref else truth} | {'' if ref else act} | {isl} |")
    if not rep.get("complete", True):
        lines += ["", f"Partial: {len(rep['cases'])} of {len(rep['cases_planned'])} scans done."]
    lines += ["", "Result: " + ("PASSED" if not rep["failed"] else "FAILED: " + "; ".join(rep["failed"])), ""]
    return "\n".join(lines)
