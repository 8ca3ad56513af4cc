"""Tissue label numbers shared by the label maps, the phantoms and the label-driven generator.

1-11 follow the OAI_AKOA / OAI-ZIB convention of the real label maps; 12 and up are the
tissues a bone-and-cartilage label map lacks, which `anatomy.py` synthesises around the
bones (and the phantom generator draws directly).
"""

from __future__ import annotations

import numpy as np

AIR = 0
FEMUR, FEM_CART, TIBIA, TIB_CART, PATELLA, PAT_CART, FEM_LESION, TIB_LESION, PAT_LESION = range(1, 10)
FIBULA, MENISCUS = 10, 11
FEMUR_CORTEX = 12  # the femur's dark cortical rim: femur in the ground truth
BONE_CORTEX = 13  # cortex of tibia, patella, fibula
FAT = 14  # subcutaneous fat
MUSCLE = 15
MUSCLE2 = 16  # a second muscle group with its own intensity
SEPTUM = 17  # intermuscular fat septa
TENDON = 18  # tendons, ligaments, joint capsule (dark in every contrast)
HOFFA = 19  # infrapatellar and other joint fat pads
FLUID = 20  # joint fluid, recesses, cysts
VESSEL = 21
FEMUR_PHYSIS = 22  # growth-plate scar inside the femur: femur in the ground truth
BONE_PHYSIS = 23  # growth-plate scar of the tibia
N_LABELS = 24

# What "femur" means in every ground truth: marrow, cortex, scar and lesions.
FEMUR_PARTS = (FEMUR, FEMUR_CORTEX, FEMUR_PHYSIS, FEM_LESION)
BONE_PARTS = (FEMUR, TIBIA, PATELLA, FIBULA, FEM_LESION, TIB_LESION, PAT_LESION,
              FEMUR_CORTEX, BONE_CORTEX, FEMUR_PHYSIS, BONE_PHYSIS)
CARTILAGE = (FEM_CART, TIB_CART, PAT_CART)


def lookup(mapping: dict[int, int | float], default=0, dtype=np.uint8) -> np.ndarray:
    """A table indexed by label: ``table[labels]`` maps a whole label volume at once."""
    t = np.full(256, default, dtype)
    for k, v in mapping.items():
        t[k] = v
    return t


FEMUR_TABLE = lookup({k: 1 for k in FEMUR_PARTS})
