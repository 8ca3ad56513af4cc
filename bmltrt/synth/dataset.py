"""Write phantom datasets to disk in the layout every other command reads.

    OUT/dataset.json                 splits, cases, generator settings
    OUT/{train,val,test}/images/<case>.nii.gz   int16 scan
    OUT/{train,val,test}/femur/<case>.nii.gz    uint8 {0,1}
    OUT/{train,val,test}/lesion/<case>.nii.gz   uint8 {0,1}, inside the femur

Files are stored like OAI sagittal scans: array axes (anterior->posterior,
superior->inferior, left->right slice), spacing 0.357 x 0.357 x 3.0 mm, RAS affine.
Training subjects are healthy (femur masks only, lesion mask empty); validation and
test subjects carry lesions, in the paper's 210/45/45 proportions.
"""

from __future__ import annotations

import json
import signal
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from bmltrt.errors import BmlError
from bmltrt.io import write_nifti_atomic
from bmltrt.io.nifti import read_label_map
from bmltrt.io.outputs import SYNTH_DESCRIP, is_nifti_name, nifti_stem
from bmltrt.io.atomic import atomic_write
from bmltrt.synth.phantom import Phantom, PhantomConfig, make_phantom

SPLITS = ("train", "val", "test")
PAPER_SUBJECTS = {"train": 210, "val": 45, "test": 45}


def split_counts(n: int) -> dict[str, int]:
    if n < 3:
        raise BmlError(f"--cases {n} is too few", hint="give at least 3 (one per split)")
    total = sum(PAPER_SUBJECTS.values())
    val = max(1, round(n * PAPER_SUBJECTS["val"] / total))
    test = max(1, round(n * PAPER_SUBJECTS["test"] / total))
    return {"train": n - val - test, "val": val, "test": test}


def stored_affine(working_shape, spacing) -> np.ndarray:
    """Affine of the stored array (AP, SI, LR axes) in RAS, centred on the volume."""
    s, h, w = working_shape
    a = np.zeros((4, 4))
    a[:3, 0] = (0, -spacing[2], 0)  # axis 0 runs anterior -> posterior
    a[:3, 1] = (0, 0, -spacing[1])  # axis 1 runs superior -> inferior
    a[:3, 2] = (spacing[0], 0, 0)  # axis 2 runs left -> right
    a[3, 3] = 1
    centre = (np.array([w, h, s]) - 1) / 2
    a[:3, 3] = -a[:3, :3] @ centre
    return a


