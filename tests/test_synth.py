import json

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from bmltrt.cli import app
from bmltrt.synth.dataset import split_counts
from bmltrt.synth.phantom import PhantomConfig, make_phantom

from conftest import SHARED_DATA, needs_shared, save_nifti


def test_same_seed_gives_byte_identical_arrays():
    a = make_phantom([5, 1], PhantomConfig(n_lesions=(1, 3)))
    b = make_phantom([5, 1], PhantomConfig(n_lesions=(1, 3)))
    c = make_phantom([5, 2], PhantomConfig(n_lesions=(1, 3)))
    for k in ("image", "femur", "lesion"):
        assert getattr(a, k).tobytes() == getattr(b, k).tobytes()
    assert a.image.tobytes() != c.image.tobytes()


def test_phantom_anatomy_and_lesions():
    ph = make_phantom([9, 9], PhantomConfig(n_lesions=(3, 3)))
    assert ph.image.shape == (36, 448, 448) and ph.image.dtype == np.int16
    assert ph.femur.dtype == np.uint8 and set(np.unique(ph.femur)) == {0, 1}
    assert ph.lesion.dtype == np.uint8 and set(np.unique(ph.lesion)) == {0, 1}
    assert not (ph.lesion.astype(bool) & ~ph.femur.astype(bool)).any()
    assert ph.info["lesions_drawn"] == 3
    # lesions span several 3 mm slices and are brighter than the marrow around them
    from scipy import ndimage as ndi
    labels, n = ndi.label(ph.lesion, np.ones((3, 3, 3)))
    assert n >= 1 and ph.info["n_lesions"] == n  # drawn lesions may touch: counted as components
    assert np.isclose(sum(ph.info["lesion_volumes_mm3"]), ph.lesion.sum() * np.prod(ph.spacing))
    assert max(len(np.unique(np.argwhere(labels == i)[:, 0])) for i in range(1, n + 1)) >= 2
    marrow = ph.femur.astype(bool) & ~ndi.binary_dilation(ph.lesion.astype(bool), iterations=3)
    assert ph.image[ph.lesion.astype(bool)].mean() > 1.5 * np.median(ph.image[marrow])
    # the femur is the distal femur: it reaches the top of the field of view (the shaft)
    assert ph.femur[:, 0, :].any() and ph.femur.sum() > 1e5


def test_split_counts_follow_the_paper():
    assert split_counts(300) == {"train": 210, "val": 45, "test": 45}
    assert split_counts(6) == {"train": 4, "val": 1, "test": 1}
    assert sum(split_counts(80).values()) == 80


def test_synth_cli_writes_a_dataset(tmp_path):
    out = tmp_path / "ds"
    r = CliRunner().invoke(app, ["synth", str(out), "--cases", "3", "--seed", "1", "-j", "1"])
    assert r.exit_code == 0, r.output
    man = json.loads((out / "dataset.json").read_text())
    assert {k: len(v) for k, v in man["splits"].items()} == {"train": 1, "val": 1, "test": 1}
    val = man["splits"]["val"][0]
    img = nib.load(str(out / "val" / "images" / f"{val}.nii.gz"))
    assert np.allclose(img.header.get_zooms(), (0.357, 0.357, 3.0), atol=1e-4)
    assert img.shape == (448, 448, 36)
    assert nib.aff2axcodes(img.affine) == ("P", "I", "R")
    les = np.asanyarray(nib.load(str(out / "val" / "lesion" / f"{val}.nii.gz")).dataobj)
    fem = np.asanyarray(nib.load(str(out / "val" / "femur" / f"{val}.nii.gz")).dataobj)
    assert les.dtype == np.uint8 and les.any() and not (les & (1 - fem)).any()
    train = man["splits"]["train"][0]
    assert not np.asanyarray(nib.load(str(out / "train" / "lesion" / f"{train}.nii.gz")).dataobj).any()
    r = CliRunner().invoke(app, ["synth", str(out), "--cases", "3"])
    assert r.exit_code == 2 and "not empty" in r.stderr


def _label_map(path):
    """A small label map shaped like OAI-ZIB: sagittal axis first, 0.7 x 0.365 x 0.365 mm."""
    lab = np.zeros((20, 96, 96), np.uint16)
    zz, yy, xx = np.meshgrid(np.arange(20), np.arange(96), np.arange(96), indexing="ij")
    lab[(yy - 30) ** 2 + (xx - 48) ** 2 < 25 ** 2] = 1  # femur
    lab[(lab == 1) & ((yy - 45) ** 2 + (xx - 48) ** 2 < 6 ** 2) & (zz > 5) & (zz < 14)] = 7  # lesion
    lab[(yy > 60) & (yy < 90) & (np.abs(xx - 48) < 28)] = 3  # tibia
    lab[(yy > 56) & (yy <= 60) & (np.abs(xx - 48) < 26)] = 4  # tibial cartilage
    aff = np.diag([0.7, 0.365, 0.365, 1.0])
    return save_nifti(path, lab, aff)


def test_from_labels_paints_and_reslices(tmp_path):
    from bmltrt.synth.labels import phantom_from_labels

    ph = phantom_from_labels(_label_map(tmp_path / "k_labels.nii.gz"), 0)
    assert ph.image.shape[1:] == (448, 448) and ph.image.shape[0] == round(20 * 0.7 / 3.0)
    assert ph.lesion.any() and not (ph.lesion & (1 - ph.femur)).any()
    assert ph.image[ph.lesion.astype(bool)].mean() > ph.image[ph.femur.astype(bool) & ~ph.lesion.astype(bool)].mean()


