"""bmltrt: bone marrow lesion detection in the femur on knee MRI.

Pipeline (Qin et al.): 3D UNet++ femur segmentation -> LaMa (FFC) inpainting of the
femur from its surroundings -> histogram-equalised difference, Otsu, opening/closing.
The runtime (this package without ``models``/``training``/``export``) needs no torch.
"""

__version__ = "0.1.0"

from bmltrt.errors import BmlError  # noqa: F401
