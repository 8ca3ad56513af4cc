import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def has_torch() -> bool:
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def has_gpu() -> bool:
    from bmltrt.optional import cupy_with_gpu
    return cupy_with_gpu()[0] is not None


needs_torch = pytest.mark.skipif(not has_torch(), reason="torch not installed (pip install 'bmltrt[train]')")
needs_gpu = pytest.mark.skipif(not has_gpu(), reason="no CUDA GPU with CuPy")
needs_shared = pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data not present")


def _phantom_file(tmp_path_factory, name, seed, n_lesions):
    from bmltrt.synth.dataset import write_case
    from bmltrt.synth.phantom import PhantomConfig, make_phantom

    root = tmp_path_factory.mktemp(name)
    ph = make_phantom(seed, PhantomConfig(n_lesions=(n_lesions, n_lesions)))
    write_case(root, "t", name, ph)
    return root / "t" / "images" / f"{name}.nii.gz", ph


@pytest.fixture(scope="session")
def phantom_case(tmp_path_factory):
    """One full-size phantom case with two lesions (180 and 421 mm3), written like a dataset case."""
    return _phantom_file(tmp_path_factory, "knee", [4, 0], 2)


@pytest.fixture(scope="session")
def healthy_case(tmp_path_factory):
    return _phantom_file(tmp_path_factory, "healthy", [12, 5], 0)


@pytest.fixture(scope="session")
def detector():
    from bmltrt.pipeline import Detector
    from bmltrt.runtime.backends import make_backend

    be, _ = make_backend("onnxruntime", "cpu")
    return Detector(be)


def save_nifti(path, data, affine=None, dtype=None):
    img = nib.Nifti1Image(np.asarray(data) if dtype is None else np.asarray(data).astype(dtype),
                          np.diag([3.0, 0.5, 0.5, 1.0]) if affine is None else affine)
    nib.save(img, str(path))
    return Path(path)


def dataset_of(root: Path, splits: dict) -> Path:
    """A `bmltrt synth`-style dataset whose cases are links to existing phantom files:
    splits = {split: [image path, ...]}."""
    names = {}
    for split, scans in splits.items():
        names[split] = []
        for scan in scans:
            case = Path(scan).name.split(".nii")[0]
            for kind in ("images", "femur", "lesion"):
                d = root / split / kind
                d.mkdir(parents=True, exist_ok=True)
                (d / f"{case}.nii.gz").symlink_to(Path(scan).parent.parent / kind / f"{case}.nii.gz")
            names[split].append(case)
    man = {"format": "bmltrt-dataset-1", "settings": {"mode": "phantom"},
           "splits": {s: names.get(s, []) for s in ("train", "val", "test")}}
    (root / "dataset.json").write_text(json.dumps(man))
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, phantom_case, healthy_case):
    """train: the healthy phantom; val and test: the two-lesion phantom (links, no new scans)."""
    return dataset_of(tmp_path_factory.mktemp("tiny") / "ds",
                      {"train": [healthy_case[0]], "val": [phantom_case[0]], "test": [phantom_case[0]]})


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("BMLTRT_PROGRESS", "0")
    # Evaluation caches go to the session's temporary folder, never to ~/.cache.
    monkeypatch.setenv("BMLTRT_CACHE", str(tmp_path_factory.getbasetemp() / "bmltrt-cache"))
    os.environ.setdefault("BMLTRT_THREADS", "2")
