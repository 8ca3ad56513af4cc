"""Real 2D DFT (ortho) as matrix products: the portable FFT path of the FourierUnit.

For a fixed H x W the ortho rfft2 and irfft2 are products with constant cos/sin matrices
(hermitian weights on the inverse). Only MatMul/Add/Sub/Mul: every TensorRT version
(JetPack 6's 10.3 included), ONNX Runtime and tensor cores. The matrices are built in
float64 with numpy, stored float32, and enter a traced graph as constants — never
computed in-graph.
"""

from __future__ import annotations

import numpy as np
import torch

_CACHE: dict = {}


def dft_matrices(h: int, w: int) -> dict[str, np.ndarray]:
    wr = w // 2 + 1
    kh = np.arange(h)
    ang_h = 2 * np.pi * np.outer(kh, kh) / h  # (H, H), symmetric
    ang_w = 2 * np.pi * np.outer(np.arange(w), np.arange(wr)) / w  # (W, Wr)
    scale = 1.0 / np.sqrt(h * w)
    # Hermitian weights for the inverse along W: bins 1..W/2-1 stand for two.
    alpha = np.full(wr, 2.0)
    alpha[0] = 1.0
    if w % 2 == 0:
        alpha[-1] = 1.0
    return {
        "ch": np.cos(ang_h), "sh": np.sin(ang_h),
        "cw": np.cos(ang_w) * scale, "sw": np.sin(ang_w) * scale,
        "icw": (np.cos(ang_w) * alpha).T * scale, "isw": (np.sin(ang_w) * alpha).T * scale,
    }


def _mats(h: int, w: int, device) -> dict[str, torch.Tensor]:
    key = (h, w, str(device))
    if key not in _CACHE:
        _CACHE[key] = {k: torch.from_numpy(v.astype(np.float32)).to(device) for k, v in dft_matrices(h, w).items()}
    return _CACHE[key]


def rfft2_matmul(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(real, imag) of torch.fft.rfft2(x, norm='ortho') over the last two axes, in float32."""
    h, w = int(x.shape[-2]), int(x.shape[-1])  # python ints: constants under tracing
    m = _mats(h, w, x.device)
    x = x.float()
    a = x @ m["cw"]  # real part along W
    b = -(x @ m["sw"])  # imaginary part along W
    re = m["ch"] @ a + m["sh"] @ b
    im = m["ch"] @ b - m["sh"] @ a
    return re, im


def irfft2_matmul(re: torch.Tensor, im: torch.Tensor, w: int) -> torch.Tensor:
    """torch.fft.irfft2(re + i*im, s=(H, w), norm='ortho') over the last two axes, float32."""
    h = int(re.shape[-2])
    m = _mats(h, int(w), re.device)
    re, im = re.float(), im.float()
    zr = m["ch"] @ re - m["sh"] @ im
    zi = m["ch"] @ im + m["sh"] @ re
    return zr @ m["icw"] - zi @ m["isw"]
