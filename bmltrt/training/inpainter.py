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

import numpy as np
import torch
import torch.nn.functional as F

from bmltrt.errors import BmlError
from bmltrt.models.discriminator import PatchDiscriminator
from bmltrt.models.lama import InpainterConfig, LamaGenerator, composite, inpainter_input
from bmltrt.training import augment
from bmltrt.training.checkpoint import seed_everything
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


def train_inpainter(opts: RunOptions, cfg: InpainterConfig, resolution: int, progress=None) -> dict:
    device = resolve_device(opts.device)
    rng = seed_everything(opts.seed)
    imgs, masks, _ = inpainter_slices(opts.data, "train", resolution, True, opts.limit_cases)
    vimgs, vmasks, _ = inpainter_slices(opts.data, "val", resolution, True, opts.limit_cases)
    if len(imgs) == 0:
        raise BmlError("no healthy training slices with femur", opts.data, "make a dataset with `bmltrt synth`")
    # Pixels are 448/res times the 0.357 mm of the phantoms.
    px_mm = 0.357 * 448 / resolution
    max_dilate = max(1, int(round(MAX_DILATE_MM / px_mm)))
    gen = LamaGenerator(cfg, fft_impl="torch").to(device)
    disc = PatchDiscriminator(ndf=max(16, cfg.ngf)).to(device)
    opt_g = torch.optim.Adam(gen.parameters(), lr=opts.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=opts.lr / 2, betas=(0.5, 0.999))
    w = dict(WEIGHTS, **opts.extra.get("weights", {}))

    def batch():
        idx = rng.integers(0, len(imgs), opts.batch_size)
        x = torch.from_numpy(imgs[idx][:, None]).to(device)
        m = torch.from_numpy(masks[idx][:, None].astype(np.float32)).to(device)
        x, m = augment.random_flips(x, m)
        x = augment.bias_field(x, (0.05, 0.25))
        return x, augment.perturb_mask(m, max_dilate)

    def step(i):
        lr_scale = max(0.1, 1 - i / max(1, opts.steps))
        for o, base in ((opt_g, opts.lr), (opt_d, opts.lr / 2)):
            for g in o.param_groups:
                g["lr"] = base * lr_scale
        x, m = batch()
        fake = composite(x, m, gen(inpainter_input(x, m)))
        # Discriminator: non-saturating loss + R1 penalty on real slices.
        x_req = x.detach().requires_grad_(True)
        d_real, _ = disc(x_req)
        d_fake, _ = disc(fake.detach())
        loss_d = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        grad, = torch.autograd.grad(d_real.sum(), x_req, create_graph=True)
        r1 = grad.pow(2).flatten(1).sum(1).mean()
        opt_d.zero_grad(set_to_none=True)
        (loss_d + w["r1"] * 0.5 * r1).backward()
        opt_d.step()
        # Generator.
        d_fake, f_fake = disc(fake)
        with torch.no_grad():
            _, f_real = disc(x)
        adv = F.softplus(-d_fake).mean()
        fm = sum(F.l1_loss(a, b) for a, b in zip(f_fake, f_real)) / len(f_real)
        l1m = masked_l1(fake, x, m)
        l1k = masked_l1(fake, x, 1 - m)
        pyr = pyramid_l1(fake, x, m)
        loss_g = w["l1_mask"] * l1m + w["l1_known"] * l1k + w["pyramid"] * pyr + w["adv"] * adv + w["fm"] * fm
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        return {"loss_g": float(loss_g.detach()), "loss_d": float(loss_d.detach()), "l1_mask": float(l1m.detach())}

    def validate():
        if len(vimgs) == 0:
            return {}
        l1s, ps = [], []
        for s in range(0, len(vimgs), 16):
            x = torch.from_numpy(vimgs[s:s + 16][:, None]).to(device)
            m = torch.from_numpy(vmasks[s:s + 16][:, None].astype(np.float32)).to(device)
            out = composite(x, m, gen(inpainter_input(x, m)))
            l1s.append(float(masked_l1(out, x, m)) * len(x))
            ps.append(psnr(out, x, m) * len(x))
        n = len(vimgs)
        return {"val_masked_l1": sum(l1s) / n, "val_psnr": sum(ps) / n}

    return run_loop(opts, "inpainter", {"inpainter": cfg.to_dict(), "resolution": resolution},
                    {"gen": gen, "disc": disc}, {"opt_g": opt_g, "opt_d": opt_d}, step, validate, rng, progress)
