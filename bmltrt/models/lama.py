"""LaMa generator with fast Fourier convolutions (Suvorov et al., 2022), for 1-channel MRI.

FFCResNetGenerator: reflection pad + 7x7 conv -> three stride-2 convs -> N residual
blocks of two FFC layers (global ratio 0.75) -> three transposed convs -> 7x7 conv ->
sigmoid. The FourierUnit has two interchangeable FFT paths over the same weights:
``torch.fft`` (training) and DFT-as-matrix-products (export; see ``dft.py``).
Input is ``stack(x * (1 - m), m)``: the slice with the femur blanked, and the mask.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bmltrt.models.dft import irfft2_matmul, rfft2_matmul

FFT_IMPLS = ("torch", "matmul")


@dataclass
class InpainterConfig:
    ngf: int = 64
    n_blocks: int = 9
    n_downsampling: int = 3
    ratio_g: float = 0.75
    max_features: int = 1024

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "InpainterConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


INPAINTER_PRESETS = {
    "big": InpainterConfig(ngf=64, n_blocks=18),  # big-lama, the paper's (~51M parameters)
    "fourier": InpainterConfig(ngf=64, n_blocks=9),  # lama-fourier (~27M)
    # lama-fourier at 3/8 width (~3.8M): a GPU lease's run, whose float32 weights (15 MB)
    # still come back from the device machine in one file
    "small": InpainterConfig(ngf=24, n_blocks=9),
    "tiny": InpainterConfig(ngf=16, n_blocks=4),  # trains and runs on a CPU
}


class FourierUnit(nn.Module):
    def __init__(self, cin: int, cout: int, fft_impl: str = "torch"):
        super().__init__()
        self.conv = nn.Conv2d(2 * cin, 2 * cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(2 * cout)
        self.fft_impl = fft_impl

    def forward(self, x):
        h, w = int(x.shape[-2]), int(x.shape[-1])
        dtype = x.dtype
        if self.fft_impl == "torch":
            f = torch.fft.rfft2(x.float(), norm="ortho")
            re, im = f.real, f.imag
        else:
            re, im = rfft2_matmul(x)
        # Real and imaginary parts as channels [re..., im...] (both paths alike).
        y = F.relu(self.bn(self.conv(torch.cat([re, im], dim=1).to(dtype))))
        re, im = torch.chunk(y, 2, dim=1)
        if self.fft_impl == "torch":
            out = torch.fft.irfft2(torch.complex(re.float(), im.float()), s=(h, w), norm="ortho")
        else:
            out = irfft2_matmul(re, im, w)
        return out.to(dtype)


class SpectralTransform(nn.Module):
    def __init__(self, cin: int, cout: int, fft_impl: str = "torch"):
        super().__init__()
        mid = cout // 2
        self.conv1 = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(True))
        self.fu = FourierUnit(mid, mid, fft_impl)
        self.conv2 = nn.Conv2d(mid, cout, 1, bias=False)

    def forward(self, x):
        x = self.conv1(x)
        return self.conv2(x + self.fu(x))


class FFC(nn.Module):
    """out_l = l2l(x_l) + g2l(x_g); out_g = l2g(x_l) + spectral(x_g)."""

    def __init__(self, cin, cout, k, ratio_gin, ratio_gout, stride=1, padding=0, fft_impl="torch"):
        super().__init__()
        in_g = int(cin * ratio_gin)
        in_l = cin - in_g
        out_g = int(cout * ratio_gout)
        out_l = cout - out_g
        self.in_l, self.in_g, self.out_l, self.out_g = in_l, in_g, out_l, out_g

        def conv(a, b):
            if a == 0 or b == 0:
                return None
            return nn.Conv2d(a, b, k, stride, padding, bias=False, padding_mode="reflect" if padding else "zeros")

        self.l2l, self.l2g, self.g2l = conv(in_l, out_l), conv(in_l, out_g), conv(in_g, out_l)
        self.g2g = SpectralTransform(in_g, out_g, fft_impl) if in_g and out_g else None

    def forward(self, x_l, x_g):
        out_l = out_g = 0
        if self.out_l:
            out_l = (self.l2l(x_l) if self.l2l is not None else 0) + (self.g2l(x_g) if self.g2l is not None else 0)
        if self.out_g:
            out_g = (self.l2g(x_l) if self.l2g is not None else 0) + (self.g2g(x_g) if self.g2g is not None else 0)
        return out_l, out_g


class FFCBnAct(nn.Module):
    def __init__(self, cin, cout, k, ratio_gin, ratio_gout, stride=1, padding=0, fft_impl="torch"):
        super().__init__()
        self.ffc = FFC(cin, cout, k, ratio_gin, ratio_gout, stride, padding, fft_impl)
        self.bn_l = nn.BatchNorm2d(self.ffc.out_l) if self.ffc.out_l else None
        self.bn_g = nn.BatchNorm2d(self.ffc.out_g) if self.ffc.out_g else None

    def forward(self, x_l, x_g):
        l, g = self.ffc(x_l, x_g)
        l = F.relu(self.bn_l(l)) if self.bn_l is not None else l
        g = F.relu(self.bn_g(g)) if self.bn_g is not None else g
        return l, g


class FFCResBlock(nn.Module):
    def __init__(self, dim, ratio, fft_impl="torch"):
        super().__init__()
        self.conv1 = FFCBnAct(dim, dim, 3, ratio, ratio, padding=1, fft_impl=fft_impl)
        self.conv2 = FFCBnAct(dim, dim, 3, ratio, ratio, padding=1, fft_impl=fft_impl)

    def forward(self, x_l, x_g):
        l, g = self.conv1(x_l, x_g)
        l, g = self.conv2(l, g)
        return x_l + l, x_g + g


class LamaGenerator(nn.Module):
    """Input (B, 2, H, W) = [masked image, mask]; output (B, 1, H, W) in [0, 1].

    H and W must be multiples of 2**n_downsampling.
    """

    def __init__(self, cfg: InpainterConfig | None = None, fft_impl: str = "torch"):
        super().__init__()
        cfg = cfg or InpainterConfig()
        self.cfg = cfg
        ngf = cfg.ngf
        self.stem = FFCBnAct(2, ngf, 7, 0.0, 0.0)
        downs = []
        for i in range(cfg.n_downsampling):
            cin = min(cfg.max_features, ngf * 2 ** i)
            cout = min(cfg.max_features, ngf * 2 ** (i + 1))
            last = i == cfg.n_downsampling - 1
            downs.append(FFCBnAct(cin, cout, 3, 0.0, cfg.ratio_g if last else 0.0, stride=2, padding=1))
        self.downs = nn.ModuleList(downs)
        dim = min(cfg.max_features, ngf * 2 ** cfg.n_downsampling)
        self.blocks = nn.ModuleList(FFCResBlock(dim, cfg.ratio_g, fft_impl) for _ in range(cfg.n_blocks))
        ups = []
        for i in range(cfg.n_downsampling):
            cin = min(cfg.max_features, ngf * 2 ** (cfg.n_downsampling - i))
            cout = min(cfg.max_features, ngf * 2 ** (cfg.n_downsampling - i - 1))
            ups += [nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1, bias=False),
                    nn.BatchNorm2d(cout), nn.ReLU(True)]
        self.up = nn.Sequential(*ups)
        self.head = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(ngf, 1, 7))
        self.set_fft_impl(fft_impl)
        self.frozen_bn = False

    def freeze_bn(self, frozen: bool = True) -> "LamaGenerator":
        """Keep every BatchNorm in eval mode (running statistics, no updates) even while
        training: a generator recovered from an exported graph has its BatchNorms folded
        into the convolutions, which is exact only in eval mode."""
        self.frozen_bn = frozen
        return self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "frozen_bn", False):
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def set_fft_impl(self, impl: str) -> "LamaGenerator":
        if impl not in FFT_IMPLS:
            raise ValueError(f"fft_impl must be one of {FFT_IMPLS}")
        for m in self.modules():
            if isinstance(m, FourierUnit):
                m.fft_impl = impl
        self.fft_impl = impl
        return self

    def forward(self, x):
        x = F.pad(x, (3, 3, 3, 3), mode="reflect")
        l, g = self.stem(x, None)
        for d in self.downs:
            l, g = d(l, g if torch.is_tensor(g) else None)
        for b in self.blocks:
            l, g = b(l, g)
        y = self.up(torch.cat([l, g], dim=1))
        return torch.sigmoid(self.head(y))


def inpainter_input(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """stack(x * (1 - m), m): the slice with the masked region blanked, and the mask."""
    return torch.cat([image * (1 - mask), mask], dim=1)


def composite(image: torch.Tensor, mask: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """x~ = m * G(x) + (1 - m) * x: only the masked region changes."""
    return mask * generated + (1 - mask) * image


def count_parameters(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())
