"""PatchGAN discriminator (as LaMa's NLayerDiscriminator), returning its features too."""

from __future__ import annotations

import torch.nn as nn


class PatchDiscriminator(nn.Module):
    def __init__(self, ndf: int = 32, n_layers: int = 3, in_ch: int = 1):
        super().__init__()
        layers = [nn.Sequential(nn.Conv2d(in_ch, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True))]
        nf = ndf
        for i in range(1, n_layers):
            nf_prev, nf = nf, min(nf * 2, 512)
            layers.append(nn.Sequential(nn.Conv2d(nf_prev, nf, 4, 2, 1), nn.BatchNorm2d(nf), nn.LeakyReLU(0.2, True)))
        nf_prev, nf = nf, min(nf * 2, 512)
        layers.append(nn.Sequential(nn.Conv2d(nf_prev, nf, 4, 1, 1), nn.BatchNorm2d(nf), nn.LeakyReLU(0.2, True)))
        layers.append(nn.Conv2d(nf, 1, 4, 1, 1))
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return x, feats[:-1]
