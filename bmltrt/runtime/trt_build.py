"""`bmltrt build-engines`: ONNX -> TensorRT plans for this GPU and TensorRT version.

TensorRT 10.3+ and 11.x Python API (DESIGN.md section 3): Builder -> network -> OnnxParser
-> config (workspace pool limit, builder optimisation level, one optimisation profile for
the batch dimension derived from the manifest's input specs, a persisted timing cache,
a progress monitor) -> `build_serialized_network`. Precision comes from the graph: the
network is strongly typed (the STRONGLY_TYPED flag on 10.x; on 11.x every network is), so
an FP16 plan is built from the FP16 ONNX graph of `bmltrt export --precision fp16`, with
its float32 islands kept, and an fp32 plan from the float32 graph. No BuilderFlag.FP16
(removed in 11.x).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bmltrt.errors import BmlError
from bmltrt.io.checksum import file_sha256
from bmltrt.runtime import engines
from bmltrt.runtime.models import select_resolutions
from bmltrt.runtime.specs import ModelSpec, model_path, model_spec, optimization_profile

# Batch the profiles are tuned for (DetectConfig: 4 segmenter patches, 8 slices on the GPU).
OPT_BATCH = {"segmenter": 4, "inpainter": 8}


@dataclass
class BuildOptions:
    precisions: tuple[str, ...] = ("fp16",)
    max_batch: int = 16
    workspace_gib: float = 4.0
    opt_level: int = 3  # TensorRT's builder optimisation level, 0..5
    timing_cache: Path | None = None  # default: <engines>/timing_<gpu>_trt<version>.cache
    force: bool = False  # rebuild plans that fit

    def validate(self) -> None:
        for p in self.precisions:
            if p not in ("fp16", "fp32"):
                raise BmlError(f"unknown precision {p!r}", hint="choose fp16, fp32 or both")
        if not 1 <= self.max_batch <= 4096:
            raise BmlError(f"--max-batch {self.max_batch} is out of range", hint="use 1..4096 (default 16)")
        if not 0 < self.workspace_gib <= 1024:
            raise BmlError(f"--workspace {self.workspace_gib} GiB is out of range", hint="use e.g. 1..16 (default 4)")
        if not 0 <= self.opt_level <= 5:
            raise BmlError(f"--opt-level {self.opt_level} is out of range", hint="TensorRT accepts 0..5 (default 3)")


@dataclass
class Job:
    model: str
    precision: str
    onnx: Path
    spec: ModelSpec
    profile: dict
    onnx_sha256: str = ""
    ident: dict = field(default_factory=dict)


def plan_jobs(store, resolutions: list[int] | None, options: BuildOptions) -> list[Job]:
    """What to build: the segmenter and the inpainters at `resolutions` (None: all), at each
    precision; specs, profiles and ONNX files from the manifest. Needs no TensorRT."""
    options.validate()
    res = select_resolutions(store, resolutions)
    jobs = []
    for prec in options.precisions:
        for model in ["segmenter"] + [f"inpainter_{r}" for r in res]:
            path = model_path(store, model, prec)
            spec = model_spec(store, model, prec)
            kind = "segmenter" if model == "segmenter" else "inpainter"
            prof = optimization_profile(spec, options.max_batch, OPT_BATCH[kind])
            jobs.append(Job(model, prec, path, spec, prof))
    return jobs


def network_flags(trt) -> int:
    """Strongly typed on 10.x (the flag); on 11.x every network is, and the flag is gone
    or deprecated, so none is passed."""
    if engines.parse_version(trt.__version__)[0] >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def make_progress_monitor(trt, on_event: Callable[..., None]):
    """A trt.IProgressMonitor that forwards (event, phase, parent|step|None, steps|None)."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            try:
                on_event("start", phase_name, parent_phase, num_steps)
            except Exception:  # a display error must not abort a build
                pass

        def step_complete(self, phase_name, step):
            try:
                on_event("step", phase_name, step, None)
            except Exception:
                pass
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            try:
                on_event("finish", phase_name, None, None)
            except Exception:
                pass

    return Monitor()


