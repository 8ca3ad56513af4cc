"""The measurements of `bmltrt bench`, side by side in one run.

A run is a plan of steps (each appends rows), executed one after the other with a
progress callback. Every row is one figure with its machine, commit and date:

- ``macs``: multiply-accumulates per slice (inpainter) or patch (segmenter), counted from the graph
- ``inpainter`` / ``segmenter``: slices/s and patches/s over the batch sweep, per backend and precision
- ``stages``: seconds per stage of one scan (load, normalise, segment, clean up, inpaint,
  post-process, write), per backend, with peak host (and GPU) memory
- ``ratio``: PyTorch eager float32 against our runtime (per stage and per network), torch.fft
  against the DFT matmul, fp16 against fp32
- ``scaling``: time and peak memory against slices per scan and scans per run
- ``memory_check``: peak RSS of a whole large scan in a fresh process
- ``roofline``: achieved MAC/s and, where a peak is known, the fraction of it
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bmltrt.bench.machine import machine_info, machine_label
from bmltrt.bench.memory import PeakMemory
from bmltrt.errors import BmlError
from bmltrt.optional import optional_import
from bmltrt.runtime.backends import threads_from_env

FORMAT = "bmltrt-bench-1"
BACKEND_CHOICES = ("onnxruntime", "torch", "tensorrt", "eager")
STAGES = ("load", "normalise", "segment", "clean_up", "inpaint", "postprocess", "write")
COLUMNS = ("section", "what", "backend", "device", "precision", "resolution", "batch", "stage", "unit", "median",
           "min", "max", "repeats", "peak_host_mib", "peak_gpu_mib", "note", "machine", "commit", "date")
# The full run is sized to finish within ~15 minutes on a 2-core CPU with the tiny shipped models.
FULL = {"batch_sizes": (1, 4, 16), "repeats": 3, "warmup": 1, "scan": (36, 448, 448),
        "slices": (18, 36, 72, 144), "scans": (1, 4, 16), "big_scan": (160, 512, 512), "host_limit_gib": 4.0}
QUICK = {"batch_sizes": (1, 2), "repeats": 2, "warmup": 1, "scan": (8, 128, 128),
         "slices": (4, 8), "scans": (1, 2), "big_scan": (12, 160, 160), "host_limit_gib": 4.0}
FP16_COMPUTE = {
    ("onnxruntime", "cpu"): "no: ONNX Runtime's CPU provider runs FP16 graphs by casting to float32 around each op",
    ("onnxruntime", "gpu"): "yes (CUDA provider)",
    ("torch", "cpu"): "half-precision CPU kernels (no FP16 matrix units used on most CPUs)",
    ("torch", "gpu"): "yes (CUDA kernels, tensor cores where shapes allow)",
    ("tensorrt", "gpu"): "yes (strongly typed FP16 engine, float32 islands)",
}


@dataclass
class BenchOptions:
    models: Path | None = None
    resolutions: list[int] | str | None = None  # None: all in the folder (--quick: smallest); "all": all
    backends: list[str] | None = None  # None: every one available here
    precisions: list[str] | None = None  # None: fp32 and fp16 (torch on the CPU: fp32 only, see _targets)
    batch_sizes: list[int] | None = None
    repeats: int | None = None
    quick: bool = False
    threads: int | None = None
    stage_resolution: int | None = None  # None: the models' default (if measured), else the first

    def settings(self) -> dict:
        s = dict(QUICK if self.quick else FULL)
        if self.batch_sizes:
            s["batch_sizes"] = tuple(self.batch_sizes)
        if self.repeats:
            s["repeats"] = int(self.repeats)
        return s


@dataclass
class Target:
    backend: str  # onnxruntime, torch, tensorrt, torch-eager
    device: str
    precision: str
    fft: str = ""  # eager only: torch or matmul

    @property
    def label(self) -> str:
        name = self.backend + (f" ({'torch.fft' if self.fft == 'torch' else 'DFT matmul'})" if self.fft else "")
        return f"{name} {self.device} {self.precision}"


def timed(fn, repeats: int, warmup: int) -> dict:
    """Run `fn` warmup + repeats times; seconds of the measured runs (median, min, max)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "n": len(ts), "all": ts}


MEASURED = ("inpainter", "segmenter", "stages", "scaling")  # sections that time something


