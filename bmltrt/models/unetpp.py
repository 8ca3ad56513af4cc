"""Femur segmenter: 3D UNet++ (nested dense skip pathways).

We use MONAI's BasicUNetPlusPlus rather than our own: it is the reference
implementation of Zhou et al.'s UNet++ in the medical-imaging stack, has optional deep
supervision, traces to plain ONNX (Conv3d, InstanceNormalization, ConvTranspose,
Concat), and is maintained. What is ours is the configuration: widths and the working
grid (in-plane spacing, patch) that make the CPU default affordable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn


@dataclass
class SegmenterConfig:
    features: tuple[int, ...] = (8, 8, 16, 32, 64, 8)
    deep_supervision: bool = False
    # Working grid: slices keep their thickness; in-plane pixels are resampled to this.
    # The paper's setting is native spacing with 256x256x16 crops (use --config paper
    # on a GPU); the shipped CPU default works at 1.6 mm, whole slices in one patch.
    inplane_spacing_mm: float = 1.6
    patch: tuple[int, int, int] = (16, 112, 112)  # [slices, rows, cols]
    overlap: float = 0.4  # sliding-window overlap (fraction of the patch)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SegmenterConfig":
        d = dict(d)
        for k in ("features", "patch"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


SEGMENTER_PRESETS = {
    "cpu": SegmenterConfig(),
    # The cpu network on a grid twice as fine (4x the patches): the ~1 mm subchondral plate
    # that parts a bright lesion from bright cartilage is lost at 1.6 mm. Not shipped: fine-
    # tuned from the 1.6 mm weights on 2 CPU cores it reached only 0.78 femur Dice on painted
    # OAI val in 1300 steps (benchmarks/results/segmenter_fine_grid/); its 90 mm patch sees
    # half the field. A run from scratch, longer, is for a GPU.
    "cpu-fine": SegmenterConfig(inplane_spacing_mm=0.8),
    # The cpu network on a 1.0 mm grid with a 160 mm patch (the field the 1.6 mm patch sees):
    # the border in pixels of 1.0 mm, not 1.6. For a GPU (scripts/gpu_train.sh CONFIG=cpu-1mm): the
    # 1.6 mm weights on it, and 400 CPU steps from them, took thigh muscle for femur
    # (benchmarks/results/segmenter_1mm_pilot/).
    "cpu-1mm": SegmenterConfig(inplane_spacing_mm=1.0, patch=(16, 160, 160)),
    # The paper: native in-plane spacing (0.357 mm), random 256x256x16 crops.
    "paper": SegmenterConfig(features=(32, 32, 64, 128, 256, 32), inplane_spacing_mm=0.357,
                             patch=(16, 256, 256), deep_supervision=True),
}


def build_segmenter(cfg: SegmenterConfig):
    from monai.networks.nets import BasicUNetPlusPlus

    net = BasicUNetPlusPlus(spatial_dims=3, in_channels=1, out_channels=2,
                            features=tuple(cfg.features), deep_supervision=cfg.deep_supervision)
    for m in net.modules():  # see SmallInputFloat32Conv3d
        if type(m) is nn.Conv3d:
            m.__class__ = SmallInputFloat32Conv3d
    return net


class SmallInputFloat32Conv3d(nn.Conv3d):
    """A Conv3d that leaves bfloat16 autocast for small inputs (the deep, coarse levels).

    On this CPU (oneDNN, torch 2.13) the bfloat16 weight gradient of the level-3 convolutions
    (2x14x14 voxels) comes out non-finite in ~13% of steps (measured), which killed a run;
    those levels cost little, so they run in float32. Same weights, same exported graph.
    """

    SMALL = 4096  # voxels per channel

    def forward(self, x):
        if not torch.is_autocast_enabled(x.device.type) or x[0, 0].numel() >= self.SMALL:
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


class SegmenterLogits(nn.Module):
    """The final output of UNet++ (MONAI returns a list), for export and inference."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        out = self.net(x)
        return out[-1] if isinstance(out, (list, tuple)) else out
