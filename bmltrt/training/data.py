"""Training data from a `bmltrt synth` dataset, on each network's working grid."""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

from bmltrt.errors import BmlError
from bmltrt.io import load_scan
from bmltrt.runtime.preprocess import normalize_intensity, slices_to_square, to_segmenter_grid, zoom_to
from bmltrt.runtime.sliding_window import sliding_window
from bmltrt.synth.dataset import case_paths

MIN_FEMUR_FRACTION = 0.002  # a slice "contains femur" above this share of its pixels


def segmenter_volumes(root: Path, split: str, inplane_mm: float, limit: int | None = None, lesions: bool = False,
                      antialias: float = 0.0):
    """[(case, image (S,H',W') normalised, femur (S,H',W') float, voxel mm)] on the segmenter grid;
    with `lesions`, a fifth element: the lesion mask on that grid (any overlap counts). The
    image is resampled as the runtime does it (`to_segmenter_grid` with `antialias`)."""
    out = []
    for case, img_p, fem_p, les_p in case_paths(root, split)[:limit]:
        scan = load_scan(img_p)
        fem = load_scan(fem_p, is_mask=True).data
        img = to_segmenter_grid(normalize_intensity(scan.data), scan.spacing, inplane_mm, antialias)
        shape = img.shape
        voxel = (scan.spacing[0], inplane_mm, inplane_mm)
        item = (case, img.astype(np.float32), (zoom_to(fem, shape) > 0.5).astype(np.float32), voxel)
        if lesions:
            les = load_scan(les_p, is_mask=True).data if les_p.exists() else np.zeros(scan.data.shape, np.float32)
            item += (zoom_to(les.astype(np.float32), shape) > 0.25,)
        out.append(item)
    return out


def segmenter_grid_scores(vols, predict, patch, overlap: float) -> tuple[float, float | None]:
    """Mean femur Dice of `predict` (a batch of patches -> femur probabilities) over
    segmenter_volumes items, and the share of their lesion voxels it calls femur (None without
    lesions): lesioned marrow is femur, and a segmenter that carves lesions out hides them
    from the inpainter."""
    dices, les_in, les_all = [], 0, 0
    for item in vols:
        img, fem = item[1], item[2]
        prob = sliding_window(img, tuple(patch), predict, batch_size=2, overlap=overlap)[1]
        pred = prob > 0.5
        t = fem > 0.5
        dices.append(2 * (pred & t).sum() / max(1, pred.sum() + t.sum()))
        if len(item) > 4 and item[4] is not None:
            les_in += int((pred & item[4]).sum())
            les_all += int(item[4].sum())
    return (float(np.mean(dices)) if dices else float("nan")), (les_in / les_all if les_all else None)


def inpainter_slices(root: Path, split: str, res: int, healthy_only: bool = True, limit: int | None = None):
    """Images (N, res, res) normalised and femur masks (N, res, res) of slices with femur.

    With `healthy_only`, slices whose lesion mask is non-empty are left out: the generator
    must learn healthy marrow only.
    """
    imgs, masks, names = [], [], []
    for case, img_p, fem_p, les_p in case_paths(root, split)[:limit]:
        scan = load_scan(img_p)
        fem = load_scan(fem_p, is_mask=True).data > 0.5
        les = load_scan(les_p, is_mask=True).data > 0.5 if les_p.exists() else np.zeros_like(fem)
        norm = normalize_intensity(scan.data)
        keep = fem.mean(axis=(1, 2)) > MIN_FEMUR_FRACTION
        if healthy_only:
            keep &= ~les.any(axis=(1, 2))
        idx = np.flatnonzero(keep)
        if idx.size == 0:
            continue
        px = scan.spacing[1:]  # square pixels for the inpainter, as detect gives it
        imgs.append(slices_to_square(norm[idx], res, pixel_mm=px))
        masks.append(slices_to_square(fem[idx].astype(np.float32), res, pixel_mm=px) > 0.5)
        names += [f"{case}:{i}" for i in idx]
    if not imgs:
        return np.zeros((0, res, res), np.float32), np.zeros((0, res, res), bool), []
    return np.concatenate(imgs), np.concatenate(masks), names