def test_painted_subchondral_lesion_is_visible_up_to_the_bone_surface(tmp_path):
    """Every lesion voxel the truth names must look like lesion: painter 1 drew the cortex
    over the outer millimetre of subchondral lesions, so a fifth of OAI_AKOA's lesion
    voxels were no brighter than healthy marrow, and no method could score them."""
    from scipy import ndimage as ndi

    from bmltrt.synth.labels import phantom_from_labels

    path = _label_map(tmp_path / "k_labels.nii.gz")
    lab = np.asanyarray(nib.load(str(path)).dataobj).copy()
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in lab.shape], indexing="ij")
    lab[lab == 7] = 1
    # a lesion reaching the femur's lower surface (femur: radius 25 about row 30, ending at row 54)
    lab[(lab == 1) & ((yy - 50) ** 2 + (xx - 48) ** 2 < 9 ** 2) & (zz > 4) & (zz < 16)] = 7
    save_nifti(path, lab, np.diag([0.7, 0.365, 0.365, 1.0]))
    for seed in range(3):
        ph = phantom_from_labels(path, seed)
        les, fem, img = ph.lesion.astype(bool), ph.femur.astype(bool), ph.image.astype(np.float32)
        assert les.sum() > 50
        inplane = np.ones((1, 3, 3), bool)  # the map is 5 slices thick: erode within slices
        healthy = ndi.binary_erosion(fem, inplane, 4) & ~ndi.binary_dilation(les, inplane, 8)
        visible = img[les] > np.percentile(img[healthy], 90)
        assert visible.mean() > 0.8, (seed, visible.mean())  # painter 1: 0.64 for seed 0


@needs_shared
def test_from_real_labels(tmp_path):
    files = sorted((SHARED_DATA / "labels" / "OAI_AKOA").glob("*.nii.gz"))
    if not files:
        pytest.skip("no label maps")
    from bmltrt.synth.labels import phantom_from_labels

    ph = phantom_from_labels(files[0], 0)
    assert ph.image.shape[1:] == (448, 448) and 30 <= ph.image.shape[0] <= 45
    assert ph.femur.sum() > 1e4


def test_synth_cli_from_labels(tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    _label_map(labels / "a_labels.nii.gz")
    lab = np.asanyarray(nib.load(str(labels / "a_labels.nii.gz")).dataobj)
    lab[lab == 7] = 1  # a knee without lesion
    save_nifti(labels / "b_labels.nii.gz", lab, np.diag([0.7, 0.365, 0.365, 1.0]))
    out = tmp_path / "ds"
    r = CliRunner().invoke(app, ["synth", str(out), "--from-labels", str(labels), "-j", "1"])
    assert r.exit_code == 0, r.output + r.stderr
    man = json.loads((out / "dataset.json").read_text())
    # painted label maps are never training data; subjects are dealt to val and test
    assert man["splits"]["train"] == [] and man["splits"]["val"] == ["a"] and man["splits"]["test"] == ["b"]
    from bmltrt.synth.labels import PAINTER_VERSION
    assert man["settings"]["painter"] == PAINTER_VERSION  # scores compare within one painter only
    # nor can training take them as --data: the line says why, not "make a dataset"
    r = CliRunner().invoke(app, ["train", "segmenter", "--data", str(out), "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and "painted from label maps for evaluation" in r.stderr, r.output + r.stderr
    assert not (tmp_path / "run").exists()
    r = CliRunner().invoke(app, ["synth", str(tmp_path / "x"), "--from-labels", str(tmp_path / "none")])
    assert r.exit_code == 2 and "no such folder" in r.stderr
    # a label map's name on a broken link is refused (it was skipped without a word)
    (labels / "c_labels.nii.gz").symlink_to(tmp_path / "moved")
    r = CliRunner().invoke(app, ["synth", str(tmp_path / "y"), "--from-labels", str(labels), "-j", "1"])
    assert r.exit_code == 2 and "broken symbolic link" in r.stderr and not (tmp_path / "y").exists(), r.stderr
    (labels / "c_labels.nii.gz").unlink()
    # hidden files and names that only look like NIfTI are not label maps: not read
    (labels / "notes.nii.txt").write_text("x")
    (labels / "._a_labels.nii.gz").write_bytes(b"\0" * 10)
    from bmltrt.synth.dataset import label_files

    assert [f.name for f in label_files(labels)] == ["a_labels.nii.gz", "b_labels.nii.gz"]
    # two maps that would paint one case (its files written twice, by two workers at once)
    (labels / "a.nii.gz").write_bytes((labels / "b_labels.nii.gz").read_bytes())
    r = CliRunner().invoke(app, ["synth", str(tmp_path / "z"), "--from-labels", str(labels), "-j", "2"])
    assert r.exit_code == 2 and "a.nii.gz and a_labels.nii.gz would paint the same case 'a'" in r.stderr, r.stderr
    r = CliRunner().invoke(app, ["synth", str(tmp_path / "z"), "--from-labels", str(labels / "a.nii.gz")])
    assert r.exit_code == 2 and "a file, not a folder of label maps" in r.stderr and not (tmp_path / "z").exists()


def test_painted_labels_split_by_subject():
    from bmltrt.synth.dataset import split_by_subject

    cases = {"9001_00m": 0, "9001_96m": 500, "9002_00m": 40, "9002_48m": 0, "9003_00m": 0, "9003_96m": 0,
             "9004_00m": 10, "9004_96m": 0, "knee_a": 3}
    split = split_by_subject(cases)
    for subj in ("9001", "9002", "9003", "9004"):
        assert len({split[c] for c in cases if c.startswith(subj)}) == 1  # one subject, one split
    les_splits = [split[c] for c in ("9001_96m", "9002_00m", "9004_00m")]
    assert set(les_splits) == {"val", "test"}  # lesions in both halves
