"""Checkpoints that carry config, metrics and every RNG state: resume repeats the run."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from bmltrt.io.atomic import atomic_write


def seed_everything(seed: int) -> np.random.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def rng_state(np_rng: np.random.Generator) -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np_rng.bit_generator.state, "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def restore_rng(st: dict, np_rng: np.random.Generator) -> None:
    torch.set_rng_state(st["torch"])
    np_rng.bit_generator.state = st["numpy"]
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_atomic(obj: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def load_weights(path, kind: str, module: str) -> dict:
    """One module's weights from a checkpoint of the given kind (for --init)."""
    from bmltrt.errors import BmlError

    if not Path(path).exists():
        raise BmlError("no such checkpoint", path)
    st = load(path)
    if st.get("kind") != kind:
        raise BmlError(f"checkpoint is a {st.get('kind')}, not a {kind}", path)
    return st["modules"][module]