# -- label-driven samples (SynthSeg-style; synth/anatomy.py, synth/labelgen.py) ----------------

class LabelBank:
    """Anatomy variants held in memory, drawn with weights per kind: real knees most often,
    femur shapes swapped into real knees next, phantom anatomies last."""

    KIND_WEIGHTS = {"knee": 0.5, "swap": 0.25, "phantom": 0.25}

    def __init__(self, paths):
        from bmltrt.synth.anatomy import load_anatomy

        self.anatomies = [load_anatomy(p) for p in paths]
        if not self.anatomies:
            raise ValueError("empty anatomy bank")
        kinds = [a.info.get("kind", "knee") for a in self.anatomies]
        present = {k: kinds.count(k) for k in set(kinds)}
        total = sum(self.KIND_WEIGHTS.get(k, 0.1) for k in present)
        self.weights = np.array([self.KIND_WEIGHTS.get(k, 0.1) / total / present[k] for k in kinds])
        self.weights /= self.weights.sum()

    def pick(self, rng: np.random.Generator):
        return self.anatomies[int(rng.choice(len(self.anatomies), p=self.weights))]

    @property
    def nbytes(self) -> int:
        return sum(a.labels.nbytes for a in self.anatomies)


class SamplePool:
    """`size` generated samples, `refresh` of them replaced per draw.

    Making one label-driven sample costs about as much as a training step on 2 cores, so
    each sample serves a few steps (with fresh crops, flips and masks each time).
    """

    def __init__(self, make, size: int, refresh: int, rng: np.random.Generator):
        self.make, self.refresh, self.rng = make, refresh, rng
        self.items = [self._one() for _ in range(size)]

    def _one(self):
        while True:
            s = self.make(self.rng)
            if s is not None:
                return s

    def draw(self, k: int) -> list:
        for _ in range(self.refresh):
            self.items[int(self.rng.integers(len(self.items)))] = self._one()
        return [self.items[int(i)] for i in self.rng.integers(0, len(self.items), k)]


# -- the generator in worker processes ---------------------------------------------------------

_WORKER_BANK: LabelBank | None = None
_ONE_THREAD = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _exit_with(parent: int) -> None:
    # A parent killed outright (SIGKILL, the out-of-memory killer) cannot stop its workers,
    # and they would wait for work forever, each holding the anatomy bank (~1 GB).
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _worker_start(paths, trainer: int) -> None:
    # Ctrl-C reaches the whole process group: the parent stops the workers, which must not
    # each print a KeyboardInterrupt of their own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the trainer's pid, given at spawn: one killed before this line ran is seen as gone
    threading.Thread(target=_exit_with, args=(trainer,), daemon=True).start()
    global _WORKER_BANK
    _WORKER_BANK = LabelBank(paths)


def _worker_sample(make, args, kwargs, seed):
    rng = np.random.default_rng(seed)
    while True:
        s = make(_WORKER_BANK.pick(rng), rng, *args, **kwargs)
        if s is not None:
            return s


@contextmanager
def _one_thread_each():
    """Worker processes read these at start: one thread each, or N workers would each start
    as many BLAS/OpenMP threads as there are cores."""
    old = {k: os.environ.get(k) for k in _ONE_THREAD}
    os.environ.update({k: "1" for k in _ONE_THREAD})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


WORKER_OVERHEAD_BYTES = 200 * 2**20  # an interpreter with numpy and scipy, beside its bank


