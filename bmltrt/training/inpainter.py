"""Train the LaMa generator GAN-style on healthy slices, femur masked out.

Losses, as LaMa's, with what cannot be had here replaced:
- L1 reconstruction weighted to the masked region (and lightly on the known region);
- non-saturating adversarial loss against a PatchGAN, R1 gradient penalty on real slices;
- discriminator feature matching;
- LaMa's high-receptive-field perceptual loss needs an ADE20k-pretrained ResNet that
  cannot be downloaded. It stands in: a multi-scale (Gaussian pyramid) L1 on the masked
  region. What the anomaly map needs from the generator is the healthy marrow's local
  intensity level at several scales, not semantic realism — the pyramid loss asks for
  exactly that, and feature matching supplies the texture statistics.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bmltrt.errors import BmlError
from bmltrt.models.discriminator import PatchDiscriminator
from bmltrt.models.lama import InpainterConfig, LamaGenerator, composite, inpainter_input
from bmltrt.training import augment
from bmltrt.training.checkpoint import load_weights, seed_everything
from bmltrt.training.data import inpainter_slices
from bmltrt.training.loop import RunOptions, resolve_device, run_loop

WEIGHTS = {"l1_mask": 10.0, "l1_known": 1.0, "pyramid": 10.0, "adv": 0.1, "fm": 10.0, "r1": 1e-3}
MAX_DILATE_MM = 3.0


def pyramid_l1(a, b, mask, levels=4):
    loss = 0.0
    for _ in range(levels):
        w = mask.sum().clamp(min=1.0)
        loss = loss + ((a - b).abs() * mask).sum() / w
        a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
        mask = F.avg_pool2d(mask, 2)
    return loss / levels


def masked_l1(a, b, mask):
    return ((a - b).abs() * mask).sum() / mask.sum().clamp(min=1.0)


def psnr(a, b, mask, peak=1.0):
    mse = (((a - b) ** 2) * mask).sum() / mask.sum().clamp(min=1.0)
    return float(10 * torch.log10(peak ** 2 / mse.clamp(min=1e-10)))


def batch_size_at(res: int, base_batch: int, base_res: int = 256) -> int:
    """Batch size that keeps the pixels per step of `base_batch` slices at `base_res`."""
    return max(2, int(round(base_batch * (base_res / res) ** 2)))


def train_inpainter(opts: RunOptions, cfg: InpainterConfig, resolutions, progress=None) -> dict:
    """Train one generator on healthy slices at one or several resolutions.

    Slices come from label-driven scans of the anatomy bank (opts.extra["bank"]) and/or a
    phantom dataset (opts.data). With several resolutions each step draws one of them
    (one set of weights serves all: the FFC is resolution-robust, and the DFT matrices are
    made per resolution at export), with the batch scaled to keep the step's cost.
    """
    with contextlib.ExitStack() as stack:  # holds the data workers, stopped however the run ends
        return _train_inpainter(opts, cfg, resolutions, progress, stack)


def _train_inpainter(opts: RunOptions, cfg: InpainterConfig, resolutions, progress, stack: contextlib.ExitStack) -> dict:
    from bmltrt.synth.labelgen import inpainter_sample
    from bmltrt.training.data import LabelBank, SamplePool, sample_makers

    resolutions = [int(r) for r in (resolutions if isinstance(resolutions, (list, tuple)) else [resolutions])]
    device = resolve_device(opts.device)
    rng = seed_everything(opts.seed)
    bank_files = opts.extra.get("bank") or []
    frac = float(opts.extra.get("phantom_fraction", 0.0 if bank_files else 1.0)) if opts.data else 0.0
    phantom = {}
    if opts.data and frac > 0:
        for r in resolutions:
            imgs, masks, _ = inpainter_slices(opts.data, "train", r, True, opts.limit_cases)
            if len(imgs):
                phantom[r] = (imgs, masks)
    if not phantom and not bank_files:
        raise BmlError("no healthy training slices with femur: give label maps (--labels) or a phantom dataset",
                       opts.data, "make a dataset with `bmltrt synth`")
    if not phantom:
        frac = 0.0
    pools, gen_val = {}, []
    if bank_files:
        bank = LabelBank(bank_files)
        size = int(opts.extra.get("pool", min(96, max(4, opts.steps * opts.batch_size // 4))))
        refresh = int(opts.extra.get("refresh", 2))
        maker = sample_makers(stack, opts, bank, size)
        for r in resolutions:  # one stream of scans per resolution, named by it
            pools[r] = SamplePool(maker(inpainter_sample, r, stream=r), size, refresh, rng)
        vrng = np.random.default_rng(12345)
        vres = 256 if 256 in resolutions else resolutions[0]
        while len(gen_val) < int(opts.extra.get("gen_val", min(32, max(2, opts.steps // 10)))):
            smp = inpainter_sample(bank.pick(vrng), vrng, vres)
            if smp is not None:
                gen_val.append((smp.image, smp.femur))
    val_root = opts.extra.get("val_data") or opts.data
    vres = 256 if 256 in resolutions else resolutions[0]
    vimgs, vmasks, _ = inpainter_slices(val_root, "val", vres, True, opts.limit_cases) if val_root else ([], [], [])
    if len(vimgs) > 96:  # evenly spaced slices keep each validation short on a CPU
        keep = np.linspace(0, len(vimgs) - 1, 96).astype(int)
        vimgs, vmasks = vimgs[keep], vmasks[keep]
    gen = LamaGenerator(cfg, fft_impl="torch").to(device)
    init = opts.extra.get("init")
    if init:  # start from another run's (or a shipped graph's) weights: fine-tuning
        try:
            try:
                gen.load_state_dict(load_weights(init, "inpainter", "gen"))  # strict: names and shapes
            except RuntimeError:
                raise BmlError("--init does not fit this inpainter config (other weights or shapes)", init,
                               "give --config of that run") from None
        except RuntimeError:
            raise BmlError("--init does not fit this generator config", init, "give --config of that run") from None
        if Path(init).suffix == ".onnx":
            gen.freeze_bn()  # its BatchNorms are folded into the convolutions: exact in eval mode only
    disc = PatchDiscriminator(ndf=max(16, cfg.ngf)).to(device)
    opt_g = torch.optim.Adam(gen.parameters(), lr=opts.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=opts.lr / 2, betas=(0.5, 0.999))
    w = dict(WEIGHTS, **opts.extra.get("weights", {}))
    amp = opts.extra.get("autocast", "none") == "bf16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    # Resolutions drawn evenly; the batch scales so each resolution gets the same compute.
    p_res = np.ones(len(resolutions)) / len(resolutions)

    skipped = [0]

    def _finite_step(opt, module):
        """Skip an update whose gradient is not finite (it would poison Adam's state)."""
        if all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None):
            opt.step()
        else:
            skipped[0] += 1

    def batch():
        res = resolutions[int(rng.choice(len(resolutions), p=p_res))]
        n = batch_size_at(res, opts.batch_size) if len(resolutions) > 1 else opts.batch_size
        n_ph = 0
        if res in phantom:
            n_ph = int(rng.binomial(n, frac)) if pools else n
        xs, ms = [], []
        if n_ph:
            imgs, masks = phantom[res]
            idx = rng.integers(0, len(imgs), n_ph)
            xs.append(imgs[idx]), ms.append(masks[idx].astype(np.float32))
        if n - n_ph:
            items = pools[res].draw(n - n_ph)
            xs.append(np.stack([s.image for s in items])), ms.append(np.stack([s.femur for s in items]).astype(np.float32))
        x = torch.from_numpy(np.concatenate(xs)[:, None]).to(device)
        m = torch.from_numpy(np.concatenate(ms)[:, None]).to(device)
        x, m = augment.random_flips(x, m)
        x = augment.bias_field(x, (0.05, 0.25))
        # Pixels are FOV/res: about 160 mm / res (OAI-like field of view).
        max_dilate = max(1, int(round(MAX_DILATE_MM / (160.0 / res))))
        return x, augment.perturb_mask(m, max_dilate)

    def step(i):
        lr_scale = max(0.1, 1 - i / max(1, opts.steps))
        for o, base in ((opt_g, opts.lr), (opt_d, opts.lr / 2)):
            for g in o.param_groups:
                g["lr"] = base * lr_scale
        x, m = batch()
        with autocast():
            generated = gen(inpainter_input(x, m))
        fake = composite(x, m, generated.float())
        # Discriminator: non-saturating loss + R1 penalty on real slices (float32: the
        # penalty's double backward).
        x_req = x.detach().requires_grad_(True)
        d_real, _ = disc(x_req)
        with autocast():
            d_fake, _ = disc(fake.detach())
        d_fake = d_fake.float()
        loss_d = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        grad, = torch.autograd.grad(d_real.sum(), x_req, create_graph=True)
        r1 = grad.pow(2).flatten(1).sum(1).mean()
        opt_d.zero_grad(set_to_none=True)
        (loss_d + w["r1"] * 0.5 * r1).backward()
        _finite_step(opt_d, disc)
        # Generator.
        with autocast():
            d_fake, f_fake = disc(fake)
            with torch.no_grad():
                _, f_real = disc(x)
        d_fake, f_fake, f_real = d_fake.float(), [f.float() for f in f_fake], [f.float() for f in f_real]
        adv = F.softplus(-d_fake).mean()
        fm = sum(F.l1_loss(a, b) for a, b in zip(f_fake, f_real)) / len(f_real)
        l1m = masked_l1(fake, x, m)
        l1k = masked_l1(fake, x, 1 - m)
        pyr = pyramid_l1(fake, x, m)
        loss_g = w["l1_mask"] * l1m + w["l1_known"] * l1k + w["pyramid"] * pyr + w["adv"] * adv + w["fm"] * fm
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        _finite_step(opt_g, gen)
        return {"loss_g": float(loss_g.detach()), "loss_d": float(loss_d.detach()), "l1_mask": float(l1m.detach()),
                "skipped_steps": float(skipped[0])}

    def scores(imgs, masks, prefix):
        if len(imgs) == 0:
            return {}
        l1s, ps = [], []
        for s in range(0, len(imgs), 16):
            x = torch.from_numpy(np.asarray(imgs[s:s + 16])[:, None]).to(device)
            m = torch.from_numpy(np.asarray(masks[s:s + 16])[:, None].astype(np.float32)).to(device)
            out = composite(x, m, gen(inpainter_input(x, m)))
            l1s.append(float(masked_l1(out, x, m)) * len(x))
            ps.append(psnr(out, x, m) * len(x))
        n = len(imgs)
        return {f"{prefix}_masked_l1": sum(l1s) / n, f"{prefix}_psnr": sum(ps) / n}

    def validate():
        out = scores(vimgs, vmasks, "val")
        if gen_val:
            out.update(scores([a for a, _ in gen_val], [b for _, b in gen_val], "gen"))
        return out

    config = {"inpainter": cfg.to_dict(), "resolution": resolutions[0] if len(resolutions) == 1 else None,
              "resolutions": resolutions, "bank": [str(p) for p in bank_files], "phantom_fraction": frac,
              "data": str(opts.data) if opts.data else None, "autocast": "bf16" if amp else "none",
              "init": str(init) if init else None, "frozen_bn": gen.frozen_bn,
              "data_workers": int(opts.extra.get("data_workers", 0)), "fresh_per_step": int(opts.extra.get("refresh", 2))}
    return run_loop(opts, "inpainter", config, {"gen": gen, "disc": disc}, {"opt_g": opt_g, "opt_d": opt_d},
                    step, validate, rng, progress,
                    select=("gen_masked_l1", "min"))
