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


def load_run(path: Path) -> dict:
    """A run's own checkpoint.pt for --resume, or one line: a file cut short (a full disk, a
    copy) or not a checkpoint at all is not a traceback."""
    from bmltrt.errors import BmlError

    try:
        st = load(path)
        if not isinstance(st, dict) or not {"kind", "step", "modules"} <= st.keys():
            raise ValueError("not a training checkpoint")
        int(st["step"])
    except Exception as exc:  # noqa: BLE001 - pickle and zip raise anything for a damaged file
        raise BmlError(f"the checkpoint cannot be read ({type(exc).__name__}: {str(exc)[:80]})", path,
                       "start a new run in another --out (best.pt beside it may still be whole)") from None
    return st


def weights_from_onnx(path, module: str) -> dict:
    """A module's weights from a float32 graph that `bmltrt export` wrote: its initializers
    are named `<module>.<state_dict key>`, so a shipped model (whose checkpoint is not
    shipped) can be fine-tuned with --init."""
    import onnx
    from onnx import numpy_helper

    from bmltrt.errors import BmlError

    try:
        graph = onnx.load(str(path)).graph
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: one line
        raise BmlError(f"not an ONNX graph ({type(e).__name__})", path) from None
    prefix = module + "."
    arrays = {i.name[len(prefix):]: numpy_helper.to_array(i) for i in graph.initializer if i.name.startswith(prefix)}
    inputs = [i.name for i in graph.input]
    if not arrays and "masked_and_mask" in inputs:  # the inpainter's input
        raise BmlError("this is an inpainter graph, not a segmenter's", path,
                       "give the segmenter's float32 graph (e.g. export/segmenter.onnx)")
    if not arrays or any(a.dtype != np.float32 for a in arrays.values()):
        raise BmlError(f"no float32 '{module}.*' weights in this graph", path,
                       "give the float32 graph (e.g. segmenter.onnx, not segmenter_fp16.onnx)")
    return {k: torch.from_numpy(a.copy()) for k, a in arrays.items()}


def load_weights(path, kind: str, module: str, graphs: bool = True) -> dict:
    """One module's weights from a checkpoint of the given kind, or (`graphs`, for --init)
    from an exported float32 ONNX graph."""
    from bmltrt.errors import BmlError, with_article

    if not Path(path).exists():
        raise BmlError("no such checkpoint", path)
    if graphs and Path(path).suffix == ".onnx":
        if kind == "inpainter":
            from bmltrt.export.onnx_export import generator_weights_from_graph

            return generator_weights_from_graph(path)[0]
        return weights_from_onnx(path, module)
    hint = f"give {with_article(kind)} run's checkpoint.pt or best.pt" + (
        ", or a float32 .onnx of a models folder" if graphs else "")
    try:
        st = load(path)
        found = st.get("kind")
        weights = st["modules"][module] if found == kind else None
    except Exception as exc:  # noqa: BLE001 - pickle raises anything for a file that is not a checkpoint
        raise BmlError(f"not a bmltrt checkpoint ({type(exc).__name__})", path, hint) from None
    if found is None:
        raise BmlError("not a bmltrt checkpoint (it names no kind of network)", path, hint)
    if weights is None:
        raise BmlError(f"checkpoint is {with_article(found)}, not {with_article(kind)}", path, hint)
    return weights