class Bench:
    """Plans and runs the measurements; `rows` and `notes` are the results."""

    def __init__(self, opts: BenchOptions, work_dir: Path):
        from bmltrt.runtime.models import ModelStore

        self.opts = opts
        self.s = opts.settings()
        self.work = Path(work_dir)
        self.store = ModelStore.open(opts.models)
        self.machine = machine_info()
        self.mlabel = machine_label(self.machine)
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.threads = opts.threads or threads_from_env() or self.machine["cores"]
        if self.threads > self.machine["cores"]:
            self.notes.append(f"{self.threads} threads on {self.machine['cores']} usable cores: the CPU figures "
                              "include the cost of oversubscription")
        self.torch, why = optional_import("torch")
        if self.torch is None:
            self.notes.append(f"torch is not installed ({why}): no torch backend, PyTorch eager or torch.fft rows")
        self._check_models()
        self.resolutions = self._resolutions()
        self.targets = self._targets()
        if self.opts.backends and not self.targets:  # asked for, none can run: not a "passed" bench of MACs alone
            which = "it cannot" if len(self.opts.backends) == 1 else "none of them can"
            why = [n.replace(", skipped", "") for n in self.notes if any(n.startswith(b) for b in self.opts.backends)]
            raise BmlError(f"--backends {','.join(self.opts.backends)}: {which} run here",
                           hint="; ".join(why or self.notes) or "see `bmltrt doctor`")
        self._backends: dict = {}
        self._scans: dict = {}
        self.models_record = {n: {"sha256": e.get("sha256"), "precisions": self.store.precisions(n)}
                              for n, e in self.store.manifest.get("models", {}).items()}
        # a corrupt or swapped file is bad input, refused now: later it would only skip its rows
        from bmltrt.runtime.specs import model_spec

        for n, rec in self.models_record.items():
            for prec in rec["precisions"]:
                model_spec(self.store, n, prec)  # its sha256, then its shapes against the manifest's

    # -- what to measure -----------------------------------------------------------------
    def _check_models(self) -> None:
        """What detect refuses is refused here too, before any measurement: a damaged segmenter
        config or postprocess.json (the stage rows run the whole pipeline), a precision asked
        for that no graph has."""
        from bmltrt.postprocess.tuned import read_tuned
        from bmltrt.runtime.models import MANIFEST, damaged_manifest, segmenter_config_damage

        if "segmenter" in self.store.manifest.get("models", {}):
            damage = segmenter_config_damage(self.store.entry("segmenter"))
            if damage:
                raise damaged_manifest(damage, self.store.root / MANIFEST)
        for r in self.store.resolutions():
            read_tuned(self.store.root, self.store.manifest, r)
        names = list(self.store.manifest.get("models", {}))
        for p in self.opts.precisions or []:
            if names and not any(p in self.store.precisions(n) for n in names):
                raise BmlError(f"--precisions {p}: the models folder has no {p} graph", self.store.root,
                               f"export them with `bmltrt export --precision {p}` (or both), or leave {p} out")

    def _resolutions(self) -> list[int]:
        have = self.store.resolutions()
        if self.opts.resolutions == "all":  # asked for: every size, --quick or not
            want = list(have)
        else:
            want = self.opts.resolutions or (have[:1] if self.opts.quick else list(have))
        missing = [r for r in want if r not in have]
        for r in missing:
            self.notes.append(f"resolution {r}: no inpainter_{r} in the models folder, skipped")
        res = [r for r in want if r in have]
        if not have:
            raise BmlError("the models folder has no inpainter: nothing to measure", self.store.root,
                           "give a folder with inpainters (`bmltrt export --from-onnx export/ ...`)")
        if not res:
            raise BmlError(f"none of the resolutions {want} is in the models folder (it has {have})",
                           self.store.root, "choose --resolutions from those")
        return res

    def _targets(self) -> list[Target]:
        from bmltrt.doctor import cuda_devices
        from bmltrt.runtime.backends import gpu_available, torch_cuda

        want = self.opts.backends or list(BACKEND_CHOICES)
        gpu = cuda_devices()[0] > 0
        precisions = self.opts.precisions or ["fp32", "fp16"]
        out: list[Target] = []
        for b in want:
            if b in ("torch", "eager") and self.torch is None:
                continue  # said once in the notes
            devices = ["cpu"]
            if b == "onnxruntime" and gpu and gpu_available()[0]:
                devices.append("gpu")
            if b in ("torch", "eager") and gpu and torch_cuda()[0]:
                devices.append("gpu")
            if b == "tensorrt":
                from bmltrt.runtime import engines

                devices = []
                for p in precisions:
                    if gpu and engines.tensorrt_ready(self.store, None, p):
                        out.append(Target("tensorrt", "gpu", p))
                    else:
                        self.notes.append(f"tensorrt {p}: no GPU, no TensorRT or no built engines here "
                                          "(`bmltrt build-engines`), skipped")
                continue
            for d in devices:
                if b == "eager":
                    out += [Target("torch-eager", d, "fp32", "torch"), Target("torch-eager", d, "fp32", "matmul")]
                    continue
                for p in precisions:
                    if b == "torch" and d == "cpu" and p == "fp16" and not self.opts.precisions:
                        self.notes.append("torch cpu fp16 is not measured unless asked (--precisions fp32,fp16): "
                                          "CPU half kernels are slow and tell nothing about a GPU")
                        continue
                    out.append(Target(b, d, p))
        return out

    def has_precision(self, name: str, precision: str) -> bool:
        return precision in self.store.precisions(name)

    def backend(self, t: Target):
        key = (t.backend, t.device, t.precision, t.fft)
        if key not in self._backends:
            if t.backend == "torch-eager":
                from bmltrt.bench.eager import EagerBackend

                be = EagerBackend(self.store, t.device, t.fft, self.threads)
            else:
                from bmltrt.runtime.backends import make_backend

                be, _ = make_backend(t.backend, t.device, self.store.root, t.precision)
            self._backends[key] = be
        return self._backends[key]

    # -- rows --------------------------------------------------------------------------
    def add(self, section: str, what: str, unit: str, median, mn=None, mx=None, *, t: Target | None = None,
            resolution=None, batch=None, stage="", repeats=None, mem: PeakMemory | None = None, note="", **extra):
        row = {"section": section, "what": what, "backend": t.backend + (f"/{t.fft}" if t and t.fft else "") if t else "",
               "device": t.device if t else "", "precision": t.precision if t else "",
               "resolution": resolution, "batch": batch, "stage": stage, "unit": unit,
               "median": _r(median), "min": _r(mn), "max": _r(mx), "repeats": repeats,
               "peak_host_mib": mem.host_mib if mem else None, "peak_gpu_mib": mem.gpu_mib if mem else None,
               "note": note, "machine": self.mlabel, "commit": self.machine["commit"], "date": self.machine["date"]}
        row.update(extra)
        self.rows.append(row)
        return row

    def find(self, **kw) -> list[dict]:
        return [r for r in self.rows if all(r.get(k) == v for k, v in kw.items())]

    # -- the plan ------------------------------------------------------------------------
    def plan(self) -> list[tuple[str, object]]:
        steps: list[tuple[str, object]] = [("MACs per slice (graph)", self.step_macs)]
        for t in self.targets:
            for r in self.resolutions:
                steps.append((f"inpainter {r} {t.label}", lambda t=t, r=r: self.step_inpainter(t, r)))
        for t in self.targets:
            if t.fft == "matmul":
                continue  # the segmenter has no FFT: one eager row
            steps.append((f"segmenter {t.label}", lambda t=t: self.step_segmenter(t)))
        for t in self.targets:
            if t.fft == "matmul":
                continue
            steps.append((f"stages of a scan, {t.label}", lambda t=t: self.step_stages(t)))
        steps.append(("scaling: slices per scan", self.step_scaling_slices))
        steps.append(("scaling: scans per run", self.step_scaling_scans))
        steps.append(("host memory of a large scan (subprocess)", self.step_memory_check))
        steps.append(("ratios and roofline", self.step_derived))
        return steps

    def run(self, progress=None) -> dict:
        # the thread count for the run only (put back after it): ONNX Runtime's intra-op threads
        # come from $BMLTRT_THREADS, torch's from set_num_threads, the same number for both
        torch_threads = self.torch.get_num_threads() if self.torch is not None else None
        env_threads = os.environ.get("BMLTRT_THREADS")
        if self.torch is not None:
            self.torch.set_num_threads(self.threads)
        os.environ["BMLTRT_THREADS"] = str(self.threads)
        try:
            steps = self.plan()
            if progress:
                progress(None, len(steps))
            for label, fn in steps:
                if progress:
                    progress(label, len(steps))
                try:
                    fn()
                except BmlError as exc:  # a backend that cannot run a model here: a note, the run goes on
                    self.notes.append(f"{label}: skipped ({exc.line()})")
            if not any(r["section"] in MEASURED for r in self.rows):  # MACs and a memory check are not a bench
                skipped = [n for n in self.notes if "skipped" in n]
                raise BmlError("nothing was measured: every throughput and stage step was skipped",
                               hint=(skipped[0] if skipped else "see `bmltrt doctor`"))
        finally:
            for be in self._backends.values():
                with contextlib.suppress(Exception):
                    be.close()
            if self.torch is not None:
                self.torch.set_num_threads(torch_threads)
            if env_threads is None:
                os.environ.pop("BMLTRT_THREADS", None)
            else:
                os.environ["BMLTRT_THREADS"] = env_threads
        return self.result()

    def result(self) -> dict:
        from bmltrt.pipeline import LESION_RESCUE_PERCENTILE, MIRROR_TTA, SEG_ANTIALIAS

        return {"format": FORMAT, "machine": self.machine, "machine_label": self.mlabel,
                "settings": {**{k: list(v) if isinstance(v, tuple) else v for k, v in self.s.items()},
                             "quick": self.opts.quick, "resolutions": self.resolutions,
                             "precisions": list(self.opts.precisions or ["fp32", "fp16"]), "threads": self.threads,
                             "stage_resolution": self.stage_resolution,
                             "mirror_tta": MIRROR_TTA,  # two segmenter passes per scan when on
                             # a second (sharp) pass when both are on: twice the passes again
                             "seg_antialias": SEG_ANTIALIAS, "lesion_rescue_percentile": LESION_RESCUE_PERCENTILE,
                             "targets": [t.label for t in self.targets]},
                "models_dir": str(self.store.root), "models": self.models_record,
                "notes": self.notes, "rows": self.rows}

    # -- steps ---------------------------------------------------------------------------
    def step_macs(self):
        from bmltrt.bench.macs import count_macs

        names = ["segmenter"] + [f"inpainter_{r}" for r in self.resolutions]
        for name in names:
            m = count_macs(self.store.path(name, "fp32"))
            entry = self.store.entry(name, "fp32")
            unit = "MAC/patch" if name == "segmenter" else "MAC/slice"
            by = ", ".join(f"{k} {v / 1e9:.3f} G" for k, v in m["by_op"].items())
            note = f"{by}; MatMul (DFT) share {100 * m['matmul_share']:.1f}%"
            if m["uncounted"]:
                note += f"; {len(m['uncounted'])} nodes with unknown shapes not counted"
            self.add("macs", name, unit, m["total"], resolution=entry.get("resolution"),
                     batch=1, note=note, by_op=m["by_op"])

    def _batch(self, name: str, n: int, seed: int = 0):
        spec_shape = self.store.entry(name, "fp32").get("config", {})
        rng = np.random.default_rng(seed)
        if name == "segmenter":
            return rng.random((n, 1, *spec_shape["patch"]), np.float32)
        r = int(name.split("_")[1])
        x = rng.random((n, 1, r, r), np.float32)
        m = np.zeros_like(x)
        m[:, :, r // 4: 3 * r // 4, r // 3: 2 * r // 3] = 1
        return np.concatenate([x * (1 - m), m], axis=1)

    def _throughput(self, t: Target, name: str, batches, section: str, unit: str, resolution=None):
        if t.backend != "torch-eager" and not self.has_precision(name, t.precision):
            self.notes.append(f"{name} {t.precision}: not in the models folder, {t.label} skipped")
            return
        be = self.backend(t)
        xp = getattr(be, "xp", np)
        sync = (lambda: be.stream.synchronize()) if xp is not np and be.stream is not None else (lambda: None)
        with PeakMemory(xp if xp is not np else None, self._torch_cuda(t)) as mem:
            for n in batches:
                x = xp.asarray(self._batch(name, n))

                def call():
                    be.run(name, x)
                    sync()

                try:
                    tm = timed(call, self.s["repeats"], self.s["warmup"])
                except MemoryError:
                    self.notes.append(f"{name} batch {n} {t.label}: out of memory, larger batches skipped")
                    break
                self.add(section, name, unit, n / tm["median"], n / tm["max"], n / tm["min"], t=t,
                         resolution=resolution, batch=n, repeats=tm["n"],
                         seconds_per_batch=_r(tm["median"]))
        for r in self.find(section=section, what=name, backend=self._bname(t), device=t.device,
                           precision=t.precision):
            r["peak_host_mib"], r["peak_gpu_mib"] = mem.host_mib, mem.gpu_mib
        if t.precision == "fp16":
            for r in self.find(section=section, what=name, backend=self._bname(t), precision="fp16"):
                r["note"] = "computes in fp16: " + FP16_COMPUTE.get((t.backend, t.device), "?")

    @staticmethod
    def _bname(t: Target) -> str:
        return t.backend + (f"/{t.fft}" if t.fft else "")

    def _torch_cuda(self, t: Target) -> bool:
        return t.device == "gpu" and t.backend in ("torch", "torch-eager") and self.torch is not None

    def step_inpainter(self, t: Target, r: int):
        self._throughput(t, f"inpainter_{r}", self.s["batch_sizes"], "inpainter", "slices/s", r)

    def step_segmenter(self, t: Target):
        bs = [b for b in self.s["batch_sizes"] if b <= 8] or [1]
        self._throughput(t, "segmenter", bs, "segmenter", "patches/s")

    # -- a whole scan, stage by stage ------------------------------------------------------
    @property
    def stage_resolution(self) -> int:
        if self.opts.stage_resolution:
            return self.opts.stage_resolution
        d = self.store.default_resolution
        return d if d in self.resolutions else self.resolutions[0]

    def scan_file(self, shape: tuple[int, int, int], key: str = "") -> Path:
        """A phantom knee of `shape` (working: slices, rows, cols) as NIfTI: made at the
        standard 448x448 grid (3 mm slices) or a small one (--quick), then resampled; the
        field of view stays, the slice count changes the slice thickness only when asked
        (key "thin"), else it widens the scan left-right at the phantom's slice spacing."""
        k = (tuple(shape), key)
        if k in self._scans:
            return self._scans[k]
        import nibabel as nib
        from scipy import ndimage

        from bmltrt.synth.dataset import stored_affine, to_stored
        from bmltrt.synth.phantom import PhantomConfig, make_phantom

        base_shape = QUICK["scan"] if self.opts.quick else FULL["scan"]
        base_sp = (3.0, 0.357 * 448 / base_shape[1], 0.357 * 448 / base_shape[2])
        if "base" not in self._scans:
            self._scans["base"] = make_phantom([7, 1], PhantomConfig(shape=base_shape, spacing=base_sp,
                                                                      n_lesions=(2, 2)))
        ph = self._scans["base"]
        img = ph.image
        sp = list(base_sp)
        if tuple(shape) != tuple(img.shape):
            f = [a / b for a, b in zip(shape, img.shape)]
            img = ndimage.zoom(img.astype(np.float32), f, order=1).astype(np.int16)
            sp[1], sp[2] = sp[1] / f[1], sp[2] / f[2]
            if key == "thin":
                sp[0] = sp[0] / f[0]
        aff = stored_affine(img.shape, sp)
        nimg = nib.Nifti1Image(to_stored(img), aff)
        nimg.set_qform(aff, code=1)
        nimg.set_sform(aff, code=1)
        path = self.work / "scans" / f"knee_{'x'.join(map(str, shape))}{key}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nimg, str(path))
        self._scans[k] = path
        return path

    def detector(self, t: Target, resolution: int | None = None):
        from bmltrt.pipeline import DetectConfig, Detector

        return Detector(self.backend(t), DetectConfig(resolution=resolution or self.stage_resolution))

    def step_stages(self, t: Target):
        if t.backend != "torch-eager" and not (self.has_precision("segmenter", t.precision) and
                                               self.has_precision(f"inpainter_{self.stage_resolution}", t.precision)):
            self.notes.append(f"stages {t.label}: the models folder lacks this precision, skipped")
            return
        det = self.detector(t)
        path = self.scan_file(self.s["scan"])
        out = self.work / "out" / t.label.replace(" ", "_").replace("/", "_")
        runs = []
        mem = None
        for i in range(self.s["warmup"] + self.s["repeats"]):
            with PeakMemory(det.xp if det.xp is not np else None, self._torch_cuda(t)) as m:
                runs.append(run_scan(det, path, out / str(i)))
            mem = m if mem is None or (m.host_mib or 0) > (mem.host_mib or 0) else mem
        runs = runs[self.s["warmup"]:]
        shape = "x".join(map(str, self.s["scan"][::-1]))
        for stage in STAGES + ("total",):
            ts = [r[stage] for r in runs]
            self.add("stages", f"scan {shape}", "s", statistics.median(ts), min(ts), max(ts), t=t,
                     resolution=det.resolution, batch=det.config.batch_size, stage=stage, repeats=len(ts), mem=mem,
                     note="total = sum of the stages (the calls of `bmltrt detect`)" if stage == "total" else "")

    # -- scaling ---------------------------------------------------------------------------
    def _reference_target(self) -> Target | None:
        for t in self.targets:
            if t.backend == "onnxruntime" and t.precision == "fp32":
                return t
        ours = [t for t in self.targets if t.backend != "torch-eager"]
        return ours[0] if ours else (self.targets[0] if self.targets else None)

    def step_scaling_slices(self):
        t = self._reference_target()
        if t is None:
            return
        det = self.detector(t)
        rows_cols = self.s["scan"][1:]
        for n in self.s["slices"]:
            path = self.scan_file((n, *rows_cols))
            runs = []
            with PeakMemory() as mem:
                for i in range(max(1, self.s["repeats"] // 2) + 1):
                    runs.append(run_scan(det, path, self.work / "out" / f"slices{n}" / str(i))["total"])
            runs = runs[1:]
            self.add("scaling", "slices per scan", "s", statistics.median(runs), min(runs), max(runs), t=t,
                     resolution=det.resolution, batch=n, stage="total", repeats=len(runs), mem=mem,
                     note=f"{n} slices of {rows_cols[0]}x{rows_cols[1]}, 3 mm; batch column = slices")
        self._linearity("slices per scan", "time per slice")

    def step_scaling_scans(self):
        from bmltrt.bench.memory import peak_rss_mib, reset_peak

        t = self._reference_target()
        if t is None:
            return
        path = self.scan_file(self.s["scan"])
        for n in self.s["scans"]:
            det = self.detector(t)  # models loaded once per run, as `bmltrt detect a b c` does
            run_scan(det, path, self.work / "out" / "warm")
            reset_peak()
            t0 = time.perf_counter()
            first_peak = None
            for i in range(n):
                run_scan(det, path, self.work / "out" / f"scans{n}" / f"s{i}")
                if i == 0:
                    first_peak = peak_rss_mib()
            total = time.perf_counter() - t0
            peak = peak_rss_mib()
            self.add("scaling", "scans per run", "s", total, t=t, resolution=det.resolution, batch=n,
                     stage="total", repeats=1, peak_host_mib=round(peak, 1),
                     note=f"{n} scans in one run; peak RSS after the first scan {first_peak:.0f} MiB, "
                          f"after all {peak:.0f} MiB", peak_after_first_mib=round(first_peak, 1))
        self._linearity("scans per run", "time per scan")

    def _linearity(self, what: str, per: str):
        rows = sorted(self.find(section="scaling", what=what), key=lambda r: r["batch"])
        if len(rows) < 2:
            return
        per_unit = [r["median"] / r["batch"] for r in rows]
        growth = max(per_unit) / min(per_unit)
        mem = [r["peak_host_mib"] for r in rows if r["peak_host_mib"]]
        mem_growth = max(mem) / min(mem) if mem else None
        for r, p in zip(rows, per_unit):
            r["per_unit_s"] = _r(p)
        verdict = "linear" if growth <= 1.25 else "not linear"
        note = (f"{per} varies {growth:.2f}x over {rows[0]['batch']}..{rows[-1]['batch']} ({verdict}: "
                f"<= 1.25x counts as linear); peak memory grows {mem_growth:.2f}x" if mem_growth else "")
        if what == "scans per run" and mem_growth and mem_growth > 1.1:
            note += " (not flat: memory held across scans)"
        elif what == "slices per scan" and growth > 1.25:
            note += (" (fixed costs per scan — model calls on small batches, the segmenter's sliding window "
                     "over a fixed in-plane grid — weigh more on short scans)")
        self.add("scaling", f"{what}: verdict", "x", growth, note=note, stage=verdict)

    def step_memory_check(self):
        t = self._reference_target()
        if t is None or t.backend == "torch-eager":
            return
        shape = self.s["big_scan"]
        path = self.scan_file(shape, "thin")
        code = ("import json, sys\nfrom bmltrt.bench.run import _child_scan\n"
                "print('RESULT ' + json.dumps(_child_scan(*sys.argv[1:])))")
        env = dict(os.environ, BMLTRT_PROGRESS="0")
        r = subprocess.run([sys.executable, "-c", code, str(path), str(self.store.root), t.backend, t.device,
                            t.precision, str(self.stage_resolution), str(self.work / "out" / "big")],
                           capture_output=True, text=True, env=env, timeout=1800)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        limit = self.s["host_limit_gib"] * 1024
        dims = "x".join(map(str, shape[::-1]))
        if r.returncode != 0 or not line:
            err = (r.stderr.strip().splitlines() or ["no output"])[-1][:300]
            self.add("memory_check", f"scan {dims}", "MiB", None, t=t, note=f"the subprocess failed: {err}")
            return
        res = json.loads(line[0][7:])
        fits = res["peak_rss_mib"] <= limit
        self.add("memory_check", f"scan {dims}", "MiB", res["peak_rss_mib"], t=t, resolution=self.stage_resolution,
                 stage="fits" if fits else "does not fit", peak_host_mib=res["peak_rss_mib"], repeats=1,
                 note=(f"peak RSS of a fresh process running the whole scan ({res['seconds']:.1f} s, "
                       f"{res['model_slices']} model slices of ~3 mm from {shape[0]} thin slices): "
                       f"{'within' if fits else 'OVER'} {self.s['host_limit_gib']:g} GiB"),
                 fits=fits, limit_mib=limit)

    # -- derived: ratios and roofline ---------------------------------------------------------
    def step_derived(self):
        self._ratios_stages()
        self._ratios_networks()
        self._roofline()

    def _ratios_stages(self):
        eager = [r for r in self.find(section="stages") if r["backend"] == "torch-eager/torch"]
        for r in self.find(section="stages"):
            if r["backend"] in ("torch-eager/torch", "torch-eager/matmul") or r["precision"] != "fp32":
                continue
            e = [x for x in eager if x["stage"] == r["stage"] and x["device"] == r["device"]]
            if e and r["median"]:
                self.add("ratio", "eager fp32 / ours, per stage", "x", e[0]["median"] / r["median"],
                         t=Target(r["backend"], r["device"], r["precision"]), resolution=r["resolution"],
                         stage=r["stage"], note=f"PyTorch eager {e[0]['median']:.3f} s vs {r['median']:.3f} s "
                                               f"(>1: ours is faster)")

    def _ratios_networks(self):
        for sec in ("inpainter", "segmenter"):
            rows = self.find(section=sec)
            idx = {(r["backend"], r["device"], r["precision"], r["what"], r["batch"]): r for r in rows}
            for (b, d, p, what, n), r in idx.items():
                e = idx.get(("torch-eager/torch", d, "fp32", what, n))
                if b.startswith("torch-eager") or p != "fp32" or not e:
                    continue
                self.add("ratio", f"{sec}: ours / eager fp32 throughput", "x", r["median"] / e["median"],
                         t=Target(b, d, p), resolution=r["resolution"], batch=n, stage=what,
                         note=">1: ours is faster")
                f16 = idx.get((b, d, "fp16", what, n))
                if f16:
                    self.add("ratio", f"{sec}: fp16 / fp32 throughput", "x", f16["median"] / r["median"],
                             t=Target(b, d, "fp16"), resolution=r["resolution"], batch=n, stage=what,
                             note="computes in fp16: " + FP16_COMPUTE.get((b, d), "?"))
            for (b, d, p, what, n), r in idx.items():
                if b != "torch-eager/matmul":
                    continue
                e = idx.get(("torch-eager/torch", d, "fp32", what, n))
                if e:
                    self.add("ratio", "FFT path: DFT matmul / torch.fft throughput", "x", r["median"] / e["median"],
                             t=Target("torch-eager", d, "fp32"), resolution=r["resolution"], batch=n, stage=what,
                             note="same eager generator, FourierUnit by matrix products vs torch.fft "
                                  "(>1: matmul is faster)")

    def _roofline(self):
        from bmltrt.bench.machine import cpu_flags, cpu_mhz
        from bmltrt.bench.macs import cpu_peak, gpu_peak

        macs = {r["what"]: r["median"] for r in self.find(section="macs")}
        cpu_pk, cpu_src = cpu_peak(self.machine["cores"], cpu_flags(), cpu_mhz())
        threads_note = f"{self.threads} threads"
        for sec in ("inpainter", "segmenter"):
            best: dict = {}
            for r in self.find(section=sec):
                k = (r["backend"], r["device"], r["precision"], r["what"])
                if k not in best or r["median"] > best[k]["median"]:
                    best[k] = r
            for (b, d, p, what), r in best.items():
                if what not in macs:
                    continue
                achieved = macs[what] * r["median"]
                if d == "gpu":
                    peak, src = gpu_peak((self.machine.get("gpus") or [""])[0], p)
                else:
                    peak, src = (cpu_pk, cpu_src) if cpu_pk else (None, "")
                    if peak and self.threads < self.machine["cores"]:
                        peak, src = peak * self.threads / self.machine["cores"], src + f"; scaled to {threads_note}"
                self.add("roofline", what, "GMAC/s", achieved / 1e9, t=Target(b.split("/")[0], d, p,
                                                                              b.split("/")[1] if "/" in b else ""),
                         resolution=r["resolution"], batch=r["batch"],
                         note=(f"{100 * achieved / peak:.1f}% of peak {peak / 1e9:.0f} GMAC/s ({src})" if peak
                               else "no known peak for this device: fraction left blank"),
                         peak_gmacs=_r(peak / 1e9) if peak else None,
                         fraction_of_peak=_r(achieved / peak) if peak else None)


def run_scan(det, path: Path, out_dir: Path) -> dict:
    """One scan through the method, stage by stage, outputs written: {stage: seconds, total}.

    The same calls as `bmltrt detect` (Detector.detect_checked and write_outputs), split at
    the stage borders; a thin-slice scan goes to the models' ~3 mm grid and back as there.
    The femur check is computed for the report but refuses nothing (benchmark phantoms may
    meet untrained models).
    """
    from bmltrt.io import load_scan
    from bmltrt.pipeline import Detection
    from bmltrt.postprocess.femur_check import check_femur
    from bmltrt.report import write_outputs
    from bmltrt.runtime.preprocess import normalize_intensity
    from bmltrt.runtime.slice_grid import mask_to_input_slices, needs_reslicing, to_model_slices

    xp = det.xp
    sync = (lambda: det.stream.synchronize()) if xp is not np and det.stream is not None else (lambda: None)
    times = {}
    ctx = det._on_stream()
    with ctx:
        t0 = time.perf_counter()
        scan = load_scan(path)
        work, overlaps = (to_model_slices(scan) if needs_reslicing(scan.spacing) else (scan, None))
        t1 = time.perf_counter()
        times["load"] = t1 - t0
        sp = work.spacing
        norm = normalize_intensity(det.upload(work))
        sync()
        t2 = time.perf_counter()
        times["normalise"] = t2 - t1
        prob = det.femur_probability(norm, sp)
        sync()
        t3 = time.perf_counter()
        times["segment"] = t3 - t2
        femur = det.femur_mask(prob, sp)
        check = check_femur(prob, femur, sp, norm)
        sync()
        t4 = time.perf_counter()
        times["clean_up"] = t4 - t3
        composite, keep = det.inpaint(norm, femur, sp)
        sync()
        t5 = time.perf_counter()
        times["inpaint"] = t5 - t4
        lesion = det.postprocess(norm, composite, femur, keep, sp)
        sync()
        t6 = time.perf_counter()
        times["postprocess"] = t6 - t5
        norm_h, femur_h, lesion_h, keep_h = det.download(norm, femur, lesion, keep)
        if overlaps is not None:
            femur_h = mask_to_input_slices(femur_h, overlaps)
            lesion_h = mask_to_input_slices(lesion_h, overlaps) & femur_h
            norm_h = normalize_intensity(scan.data)
        slices = [int(i) for i in np.flatnonzero(keep_h)]
        report = det._report(scan, femur_h, lesion_h, dict(times), slices, check)
        write_outputs(Detection(scan, femur_h, lesion_h, norm_h, dict(times), report), out_dir, overwrite=True)
        times["write"] = time.perf_counter() - t6
    times["total"] = sum(times[s] for s in STAGES)
    return times


def _child_scan(path, models, backend, device, precision, resolution, out_dir) -> dict:
    """In a fresh process: one whole scan, and this process's peak RSS (the 4 GiB check)."""
    from bmltrt.bench.memory import peak_rss_mib
    from bmltrt.io import load_scan
    from bmltrt.pipeline import DetectConfig, Detector
    from bmltrt.runtime.backends import make_backend
    from bmltrt.runtime.slice_grid import needs_reslicing, to_model_slices

    be, _ = make_backend(backend, device, models, precision)
    det = Detector(be, DetectConfig(resolution=int(resolution)))
    t0 = time.perf_counter()
    run_scan(det, Path(path), Path(out_dir))
    sec = time.perf_counter() - t0
    scan = load_scan(path)
    n = to_model_slices(scan)[0].data.shape[0] if needs_reslicing(scan.spacing) else scan.data.shape[0]
    return {"peak_rss_mib": round(peak_rss_mib(), 1), "seconds": sec, "model_slices": int(n)}


def _r(v, digits: int = 6):
    """6 significant digits; integers (MAC counts) stay exact."""
    if v is None:
        return None
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return int(v)
    v = float(v)
    if not np.isfinite(v):
        return None
    return float(f"{v:.{digits}g}")


def run_bench(opts: BenchOptions, progress=None, work_dir: Path | None = None) -> dict:
    """Measure everything; the result dict (see ``output.write_results``)."""
    with tempfile.TemporaryDirectory(prefix="bmltrt-bench-", dir=work_dir) as tmp:
        return Bench(opts, Path(tmp)).run(progress)


