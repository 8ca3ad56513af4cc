"""Train the 3D UNet++ femur segmenter: Dice + cross-entropy on random crops with flips,
SynthSeg-like contrast randomisation and random bias field."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bmltrt.errors import BmlError
from bmltrt.models.unetpp import SegmenterConfig, SegmenterLogits, build_segmenter
from bmltrt.pipeline import SEG_ANTIALIAS
from bmltrt.training import augment
from bmltrt.training.checkpoint import load_weights, seed_everything
from bmltrt.training.data import segmenter_grid_scores, segmenter_volumes
from bmltrt.training.loop import RunOptions, resolve_device, run_loop


def outer_shell(target):
    """The one-voxel in-plane ring just outside the femur of `target` (B,1,D,H,W), bool."""
    grown = F.max_pool3d(target.float(), kernel_size=(1, 3, 3), stride=1, padding=(0, 1, 1))
    return (grown > 0.5) & (target < 0.5)


def as_outputs(logits) -> list:
    """The network's outputs as a list (UNet++ with deep supervision returns several)."""
    return list(logits) if isinstance(logits, (list, tuple)) else [logits]


def dice_ce_loss(logits, target, lesion=None, lesion_weight: float = 0.0, shell_weight: float = 0.0):
    """Cross-entropy + soft Dice of the femur class; deep-supervision outputs averaged.

    `lesion` (B,1,D,H,W) marks lesion voxels (femur in `target`); with `lesion_weight` > 0
    their mean cross-entropy is added with that weight. They are a tiny share of the femur,
    so plain Dice + CE barely notices a lesion carved out of the mask, yet a lesion outside
    the mask is never repainted, so never found. Alone, that term teaches the network to
    grow the femur (measured: Dice 0.97 -> 0.80); `shell_weight` > 0 adds the mean
    cross-entropy of the ring just outside the true femur, so a border pushed outwards
    costs as much as one pushed in.
    """
    outs = as_outputs(logits)
    weighted = lesion is not None and lesion_weight > 0 and bool(lesion.any())
    shell = outer_shell(target)[:, 0] if shell_weight > 0 else None
    shelled = shell is not None and bool(shell.any())
    total = 0.0
    for lg in outs:
        ce_map = F.cross_entropy(lg, target[:, 0].long(), reduction="none")
        ce = ce_map.mean()
        p = torch.softmax(lg, 1)[:, 1:2]
        inter = (p * target).sum()
        dice = (2 * inter + 1) / (p.sum() + target.sum() + 1)
        total = total + ce + (1 - dice)
        if weighted:
            les = lesion[:, 0].to(ce_map.dtype)
            total = total + lesion_weight * (ce_map * les).sum() / les.sum()
        if shelled:
            sh = shell.to(ce_map.dtype)
            total = total + shell_weight * (ce_map * sh).sum() / sh.sum()
    return total / len(outs)


def consistency_loss(logits_a, logits_b):
    """Mean squared difference of the femur probabilities of two scans of the same knee,
    over the voxels either calls femur-ish (> 0.05): the background, where both agree
    anyway, would dilute it to nothing. Deep-supervision outputs averaged."""
    outs_a, outs_b = as_outputs(logits_a), as_outputs(logits_b)
    total = 0.0
    for la, lb in zip(outs_a, outs_b):
        pa, pb = torch.softmax(la, 1)[:, 1], torch.softmax(lb, 1)[:, 1]
        near = ((pa > 0.05) | (pb > 0.05)).detach().to(pa.dtype)
        total = total + ((pa - pb) ** 2 * near).sum() / near.sum().clamp(min=1.0)
    return total / len(outs_a)


def near_lesions(lesion, margin=(1, 3, 3)):
    """Voxels within `margin` (slices, rows, columns) of a lesion of `lesion` (B,1,D,H,W), as
    (B,D,H,W) float: where a lesion-scoped anchor holds the network to its teacher."""
    k = tuple(2 * m + 1 for m in margin)
    return F.max_pool3d(lesion.float(), kernel_size=k, stride=1, padding=margin)[:, 0]


def anchor_drift(logits, held, region=None):
    """How far the femur probability of `logits` drifted from the frozen teacher's `held`:
    over the femur-ish voxels (consistency_loss), or, with `region` (B,D,H,W), over that
    region only, so the rest of the border may move (0 where the batch has no region)."""
    if region is None:
        return consistency_loss(logits, held)
    p, q = torch.softmax(as_outputs(logits)[-1], 1)[:, 1], torch.softmax(held, 1)[:, 1]
    return ((p - q) ** 2 * region).sum() / region.sum().clamp(min=1.0)


