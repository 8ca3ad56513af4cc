"""Augmentation on torch batches (CPU or GPU). Random numbers come from the torch RNG,
whose state is checkpointed, so a resumed run repeats the uninterrupted one."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_flips(*tensors, dims=(-2, -1)):
    """The same random flips (per sample, per axis) applied to all tensors."""
    b = tensors[0].shape[0]
    outs = list(tensors)
    for d in dims:
        flip = torch.rand(b) < 0.5
        if flip.any():
            idx = flip.nonzero().flatten()
            outs = [t.index_copy(0, idx.to(t.device), t[idx.to(t.device)].flip(d)) for t in outs]
    return outs


def bias_field(x, strength=(0.1, 0.3), coarse=4):
    """Multiply by exp(smooth random field): the coil shading of real scans."""
    b = x.shape[0]
    spatial = x.shape[2:]
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    small = torch.randn((b, 1) + (coarse,) * len(spatial))
    s = torch.empty(b).uniform_(*strength).view(b, *([1] * (len(spatial) + 1)))
    field = F.interpolate(small, size=spatial, mode=mode, align_corners=True).to(x.device)
    field = field / (field.abs().amax(dim=tuple(range(1, field.ndim)), keepdim=True) + 1e-6)
    return x * torch.exp(s.to(x.device) * field)


def contrast_randomisation(x, n_knots=8, hi=1.5):
    """SynthSeg-like contrast randomisation without tissue labels.

    Phantoms have one contrast; real scans do not. A random piecewise-linear intensity
    map per sample gives each tissue (each intensity range) a random new intensity, so
    the segmenter must rely on shape and context. Then random gamma, blur and noise.
    """
    b = x.shape[0]
    knots_x = torch.linspace(0, hi, n_knots)
    knots_y = torch.rand(b, n_knots) * hi
    # Keep the original contrast for a third of the samples.
    keep = torch.rand(b) < 0.33
    knots_y[keep] = knots_x
    xc = x.clamp(0, hi)
    pos = xc / hi * (n_knots - 1)
    i0 = pos.floor().clamp(max=n_knots - 2).long()
    w = pos - i0
    ky = knots_y.to(x.device).view(b, n_knots)
    flat_i0 = i0.view(b, -1)
    y0 = torch.gather(ky, 1, flat_i0).view_as(x)
    y1 = torch.gather(ky, 1, flat_i0 + 1).view_as(x)
    y = y0 + w * (y1 - y0)
    gamma = torch.exp(torch.empty(b).uniform_(-0.4, 0.4)).to(x.device).view(b, *([1] * (x.ndim - 1)))
    y = (y / hi).clamp(0, 1) ** gamma * hi
    sig = float(torch.empty(1).uniform_(0, 1.0))
    if sig > 0.3:
        y = _blur(y, sig)
    noise = torch.empty(b).uniform_(0, 0.05).view(b, *([1] * (x.ndim - 1)))
    return y + noise.to(x.device) * torch.randn(x.shape).to(x.device)


def _blur(x, sigma):
    r = max(1, int(round(2 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x.device)
    nd = x.ndim - 2
    conv = F.conv3d if nd == 3 else F.conv2d
    for ax in range(nd):
        shape = [1, 1] + [1] * nd
        shape[2 + ax] = 2 * r + 1
        pad = [0, 0] * nd
        pad[2 * (nd - 1 - ax)] = pad[2 * (nd - 1 - ax) + 1] = r
        x = conv(F.pad(x, pad, mode="replicate"), k.view(shape))
    return x


def perturb_mask(mask, max_dilate_px: int, p_blob: float = 0.5):
    """Randomly dilate the femur mask and add smooth blobs along its edge, so the
    generator does not learn where the true femur border lies."""
    b = mask.shape[0]
    out = []
    for i in range(b):
        m = mask[i:i + 1]
        k = int(torch.randint(0, max_dilate_px + 1, (1,)))
        if k:
            m = F.max_pool2d(m, 2 * k + 1, 1, k)
        if float(torch.rand(1)) < p_blob:
            k2 = max(2, max_dilate_px * 2)
            ring = F.max_pool2d(m, 2 * k2 + 1, 1, k2)
            small = torch.randn(1, 1, 8, 8)
            field = F.interpolate(small, size=m.shape[-2:], mode="bilinear", align_corners=True).to(m.device)
            m = torch.maximum(m, ring * (field > 0.5).float())
        out.append(m)
    return torch.cat(out)


def lesion_like_blobs(x, femur, spacing_mm, p=0.7, max_blobs=3):
    """Paint bright, smooth blobs inside the femur of 3D batches (B,1,D,H,W).

    The training subjects are healthy, but the segmenter will meet bone marrow lesions:
    bright marrow it must still call femur. Without this, it carves lesions out of the
    femur mask, and the inpainter then never repaints them.
    """
    b = x.shape[0]
    out = x.clone()
    dev = x.device
    grids = [torch.arange(n, device=dev, dtype=torch.float32) for n in x.shape[2:]]
    for i in range(b):
        if float(torch.rand(1)) >= p:
            continue
        fem = femur[i, 0] > 0.5
        idx = fem.nonzero()
        if len(idx) == 0:
            continue
        for _ in range(int(torch.randint(1, max_blobs + 1, (1,)))):
            c = idx[int(torch.randint(0, len(idx), (1,)))].float()
            radius_mm = float(torch.empty(1).uniform_(2.0, 12.0))
            amp = float(torch.empty(1).uniform_(0.3, 1.0))
            d2 = 0.0
            for ax, (g, s) in enumerate(zip(grids, spacing_mm)):
                shape = [1, 1, 1]
                shape[ax] = -1
                d2 = d2 + (((g - c[ax]) * s / radius_mm) ** 2).view(shape)
            out[i, 0] = out[i, 0] + amp * torch.exp(-d2) * fem
    return out