def available_memory() -> int | None:
    """Bytes the kernel says can be had without swapping (Linux); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_worker_memory(workers: int, bank_bytes: int) -> None:
    """One clear line before N workers, each loading the bank, run the machine out of memory
    (the kernel would kill one mid-run, or the trainer)."""
    per = bank_bytes + WORKER_OVERHEAD_BYTES
    free = available_memory()
    if free is not None and workers * per > 0.9 * free:
        most = int(0.9 * free // per)
        raise BmlError(f"--data-workers {workers} needs about {workers * per / 1e9:.1f} GB (each worker holds the "
                       f"anatomy bank, {per / 1e9:.1f} GB) and {free / 1e9:.1f} GB is available",
                       None, f"use --data-workers {most}" + (" or fewer" if most else " (make the scans in the "
                                                               "training process)"))


class SampleWorkers:
    """Label-driven samples made in `workers` processes while the network trains (one
    segmenter sample costs ~0.35 s of a core at 1.6 mm, ~1.2 s at 1.0 mm: a GPU step would
    otherwise wait on the generator).

    Sample k of stream s is drawn from the seed (*seed, s, k), so a run sees the same samples
    in the same order whatever the number of workers (`seed`: an int, or a tuple such as the
    run's seed and the step it resumed from). Use as a context manager: the workers stop with it."""

    def __init__(self, bank_files, workers: int, seed: int | tuple[int, ...], bank_bytes: int | None = None):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        if workers < 1:
            raise ValueError("SampleWorkers needs at least one worker")
        if bank_bytes is not None:
            check_worker_memory(workers, bank_bytes)
        self.workers = int(workers)
        self.seed = tuple(int(x) for x in (seed if isinstance(seed, tuple) else (seed,)))
        self._started = False  # the processes start at the first submit
        # spawn, not fork: the parent holds torch's thread pools, which a forked child inherits broken
        self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                         initializer=_worker_start, initargs=([str(p) for p in bank_files], os.getpid()))

    def stream(self, make, *args, stream: int = 0, prefetch: int | None = None, **kwargs):
        """A callable giving the stream's next sample (it takes and ignores an rng, so it can
        stand in for `make` in a SamplePool); `prefetch` samples are made ahead."""
        ahead = max(1, prefetch or 2 * self.workers)
        pending: collections.deque = collections.deque()
        count = [0]

        def submit():
            seed = (*self.seed, int(stream), count[0])
            count[0] += 1
            with _one_thread_each() if not self._started else nullcontext():
                pending.append(self._pool.submit(_worker_sample, make, args, kwargs, seed))
            self._started = True

        def next_sample(_rng=None):
            from concurrent.futures.process import BrokenProcessPool

            while len(pending) < ahead:
                submit()
            try:
                sample = pending.popleft().result()
            except BrokenProcessPool:
                raise BmlError("a training-data worker process stopped (out of memory is the usual cause; "
                               "an error of its own is printed above)", None,
                               "use fewer --data-workers, or 0 to make the scans in the training process") from None
            submit()
            return sample

        return next_sample

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def sample_makers(stack, opts, bank: LabelBank, pool_size: int):
    """`maker(fn, *args, stream=0, **kw)` -> the `make(rng)` of a SamplePool, for a sample
    function fn(anatomy, rng, *args, **kw). With opts.extra["data_workers"] = 0 fn runs in this
    process on the pool's rng (the single-process stream that older runs replay); above 0 the
    scans of `stream` come from that many SampleWorkers, held by `stack` (stopped with it) and
    seeded by the run's seed and the step it resumes from."""
    n = int(opts.extra.get("data_workers", 0))
    if not n:
        def in_process(fn, *args, stream: int = 0, **kw):
            return lambda rng: fn(bank.pick(rng), rng, *args, **kw)
        return in_process
    from bmltrt.training.loop import resumed_step  # torch: training only

    workers = stack.enter_context(SampleWorkers(opts.extra["bank"], n,
                                                (opts.seed, resumed_step(opts)), bank.nbytes))

    def from_workers(fn, *args, stream: int = 0, **kw):
        return workers.stream(fn, *args, stream=stream, prefetch=max(2 * n, pool_size), **kw)
    return from_workers


def bank_paths(labels_dir, cache_dir, phantoms: int = 12, knee_variants: int = 6, swaps_per_femur: int = 2,
               seed: int = 0, workers: int = 1, progress=lambda: None):
    """Build or reuse the anatomy bank of `labels_dir` (a folder of label maps; None: phantoms only)."""
    from bmltrt.synth.anatomy import build_bank

    return build_bank(labels_dir, cache_dir, knee_variants=knee_variants, swaps_per_femur=swaps_per_femur,
                      phantoms=phantoms, seed=seed, workers=workers, progress=progress)
