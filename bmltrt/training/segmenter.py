"""Train the 3D UNet++ femur segmenter: Dice + cross-entropy on random crops with flips,
SynthSeg-like contrast randomisation and random bias field."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from bmltrt.errors import BmlError
from bmltrt.models.unetpp import SegmenterConfig, SegmenterLogits, build_segmenter
from bmltrt.runtime.sliding_window import sliding_window
from bmltrt.training import augment
from bmltrt.training.checkpoint import seed_everything
from bmltrt.training.data import segmenter_volumes
from bmltrt.training.loop import RunOptions, resolve_device, run_loop


def dice_ce_loss(logits, target):
    """Cross-entropy + soft Dice of the femur class; deep-supervision outputs averaged."""
    outs = logits if isinstance(logits, (list, tuple)) else [logits]
    total = 0.0
    for lg in outs:
        ce = F.cross_entropy(lg, target[:, 0].long())
        p = torch.softmax(lg, 1)[:, 1:2]
        inter = (p * target).sum()
        dice = (2 * inter + 1) / (p.sum() + target.sum() + 1)
        total = total + ce + (1 - dice)
    return total / len(outs)


def random_crops(vols, patch, batch, rng: np.random.Generator):
    """Crops of `patch` from random volumes, biased to contain femur half the time."""
    xs, ys = [], []
    for _ in range(batch):
        _, img, fem, _ = vols[int(rng.integers(len(vols)))]
        pads = [(0, max(0, p - s)) for p, s in zip(patch, img.shape)]
        if any(b for _, b in pads):
            img, fem = np.pad(img, pads), np.pad(fem, pads)
        if rng.random() < 0.5 and fem.any():
            c = np.argwhere(fem > 0)[int(rng.integers(int((fem > 0).sum())))]
            lo = [int(np.clip(ci - p // 2, 0, s - p)) for ci, p, s in zip(c, patch, img.shape)]
        else:
            lo = [int(rng.integers(0, s - p + 1)) for p, s in zip(patch, img.shape)]
        sl = tuple(slice(a, a + p) for a, p in zip(lo, patch))
        xs.append(img[sl])
        ys.append(fem[sl])
    return np.stack(xs)[:, None], np.stack(ys)[:, None]


def train_segmenter(opts: RunOptions, cfg: SegmenterConfig, progress=None) -> dict:
    device = resolve_device(opts.device)
    rng = seed_everything(opts.seed)
    train = segmenter_volumes(opts.data, "train", cfg.inplane_spacing_mm, opts.limit_cases)
    val = segmenter_volumes(opts.data, "val", cfg.inplane_spacing_mm, opts.limit_cases)
    if not train:
        raise BmlError("no training cases", opts.data, "make a dataset with `bmltrt synth`")
    # Working-grid voxel size for the lesion-like blobs (one dataset, one slice thickness).
    spacing = train[0][3]
    net = build_segmenter(cfg).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=opts.lr, weight_decay=1e-5)

    def step(i):
        x, y = random_crops(train, cfg.patch, opts.batch_size, rng)
        x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        x, y = augment.random_flips(x, y, dims=(-3, -1))  # left-right and anterior-posterior
        x = augment.lesion_like_blobs(x, y, spacing)
        x = augment.bias_field(augment.contrast_randomisation(x))
        loss = dice_ce_loss(net(x), y)
        for g in opt.param_groups:  # linear decay, a pure function of the step (resumable)
            g["lr"] = opts.lr * max(0.05, 1 - i / max(1, opts.steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach())}

    wrapped = SegmenterLogits(net)

    def predict(batch):
        with torch.no_grad():
            return wrapped(torch.from_numpy(batch).to(device)).float().cpu().numpy()

    def validate():
        dices = []
        for _, img, fem, _ in val:
            prob = sliding_window(img, cfg.patch, predict, batch_size=2, overlap=cfg.overlap)[1]
            pred = prob > 0.5
            t = fem > 0.5
            dices.append(2 * (pred & t).sum() / max(1, pred.sum() + t.sum()))
        return {"val_dice": float(np.mean(dices)) if dices else float("nan")}

    return run_loop(opts, "segmenter", {"segmenter": cfg.to_dict()}, {"net": net}, {"opt": opt},
                    step, validate, rng, progress)