def build_plan(trt, job: Job, options: BuildOptions, timing_cache: bytes, monitor=None) -> tuple[bytes, bytes]:
    """(serialised plan, updated timing cache) for one job."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(job.onnx)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BmlError(f"TensorRT {trt.__version__} cannot parse {job.onnx.name}: "
                       f"{errors[0] if errors else 'no error message'}"
                       + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""), job.onnx,
                       "the graph must use ops of the TensorRT 10.3 parser; re-export with `bmltrt export`")
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if inputs != set(job.profile):
        raise BmlError(f"{job.model}: the graph's inputs {sorted(inputs)} differ from the manifest's "
                       f"{sorted(job.profile)}", job.onnx, "re-export the models")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * (1 << 30)))
    config.builder_optimization_level = int(options.opt_level)
    profile = builder.create_optimization_profile()
    for name, (mn, opt, mx) in job.profile.items():
        profile.set_shape(name, mn, opt, mx)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache or b"")
    config.set_timing_cache(cache, False)  # a cache from another GPU/version is rejected by TensorRT
    if monitor is not None:
        config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BmlError(f"TensorRT could not build an engine for {job.model} ({job.precision})", job.onnx,
                       "see TensorRT's messages above; try a larger --workspace or a smaller --max-batch")
    new_cache = config.get_timing_cache()
    return bytes(memoryview(serialized)), bytes(memoryview(new_cache.serialize())) if new_cache else timing_cache


def default_timing_cache(engines_dir: Path, trt_version: str, gpu: engines.GpuInfo) -> Path:
    return Path(engines_dir) / f"timing_{gpu.slug()}_trt{trt_version}.cache"


def build_engines(store, engines_dir: Path, jobs: list[Job], options: BuildOptions, trt, gpu: engines.GpuInfo,
                  on_job: Callable[[Job, str, str], None] | None = None,
                  on_event: Callable[..., None] | None = None) -> list[dict]:
    """Build what is missing or stale; skip what fits. One result row per job:
    {model, precision, status: built|rebuilt|fits, why, plan, seconds}."""
    from bmltrt.io.atomic import atomic_write

    engines_dir = Path(engines_dir)
    engines_dir.mkdir(parents=True, exist_ok=True)
    cache_path = Path(options.timing_cache) if options.timing_cache else \
        default_timing_cache(engines_dir, trt.__version__, gpu)
    cache = cache_path.read_bytes() if cache_path.exists() else b""
    rows = []
    for job in jobs:
        job.onnx_sha256 = file_sha256(job.onnx)
        job.ident = engines.identity(job.model, job.precision, job.onnx_sha256, trt.__version__, gpu, job.profile)
        plan = engines.plan_path(engines_dir, job.ident)
        fits, why = engines.check_plan(plan, job.ident)
        others = [(p, engines.mismatch(m, job.ident) if m else "no sidecar")
                  for p, m in engines.candidates(engines_dir, job.model, job.precision) if p != plan]
        if fits and not options.force:
            rows.append({"model": job.model, "precision": job.precision, "status": "fits", "why": "",
                         "plan": str(plan), "seconds": 0.0})
            if on_job:
                on_job(job, "fits", "")
            continue
        status = "rebuilt" if (plan.exists() or others) else "built"
        reason = why if plan.exists() else (others[0][1] if others else "not built")
        if options.force and fits:
            reason = "--force"
        if on_job:
            on_job(job, "building", reason)
        t0 = time.perf_counter()
        monitor = make_progress_monitor(trt, on_event) if on_event else None
        plan_bytes, cache = build_plan(trt, job, options, cache, monitor)
        seconds = time.perf_counter() - t0
        engines.write_plan(engines_dir, job.ident, plan_bytes, {
            "onnx_file": str(job.onnx), "build_seconds": round(seconds, 1),
            "builder": {"max_batch": options.max_batch, "workspace_gib": options.workspace_gib,
                        "opt_level": options.opt_level, "strongly_typed": True},
            "io": job.spec.to_dict()})
        if cache:
            atomic_write(cache_path, lambda p, c=cache: Path(p).write_bytes(c))
        # Plans this one supersedes (same GPU and TensorRT, older ONNX or profile) go;
        # plans for another GPU or TensorRT stay: they may serve another machine.
        for p, m in engines.candidates(engines_dir, job.model, job.precision):
            if p != plan and m and (m.get("gpu"), m.get("compute_capability"), m.get("tensorrt")) == \
                    (gpu.name, gpu.compute_capability, str(trt.__version__)):
                p.unlink(missing_ok=True)
                engines.sidecar_path(p).unlink(missing_ok=True)
        rows.append({"model": job.model, "precision": job.precision, "status": status, "why": reason,
                     "plan": str(plan), "seconds": round(seconds, 1)})
        if on_job:
            on_job(job, status, reason)
    return rows
