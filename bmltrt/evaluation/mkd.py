"""Baseline (c): MKD — Salehi et al., "Multiresolution Knowledge Distillation for Anomaly
Detection" (CVPR 2021), the paper's comparison method.

- Expert ("source"): VGG16 pretrained on ImageNet, frozen. Its weights cannot be
  downloaded here: `bmltrt train mkd --vgg16-weights FILE` takes torchvision's
  `vgg16-397923af.pth` (or any state dict with its `features.N.weight/bias` keys).
- Cloner: a smaller VGG-like network (thin 3x3 convolutions; each block ends on the
  expert's channel count so features can be compared) trained on healthy slices only to
  reproduce the expert's activations at the ends of blocks 2-5 ("critical layers"):
  loss = sum over layers of lambda * MSE + (1 - cosine similarity of the flattened maps).
- Localisation: the gradient of that loss with respect to the input image, absolute,
  summed over the colour channels, Gaussian-smoothed — large where the cloner fails to
  follow the expert, i.e. on what it never saw in healthy slices.
Slices are square (padded as the inpainter's), intensities clipped to 0..1, repeated to
three channels and normalised with ImageNet's mean and standard deviation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from torch import nn

from bmltrt.errors import BmlError
from bmltrt.evaluation.maps import Method, ScanContext
from bmltrt.runtime.preprocess import slices_to_square, square_to_slices

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
# Thin convolutions, block ends as wide as the expert's (Salehi et al.'s smaller cloner).
CLONER = [16, 16, "M", 16, 128, "M", 16, 16, 256, "M", 16, 16, 512, "M", 16, 16, 512, "M"]
CRITICAL_BLOCKS = (1, 2, 3, 4)  # 0-based: the ends of blocks 2, 3, 4 and 5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NOT_AVAILABLE = "needs VGG16 ImageNet weights, not available"


class BlockFeatures(nn.Module):
    """VGG-style `features` (torchvision's layer indices when batch_norm is False); returns
    the output of every block (after its max-pool)."""

    def __init__(self, cfg, batch_norm: bool):
        super().__init__()
        layers, c = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(nn.Conv2d(c, v, 3, padding=1))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(v))
                layers.append(nn.ReLU(inplace=True))
                c = v
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        out = []
        for layer in self.features:
            x = layer(x)
            if isinstance(layer, nn.MaxPool2d):
                out.append(x)
        return out


def load_vgg16_features(path: Path) -> dict:
    """The `features.*` tensors of a VGG16 state dict, checked against the architecture."""
    path = Path(path)
    if not path.exists():
        raise BmlError(f"MKD {NOT_AVAILABLE} (no such file)", path,
                       "give torchvision's vgg16-397923af.pth (ImageNet) with --vgg16-weights")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise BmlError(f"cannot read VGG16 weights ({type(exc).__name__})", path) from None
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    sd = {k.removeprefix("module."): v for k, v in sd.items()} if isinstance(sd, dict) else {}
    want = BlockFeatures(VGG16, batch_norm=False).state_dict()
    feats = {k: sd[k] for k in want if k in sd}
    bad = [k for k in want if k not in feats or tuple(feats[k].shape) != tuple(want[k].shape)]
    if bad:
        raise BmlError(f"not VGG16 weights in torchvision's layout ({len(bad)} of {len(want)} feature tensors "
                       f"missing or of another shape, e.g. {bad[0]})", path,
                       "give torchvision's vgg16-397923af.pth (ImageNet)")
    return feats


def to_vgg_input(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, R, R) normalised slices -> (B, 3, R, R) ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x.clamp(0, 1).repeat(1, 3, 1, 1) - mean) / std


def mkd_loss(cloner_feats, source_feats, lam: float, per_sample: bool = False):
    """sum over critical layers of lam * MSE + (1 - cosine similarity), per sample or mean."""
    total = 0.0
    for b in CRITICAL_BLOCKS:
        c, s = cloner_feats[b].flatten(1), source_feats[b].flatten(1)
        term = lam * ((c - s) ** 2).mean(dim=1) + (1 - F.cosine_similarity(c, s, dim=1))
        total = total + term
    return total if per_sample else total.mean()


class Mkd(nn.Module):
    def __init__(self, source_state: dict | None = None):
        super().__init__()
        self.source = BlockFeatures(VGG16, batch_norm=False)
        if source_state is not None:
            self.source.load_state_dict(source_state, strict=True)
        self.source.eval()
        for p in self.source.parameters():
            p.requires_grad_(False)
        self.cloner = BlockFeatures(CLONER, batch_norm=True)

    def loss(self, x, lam: float, per_sample: bool = False):
        v = to_vgg_input(x)
        with torch.no_grad():
            target = self.source(v)
        return mkd_loss(self.cloner(v), target, lam, per_sample)

    def saliency(self, x: torch.Tensor, lam: float, sigma_px: float) -> np.ndarray:
        """|d loss / d input| summed over channels, Gaussian-smoothed: (B, R, R)."""
        self.cloner.eval()
        v = to_vgg_input(x).detach().requires_grad_(True)
        loss = mkd_loss(self.cloner(v), self.source(v), lam, per_sample=True).sum()
        grad, = torch.autograd.grad(loss, v)
        g = grad.abs().sum(dim=1).numpy()
        return ndi.gaussian_filter(g, sigma=(0, sigma_px, sigma_px)).astype(np.float32)


def train_mkd(opts, source_state: dict | None, resolution: int, lam: float = 0.5, progress=None) -> dict:
    """Train the cloner on healthy slices (the autoencoder's data options). `source_state`
    None (random expert) is for tests of the mechanics only."""
    from bmltrt.evaluation.autoencoder import healthy_slice_batches
    from bmltrt.training.checkpoint import seed_everything
    from bmltrt.training.loop import resolve_device, run_loop

    device = resolve_device(opts.device)
    rng = seed_everything(opts.seed)
    batches, (vimgs, _), frac = healthy_slice_batches(opts, resolution, rng, device)
    model = Mkd(source_state).to(device)
    opt = torch.optim.Adam(model.cloner.parameters(), lr=opts.lr)

    def step(i):
        loss = model.loss(batches(), lam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach())}

    def validate():
        if len(vimgs) == 0:
            return {}
        vals = [float(model.loss(torch.from_numpy(vimgs[s:s + 8][:, None]).to(device), lam)) * len(vimgs[s:s + 8])
                for s in range(0, len(vimgs), 8)]
        return {"val_loss": sum(vals) / len(vimgs)}

    config = {"resolution": resolution, "lambda": lam, "pretrained_source": source_state is not None,
              "phantom_fraction": frac, "data": str(opts.data) if opts.data else None}
    return run_loop(opts, "mkd", config, {"model": model}, {"opt": opt}, step, validate, rng, progress)


class MkdScorer:
    def __init__(self, path: Path):
        from bmltrt.evaluation.autoencoder import load_checkpoint
        from bmltrt.io.checksum import file_sha256

        ckpt = load_checkpoint(path, "mkd")
        cfg = ckpt["config"]
        self.path, self.sha256 = Path(path), file_sha256(path)
        self.resolution, self.lam = int(cfg["resolution"]), float(cfg["lambda"])
        self.pretrained = bool(cfg.get("pretrained_source"))
        self.model = Mkd()
        self.model.load_state_dict(ckpt["modules"]["model"])
        self.model.eval()
        self.sigma_px = 4.0 * self.resolution / 128  # Salehi et al.: sigma 4 at 128 px

    def score(self, slices: np.ndarray, batch: int = 8, pixel_mm=None) -> np.ndarray:
        n, h, w = slices.shape
        sq = slices_to_square(slices.astype(np.float32), self.resolution, pixel_mm=pixel_mm)
        out = np.empty_like(sq)
        for i in range(0, n, batch):
            out[i:i + batch] = self.model.saliency(torch.from_numpy(sq[i:i + batch][:, None]), self.lam, self.sigma_px)
        return square_to_slices(out, h, w, pixel_mm=pixel_mm)


class MkdMethod(Method):
    name = "mkd"
    title = "MKD (Salehi et al.), gradient map"

    def __init__(self, scorer: MkdScorer, models_label: str):
        self.scorer = scorer
        self.models = models_label
        self.resolution = scorer.resolution

    def identity(self) -> dict:
        return {"method": "mkd", "checkpoint": self.scorer.sha256, "resolution": self.resolution}

    def compute(self, ctx: ScanContext) -> np.ndarray:
        full = np.zeros(ctx.norm.shape, np.float32)
        sl = ctx.crop.slices
        if sl:
            full[sl] = self.scorer.score(ctx.norm[sl], pixel_mm=ctx.spacing[1:]) * ctx.femur[sl]
        return full

    def default_params(self):
        from bmltrt.postprocess import PostConfig

        return PostConfig(floor=0.0, otsu_scope="slice")
