"""Baseline (b): a global reconstruction method.

A small convolutional autoencoder learns whole healthy slices (no mask, no femur given)
through a narrow bottleneck; what it cannot reconstruct is the anomaly. Its anomaly map
is the paper's formula with the reconstruction in place of the inpainting,
max(HE(x) - HE(AE(x)), 0), inside the predicted femur — so this row differs from ours
only in how the healthy image is guessed (globally, from the slice itself, versus
repainted from the femur's surroundings).

Trained by `bmltrt train autoencoder` on the same healthy slices the inpainter sees:
phantom training slices (`--data`) and/or label-driven slices (`--labels`, SynthSeg-style,
`bmltrt.synth.labelgen.inpainter_sample`), with flips and a random bias field. Needs torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bmltrt.errors import BmlError, with_article
from bmltrt.evaluation.maps import Method, ScanContext
from bmltrt.io.checksum import file_sha256
from bmltrt.postprocess.lesion import anomaly_map
from bmltrt.runtime.preprocess import CLIP_HIGH, slices_to_square, square_to_slices


@dataclass
class AutoencoderConfig:
    base: int = 16  # channels after the first stride-2 convolution
    levels: int = 4  # stride-2 stages: a 128 slice becomes 8 x 8
    latent: int = 8  # channels of the bottleneck

    def to_dict(self) -> dict:
        return asdict(self)


AUTOENCODER_PRESETS = {"small": AutoencoderConfig(), "tiny": AutoencoderConfig(base=8, levels=3, latent=4)}


class ConvAutoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig | None = None):
        super().__init__()
        cfg = cfg or AutoencoderConfig()
        self.cfg = cfg
        enc, c = [], 1
        for i in range(cfg.levels):
            o = cfg.base * 2 ** i
            enc += [nn.Conv2d(c, o, 4, stride=2, padding=1), nn.BatchNorm2d(o), nn.LeakyReLU(0.2, inplace=True),
                    nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.LeakyReLU(0.2, inplace=True)]
            c = o
        enc += [nn.Conv2d(c, cfg.latent, 1)]
        dec = [nn.Conv2d(cfg.latent, c, 1), nn.LeakyReLU(0.2, inplace=True)]
        for i in reversed(range(cfg.levels)):
            o = cfg.base * 2 ** max(i - 1, 0)
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, o, 3, padding=1), nn.BatchNorm2d(o),
                    nn.LeakyReLU(0.2, inplace=True)]
            c = o
        dec += [nn.Conv2d(c, 1, 3, padding=1)]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    def forward(self, x):
        # Normalised intensities run 0..CLIP_HIGH (bright fluid above 1).
        return torch.sigmoid(self.decoder(self.encoder(x))) * CLIP_HIGH


def healthy_slice_batches(opts, resolution: int, rng: np.random.Generator, device):
    """What both baselines train on: (draw() -> (B, 1, R, R) tensor of augmented healthy
    slices, (validation slices, their femur masks), share of phantom slices).

    Slices come from opts.data's train split (phantoms) and/or label-driven slices of the
    anatomy bank (opts.extra["bank"]), mixed as the inpainter mixes them; validation
    slices are the healthy ones of the val split of opts.extra["val_data"] or opts.data.
    """
    from bmltrt.synth.labelgen import inpainter_sample
    from bmltrt.training import augment
    from bmltrt.training.data import LabelBank, SamplePool, inpainter_slices

    bank_files = opts.extra.get("bank") or []
    phantom = inpainter_slices(opts.data, "train", resolution, True, opts.limit_cases)[0] if opts.data else None
    if phantom is not None and len(phantom) == 0:
        phantom = None
    if phantom is None and not bank_files:
        raise BmlError("no healthy training slices: give label maps (--labels) or a phantom dataset (--data)",
                       opts.data, "make a dataset with `bmltrt synth`")
    frac = float(opts.extra.get("phantom_fraction", 0.0 if bank_files else 1.0)) if phantom is not None else 0.0
    pool = None
    if bank_files:
        bank = LabelBank(bank_files)
        size = int(opts.extra.get("pool", min(96, max(4, opts.steps * opts.batch_size // 4))))
        pool = SamplePool(lambda g: inpainter_sample(bank.pick(g), g, resolution), size, 2, rng)
    val_root = opts.extra.get("val_data") or opts.data
    vimgs = np.zeros((0, resolution, resolution), np.float32)
    vmasks = np.zeros((0, resolution, resolution), bool)
    if val_root:
        vimgs, vmasks, _ = inpainter_slices(val_root, "val", resolution, True, opts.limit_cases)
    if len(vimgs) > 64:  # evenly spaced slices keep each validation short on a CPU
        keep = np.linspace(0, len(vimgs) - 1, 64).astype(int)
        vimgs, vmasks = vimgs[keep], vmasks[keep]

    def draw():
        n = opts.batch_size
        n_ph = n if pool is None else (int(rng.binomial(n, frac)) if phantom is not None else 0)
        xs = []
        if n_ph:
            xs.append(phantom[rng.integers(0, len(phantom), n_ph)])
        if n - n_ph:
            xs.append(np.stack([s.image for s in pool.draw(n - n_ph)]))
        x = torch.from_numpy(np.concatenate(xs)[:, None]).to(device)
        x, = augment.random_flips(x)
        return augment.bias_field(x, (0.05, 0.25)).clamp(0.0, CLIP_HIGH)

    return draw, (vimgs, vmasks), frac


def train_autoencoder(opts, cfg: AutoencoderConfig, resolution: int, progress=None) -> dict:
    """Train on healthy slices (see healthy_slice_batches), L1 over the whole slice;
    validation: L1 inside the femur of the validation split's healthy slices."""
    from bmltrt.training.checkpoint import seed_everything
    from bmltrt.training.loop import resolve_device, run_loop

    device = resolve_device(opts.device)
    rng = seed_everything(opts.seed)
    draw, (vimgs, vmasks), frac = healthy_slice_batches(opts, resolution, rng, device)
    model = ConvAutoencoder(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=opts.lr)

    def step(i):
        for g in opt.param_groups:
            g["lr"] = opts.lr * max(0.1, 1 - i / max(1, opts.steps))
        x = draw()
        loss = F.l1_loss(model(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"l1": float(loss.detach())}

    def validate():
        if len(vimgs) == 0:
            return {}
        total = 0.0
        for s in range(0, len(vimgs), 16):
            x = torch.from_numpy(vimgs[s:s + 16][:, None]).to(device)
            m = torch.from_numpy(vmasks[s:s + 16][:, None].astype(np.float32)).to(device)
            total += float(((model(x) - x).abs() * m).sum() / m.sum().clamp(min=1)) * len(x)
        return {"val_femur_l1": total / len(vimgs)}

    config = {"autoencoder": cfg.to_dict(), "resolution": resolution, "bank": [str(p) for p in opts.extra.get("bank") or []],
              "phantom_fraction": frac, "data": str(opts.data) if opts.data else None}
    return run_loop(opts, "autoencoder", config, {"model": model}, {"opt": opt}, step, validate, rng, progress)


def load_checkpoint(path: Path, kind: str) -> dict:
    path = Path(path)
    if not path.exists():
        raise BmlError(f"{kind} checkpoint not found", path, f"train one with `bmltrt train {kind}`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise BmlError(f"cannot read the {kind} checkpoint ({type(exc).__name__})", path) from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        raise BmlError(f"not {with_article(kind)} checkpoint", path, f"train one with `bmltrt train {kind}`")
    return ckpt


class AutoencoderScorer:
    def __init__(self, path: Path, threads: int | None = None):
        ckpt = load_checkpoint(path, "autoencoder")
        self.path = Path(path)
        self.sha256 = file_sha256(path)
        self.resolution = int(ckpt["config"]["resolution"])
        self.model = ConvAutoencoder(AutoencoderConfig(**ckpt["config"]["autoencoder"]))
        self.model.load_state_dict(ckpt["modules"]["model"])
        self.model.eval()
        self.steps = int(ckpt.get("step", 0))

    @torch.no_grad()
    def reconstruct(self, slices: np.ndarray, batch: int = 16, pixel_mm=None) -> np.ndarray:
        """(N, H, W) normalised slices -> their reconstructions, same grid (padded to a square
        field in mm with `pixel_mm`, as the inpainter's slices are)."""
        n, h, w = slices.shape
        sq = slices_to_square(slices.astype(np.float32), self.resolution, pixel_mm=pixel_mm)
        out = np.empty_like(sq)
        for i in range(0, n, batch):
            out[i:i + batch] = self.model(torch.from_numpy(sq[i:i + batch][:, None])).numpy()[:, 0]
        return square_to_slices(out, h, w, pixel_mm=pixel_mm)


class AutoencoderMethod(Method):
    name = "autoencoder"
    title = "convolutional autoencoder, reconstruction error (global)"

    def __init__(self, scorer: AutoencoderScorer, models_label: str):
        self.scorer = scorer
        self.models = models_label
        self.resolution = scorer.resolution

    def identity(self) -> dict:
        return {"method": "autoencoder", "checkpoint": self.scorer.sha256, "resolution": self.resolution}

    def compute(self, ctx: ScanContext) -> np.ndarray:
        full = np.zeros(ctx.norm.shape, np.float32)
        sl = ctx.crop.slices
        if sl:
            recon = self.scorer.reconstruct(ctx.norm[sl], pixel_mm=ctx.spacing[1:])
            diff, _ = anomaly_map(ctx.norm[sl], recon, ctx.femur[sl])
            full[sl] = diff
        return full