def to_stored(working: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(working.transpose(2, 1, 0))


def write_case(root: Path, split: str, case: str, ph: Phantom) -> dict:
    root = Path(root)
    aff = stored_affine(ph.image.shape, ph.spacing)
    out = {}
    for kind, arr in (("images", ph.image), ("femur", ph.femur), ("lesion", ph.lesion)):
        img = nib.Nifti1Image(to_stored(arr), aff)
        img.set_qform(aff, code=1)
        img.set_sform(aff, code=1)
        img.header.set_xyzt_units("mm", "sec")
        img.header["descrip"] = SYNTH_DESCRIP  # so that a rerun (bmltrt demo) knows its own files
        path = root / split / kind / f"{case}.nii.gz"
        write_nifti_atomic(img, path)
        out[kind] = str(path.relative_to(root))
    return out


def _make_and_write(args) -> dict:
    root, split, case, seed, index = args
    lesions = (0, 0) if split == "train" else (1, 3)
    ph = make_phantom([seed, index], PhantomConfig(n_lesions=lesions))
    files = write_case(Path(root), split, case, ph)
    return {"case": case, "split": split, "files": files, **ph.info}


def _label_case(args) -> dict:
    from bmltrt.synth.labels import phantom_from_labels
    root, split, case, seed, index, label_path = args
    ph = phantom_from_labels(label_path, [seed, index])
    files = write_case(Path(root), split, case, ph)
    return {"case": case, "split": split, "files": files, **ph.info}


def _run(jobs, fn, workers, progress):
    results = []
    if workers <= 1:
        for j in jobs:
            results.append(fn(j))
            progress()
    else:
        # Workers leave Ctrl-C to the main process (which cleans up): a worker that took it
        # would print its own traceback.
        with ProcessPoolExecutor(workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as ex:
            try:
                for r in ex.map(fn, jobs):
                    results.append(r)
                    progress()
            except BaseException:
                ex.shutdown(wait=True, cancel_futures=True)
                raise
    return results


def synth_dataset(out: Path, cases: int, seed: int, workers: int = 1, progress=lambda: None) -> dict:
    counts = split_counts(cases)
    jobs, index = [], 0
    for split in SPLITS:
        for _ in range(counts[split]):
            jobs.append((str(out), split, f"knee_{index:04d}", seed, index))
            index += 1
    results = _run(jobs, _make_and_write, workers, progress)
    return _write_manifest(out, results, {"mode": "phantom", "seed": seed, "cases": cases})


def label_case_name(path: Path) -> str:
    """The case a label map paints: its name without the NIfTI ending and "_labels"."""
    return nifti_stem(Path(path).name).replace("_labels", "")


def label_files(labels_dir: Path) -> list[Path]:
    """The label maps of a folder (NIfTI names; subfolders and hidden files are not read); an
    entry with a label map's name that is no file (a broken or looping link, a pipe) is
    refused, not skipped, and so are two maps that would paint one case."""
    from bmltrt.io.inputs import file_problem, is_regular_file

    labels_dir = Path(labels_dir)
    if not labels_dir.is_dir():
        raise BmlError("no such folder" if not labels_dir.exists() else "a file, not a folder of label maps",
                       labels_dir, "give the folder that holds the label maps (1 femur, 7 femoral lesion, ...)")
    entries = sorted(p for p in labels_dir.iterdir() if is_nifti_name(p.name) and not p.name.startswith("."))
    for p in entries:
        problem = None if is_regular_file(p) or p.is_dir() else file_problem(p)
        if problem is not None:
            raise problem
    files = [p for p in entries if is_regular_file(p)]
    if not files:
        raise BmlError("no label maps (*.nii, *.nii.gz) found", labels_dir,
                       "give a folder of label maps: 1 femur, 7 femoral lesion, ...")
    seen: dict[str, Path] = {}
    for f in files:
        other = seen.setdefault(label_case_name(f).casefold(), f)
        if other != f:  # they would write the same case files (a race between workers, too)
            raise BmlError(f"{other.name} and {f.name} would paint the same case "
                           f"{label_case_name(f)!r}", labels_dir, "rename or move one of them")
    return files


def subject_of(case: str) -> str:
    """OAI case names are <subject>_<visit> (9099363_96m): both visits are one subject."""
    head = case.split("_")[0]
    return head if head.isdigit() else case


def split_by_subject(cases: dict[str, int]) -> dict[str, str]:
    """val or test for every case (case -> lesion voxels), never one subject in both.

    Subjects are ranked by lesion burden and dealt alternately, those without lesions
    too, so both halves get small and large lesions. There is no train split: painted
    label maps are for validation (tuning) and test only.
    """
    burden: dict[str, int] = {}
    for case, n in cases.items():
        burden[subject_of(case)] = burden.get(subject_of(case), 0) + n
    with_les = sorted((s for s in burden if burden[s] > 0), key=lambda s: (-burden[s], s))
    without = sorted(s for s in burden if burden[s] == 0)
    split = {s: ("val", "test")[i % 2] for i, s in enumerate(with_les)}
    for s in without:  # to the half with fewer subjects so far
        n_val = sum(v == "val" for v in split.values())
        split[s] = "test" if n_val > len(split) - n_val else "val"
    return {case: split[subject_of(case)] for case in cases}


def synth_from_labels(out: Path, labels_dir: Path, seed: int, workers: int = 1,
                      progress=lambda: None, cases: int | None = None) -> dict:
    """Paint label maps (1 femur, 7 femoral lesion, ...): val and test splits by subject."""
    from bmltrt.synth.labels import PAINTER_VERSION

    files = label_files(labels_dir)[: cases or None]
    names, burden = [], {}
    for f in files:
        name = label_case_name(f)
        names.append(name)
        burden[name] = int((read_label_map(f) == 7).sum())
    split = split_by_subject(burden)
    jobs = [(str(out), split[name], name, seed, i, str(f)) for i, (f, name) in enumerate(zip(files, names))]
    results = _run(jobs, _label_case, workers, progress)
    return _write_manifest(out, results, {"mode": "labels", "labels_dir": str(Path(labels_dir).resolve()), "seed": seed,
                                          "painter": PAINTER_VERSION, "split": "by subject, val/test only"})


def _write_manifest(out: Path, results: list[dict], settings: dict) -> dict:
    manifest = {
        "format": "bmltrt-dataset-1",
        "settings": settings,
        "spacing_mm": [0.357, 0.357, 3.0],
        "array_axes": ["anterior->posterior", "superior->inferior", "left->right"],
        "splits": {s: [r["case"] for r in results if r["split"] == s] for s in SPLITS},
        "cases": {r["case"]: r for r in results},
    }
    atomic_write(out / "dataset.json", lambda p: Path(p).write_text(json.dumps(manifest, indent=1)))
    return manifest


def read_manifest(root: Path) -> dict:
    """A dataset's dataset.json, checked: an object whose "splits" maps split names to lists of
    case names, none twice (a case listed twice would be scored twice). One line if not."""
    man = Path(root) / "dataset.json"
    if not man.exists():
        raise BmlError("no dataset.json: not a bmltrt dataset", root, "make one with `bmltrt synth`")
    again = "make the dataset again with `bmltrt synth`"
    try:
        doc = json.loads(man.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BmlError(f"dataset.json is damaged ({type(exc).__name__})", man, again) from None
    splits = doc.get("splits") if isinstance(doc, dict) else None
    if not isinstance(splits, dict):
        raise BmlError('dataset.json is damaged (no "splits" object)', man, again)
    for name, cases in splits.items():
        if not isinstance(cases, list) or not all(isinstance(c, str) and c for c in cases):
            raise BmlError(f'dataset.json is damaged (split "{name}" is not a list of case names)', man, again)
        twice = sorted({c for c in cases if cases.count(c) > 1})
        if twice:
            raise BmlError(f'dataset.json lists case {twice[0]} twice in split "{name}"', man, again)
    return doc


def case_paths(root: Path, split: str) -> list[tuple[str, Path, Path, Path]]:
    """(case, image, femur, lesion) for every case of a split (none for a split it lacks)."""
    root = Path(root)
    cases = read_manifest(root)["splits"].get(split, [])
    return [(c, root / split / "images" / f"{c}.nii.gz", root / split / "femur" / f"{c}.nii.gz",
             root / split / "lesion" / f"{c}.nii.gz") for c in cases]