def random_crops(vols, patch, batch, rng: np.random.Generator, with_lesions: bool = False,
                 with_pairs: bool = False):
    """Crops of `patch` from random volumes, biased to contain femur half the time (and, for
    volumes with lesions, a lesion a quarter of the time). Items are (name, image, femur,
    spacing[, lesion or None[, second image]]); with `with_lesions` the lesion crops come
    back too, with `with_pairs` then the second image's crops (at the same place)."""
    xs, ys, ls, x2s = [], [], [], []
    for _ in range(batch):
        item = vols[int(rng.integers(len(vols)))]
        img, fem = item[1], item[2]
        les = item[4] if len(item) > 4 and item[4] is not None else np.zeros(img.shape, bool)
        img2 = item[5] if with_pairs else None
        pads = [(0, max(0, p - s)) for p, s in zip(patch, img.shape)]
        if any(b for _, b in pads):
            img, fem, les = np.pad(img, pads), np.pad(fem, pads), np.pad(les, pads)
            img2 = None if img2 is None else np.pad(img2, pads)
        u = rng.random()
        centre_on = les if (u < 0.25 and les.any()) else fem if (u < 0.5 and fem.any()) else None
        if centre_on is not None:
            pts = np.argwhere(centre_on > 0)
            c = pts[int(rng.integers(len(pts)))]
            lo = [int(np.clip(ci - p // 2, 0, s - p)) for ci, p, s in zip(c, patch, img.shape)]
        else:
            lo = [int(rng.integers(0, s - p + 1)) for p, s in zip(patch, img.shape)]
        sl = tuple(slice(a, a + p) for a, p in zip(lo, patch))
        xs.append(img[sl])
        ys.append(fem[sl])
        ls.append(les[sl])
        if img2 is not None:
            x2s.append(img2[sl])
    out = (np.stack(xs)[:, None], np.stack(ys)[:, None])
    if with_lesions:
        out += (np.stack(ls)[:, None],)
        if with_pairs:
            out += (np.stack(x2s)[:, None],)
    return out


def _bank_crops(pool, patch, batch, rng, pairs: bool = False):
    vols = [(None, smp.image, smp.femur, smp.spacing, smp.lesion, smp.image2) for smp in pool.draw(batch)]
    return random_crops(vols, patch, batch, rng, with_lesions=True, with_pairs=pairs)


def train_segmenter(opts: RunOptions, cfg: SegmenterConfig, progress=None) -> dict:
    """Train on label-driven scans of the anatomy bank (opts.extra["bank"]) and/or a phantom
    dataset (opts.data); `phantom_fraction` of each batch comes from the phantom dataset.
    opts.extra["data_workers"] > 0 makes the label-driven scans in that many processes."""
    with contextlib.ExitStack() as stack:  # holds the data workers, stopped however the run ends
        return _train_segmenter(opts, cfg, progress, stack)


def _train_segmenter(opts: RunOptions, cfg: SegmenterConfig, progress, stack: contextlib.ExitStack) -> dict:
    from bmltrt.synth.labelgen import DARK_MUSCLE_P, segmenter_sample
    from bmltrt.training.data import LabelBank, SamplePool, sample_makers

    device = resolve_device(opts.device)
    rng = seed_everything(opts.seed)
    bank_files = opts.extra.get("bank") or []
    # > 0: that share of generated scans is smoothed as the runtime smooths a fine scan before
    # the segmenter's grid (DetectConfig.seg_antialias), and the phantom and validation scans
    # go through the runtime's own resampling: the network learns the input it will get
    # (trained without it, it carved blurred bright lesions out of the femur)
    smoothing_p = float(opts.extra.get("runtime_smoothing_p", 0.0))
    antialias = SEG_ANTIALIAS if smoothing_p > 0 else 0.0
    train = segmenter_volumes(opts.data, "train", cfg.inplane_spacing_mm, opts.limit_cases,
                              antialias=antialias) if opts.data else []
    val_root = opts.extra.get("val_data") or opts.data
    val = segmenter_volumes(val_root, "val", cfg.inplane_spacing_mm, opts.limit_cases, lesions=True,
                            antialias=antialias) if val_root else []
    if not train and not bank_files:
        raise BmlError("no training data: give label maps (--labels) or a phantom dataset (--data)",
                       opts.data, "make a dataset with `bmltrt synth`")
    frac = float(opts.extra.get("phantom_fraction", 0.0 if bank_files else 1.0)) if train else 0.0
    # the generator's lesion settings (label-driven scans only), also kept in the config
    lesion_p, max_les = float(opts.extra.get("lesion_p", 0.5)), int(opts.extra.get("max_lesions", 3))
    surface_p = float(opts.extra.get("lesion_surface_p", 0.0))
    breach_p = float(opts.extra.get("lesion_breach_p", 0.0))
    dark_p = float(opts.extra.get("dark_muscle_p", DARK_MUSCLE_P))
    fat_p = float(opts.extra.get("fat_like_marrow_p", 0.0))
    lesion_kw = dict(lesion_p=lesion_p, max_lesions=max_les, surface_p=surface_p, breach_p=breach_p,
                     dark_muscle_p=dark_p, smoothing_p=smoothing_p, antialias=antialias,
                     fat_like_marrow_p=fat_p)
    lesion_weight = float(opts.extra.get("lesion_weight", 0.0))
    shell_weight = float(opts.extra.get("shell_weight", 0.0))
    # > 0: each generated scan comes in two contrasts, and their femur probabilities are
    # pulled together (the same knee must get the same femur in every echo)
    consistency_weight = float(opts.extra.get("consistency_weight", 0.0))
    pairs = consistency_weight > 0
    # > 0: a frozen copy of the --init network is the teacher, and the squared difference of
    # the two femur probabilities near the femur is added with this weight, so that a short
    # fine-tune keeps what the starting network did well (which lesions it keeps as femur)
    anchor_weight = float(opts.extra.get("anchor_weight", 0.0))
    # "lesions": only near the generated lesions (keep which lesions it calls femur, let the
    # rest of the border follow the consistency loss); "all": every femur-ish voxel
    anchor_scope = opts.extra.get("anchor_scope", "all")
    if anchor_weight > 0 and not opts.extra.get("init"):
        raise ValueError("anchor_weight needs init (the CLI says so before any output is made)")
    pool = None
    gen_val = []
    if bank_files:
        bank = LabelBank(bank_files)
        px = cfg.inplane_spacing_mm
        size = int(opts.extra.get("pool", min(24, max(2, opts.steps * opts.batch_size // 8))))
        make = sample_makers(stack, opts, bank, size)(segmenter_sample, px, paired=pairs, **lesion_kw)
        pool = SamplePool(make, size, int(opts.extra.get("refresh", 1)), rng)
        vrng = np.random.default_rng(12345)  # the same generated validation scans every time
        gen_val = [(f"gen{i}", smp.image, smp.femur, smp.spacing, smp.lesion)
                   for i, smp in enumerate(segmenter_sample(bank.pick(vrng), vrng, px, **lesion_kw)
                                           for _ in range(int(opts.extra.get("gen_val", min(6, max(1, opts.steps // 100))))))]
    # bfloat16 autocast and channels-last 3D: 2x faster steps on a CPU with AVX512-BF16
    # (measured: 3.3 -> 1.6 s per batch of two 16x112x112 patches, one core).
    amp = opts.extra.get("autocast", "none") == "bf16"
    fmt = torch.channels_last_3d if amp else torch.contiguous_format
    net = build_segmenter(cfg).to(device).to(memory_format=fmt)
    if opts.extra.get("init"):  # start from another run's weights (fine-tuning)
        weights = load_weights(opts.extra["init"], "segmenter", "net")
        try:
            missing, unexpected = net.load_state_dict(weights, strict=False)
        except RuntimeError:  # a weight of another shape: another --config
            raise BmlError("--init does not fit this segmenter config (weights of other shapes)", opts.extra["init"],
                           "give --config of that run (export/segmenter.onnx: --config cpu)") from None
        # An exported graph holds only the weights its output uses (no deep-supervision
        # heads); a checkpoint must match exactly.
        if unexpected or (missing and Path(opts.extra["init"]).suffix != ".onnx"):
            raise BmlError(f"--init does not fit this segmenter config ({len(missing)} weights missing, "
                           f"{len(unexpected)} unexpected)", opts.extra["init"],
                           "give --config of that run (export/segmenter.onnx: --config cpu)")
    opt = torch.optim.AdamW(net.parameters(), lr=opts.lr, weight_decay=1e-5)
    teacher = None
    if anchor_weight > 0:
        teacher = SegmenterLogits(copy.deepcopy(net)).eval().requires_grad_(False)

    skipped = [0]

    def phantom_batch(n):
        x, y = random_crops(train, cfg.patch, n, rng)
        x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        x, y = augment.random_flips(x, y, dims=(-3, -1))  # left-right and anterior-posterior
        x = augment.lesion_like_blobs(x, y, train[0][3])
        return augment.bias_field(augment.contrast_randomisation(x)), y

    def step(i):
        n_ph = int(rng.binomial(opts.batch_size, frac)) if pool is not None else opts.batch_size
        xs, ys, ls = [], [], []
        n_bank = opts.batch_size - n_ph
        if n_ph:
            x, y = phantom_batch(n_ph)
            xs.append(x), ys.append(y), ls.append(torch.zeros_like(y, dtype=torch.bool))
        if n_bank:
            # Appearance, lesions and left/right are in the generator already.
            x, y, les, *second = _bank_crops(pool, cfg.patch, n_bank, rng, pairs)
            xs.append(torch.from_numpy(x).to(device)), ys.append(torch.from_numpy(y).to(device))
            ls.append(torch.from_numpy(les).to(device))
            if second:  # the same crops in the second contrast, last in the batch
                xs.append(torch.from_numpy(second[0]).to(device)), ys.append(ys[-1]), ls.append(ls[-1])
        x, y, les = torch.cat(xs).contiguous(memory_format=fmt), torch.cat(ys), torch.cat(ls)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = net(x)
        outs = [lg.float() for lg in as_outputs(logits)]
        loss = dice_ce_loss(outs, y, les, lesion_weight, shell_weight)
        extra = {}
        if pairs and n_bank:
            cons = consistency_loss([lg[-2 * n_bank:-n_bank] for lg in outs], [lg[-n_bank:] for lg in outs])
            loss = loss + consistency_weight * cons
            extra["consistency"] = float(cons.detach())
        if teacher is not None:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                held = teacher(x).float()
            drift = anchor_drift(outs[-1], held, near_lesions(les) if anchor_scope == "lesions" else None)
            loss = loss + anchor_weight * drift
            extra["anchor"] = float(drift.detach())
        for g in opt.param_groups:  # linear decay, a pure function of the step (resumable)
            g["lr"] = opts.lr * max(0.05, 1 - i / max(1, opts.steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # A non-finite gradient would poison every weight through Adam: skip that step.
        finite = all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
        if finite:
            opt.step()
        skipped[0] += not finite
        return {"loss": float(loss.detach()), "skipped_steps": float(skipped[0]), **extra}

    wrapped = SegmenterLogits(net)

    def predict(batch):
        with torch.no_grad():
            return wrapped(torch.from_numpy(batch).to(device)).float().cpu().numpy()

    def mean_dice(vols):
        return segmenter_grid_scores(vols, predict, cfg.patch, cfg.overlap)

    def validate():
        out = {}
        if val:
            out["val_dice"], cover = mean_dice(val)
            if cover is not None:
                out["val_lesion_in_femur"] = cover
        if gen_val:
            out["gen_dice"], cover = mean_dice(gen_val)
            if cover is not None:
                out["gen_lesion_in_femur"] = cover
        return out

    config = {"segmenter": cfg.to_dict(), "bank": [str(p) for p in bank_files], "phantom_fraction": frac,
              "init": str(opts.extra.get("init")) if opts.extra.get("init") else None,
              "lesion_p": lesion_p, "max_lesions": max_les, "lesion_surface_p": surface_p,
              "lesion_breach_p": breach_p, "dark_muscle_p": dark_p,
              "runtime_smoothing_p": smoothing_p, "seg_antialias": antialias, "fat_like_marrow_p": fat_p,
              "lesion_weight": lesion_weight, "shell_weight": shell_weight,
              "consistency_weight": consistency_weight, "anchor_weight": anchor_weight, "anchor_scope": anchor_scope, "data": str(opts.data) if opts.data else None, "val_data": str(val_root) if val_root else None,
              "autocast": "bf16" if amp else "none", "data_workers": int(opts.extra.get("data_workers", 0)),
              "fresh_per_step": int(opts.extra.get("refresh", 1))}
    return run_loop(opts, "segmenter", config, {"net": net}, {"opt": opt}, step, validate, rng, progress,
                    select=("gen_dice", "max"))
