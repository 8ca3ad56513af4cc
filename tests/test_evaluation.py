"""bmltrt.evaluation: cached maps, the tuning search, the tables, the baselines' mechanics,
and `bmltrt evaluate`'s command line (errors: one line, exit 2)."""

import json
from pathlib import Path
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from bmltrt.cli import app
from bmltrt.evaluation.maps import (AnomalyMap, FemurCrop, IntensityMethod, MapCache, Method, ScanContext,
                                    SplitMaps, Truth, crop_map, make_crop, mask_of)
from bmltrt.evaluation.metrics import confusion
from bmltrt.evaluation.tune import SearchSpace, grid_counts, pooled_dice, tune_method
from bmltrt.postprocess import PostConfig

from conftest import REPO, dataset_of, needs_torch, save_nifti

SPACING = (3.0, 0.5, 0.5)


# -- a tiny cached set, built by hand -------------------------------------------------------

def _toy_case(rng, name, lesion_at):
    """A (6, 48, 48) case: femur disc on four slices, one bright lesion, noisy anomaly map."""
    shape = (6, 48, 48)
    yy, xx = np.mgrid[:48, :48]
    femur = np.zeros(shape, bool)
    femur[1:5] = ((yy - 24) ** 2 + (xx - 24) ** 2 < 14 ** 2)
    lesion = np.zeros(shape, bool)
    y, x = lesion_at
    lesion[2:4] = ((yy - y) ** 2 + (xx - x) ** 2 < 4 ** 2)
    lesion &= femur
    score = (0.15 * rng.random(shape) + 0.7 * lesion + 0.25 * (rng.random(shape) > 0.97)).astype(np.float32) * femur
    return Truth(name, lesion, femur, SPACING, float(np.prod(SPACING))), femur, score


class _Fixed(Method):
    name = "ours"

    def __init__(self, key_models="toy"):
        self.models = key_models
        self.resolution = 64


@pytest.fixture
def tiny_cached(tmp_path):
    rng = np.random.default_rng(3)
    cache = MapCache(tmp_path / "cache")
    maps = SplitMaps(tmp_path, "val")
    method = _Fixed()
    for i, at in enumerate([(20, 22), (28, 26), (24, 18)]):
        truth, femur, score = _toy_case(rng, f"c{i}", at)
        crop = make_crop(femur, SPACING, "", 1.0)
        amap = crop_map(score, crop)
        desc = {"case": i}
        cache.put(desc, {"score": amap.score, "otsu": amap.otsu})
        maps.cases.append(truth.case)
        maps.truths[truth.case] = truth
        maps.crops[("toy", truth.case)] = crop
        maps.map_keys[(method.key, truth.case)] = desc
    return maps, cache, method


def test_cache_round_trip_and_crop_paste(tmp_path):
    cache = MapCache(tmp_path)
    a = {"score": np.arange(6, dtype=np.float32).reshape(1, 2, 3), "otsu": np.ones(1, np.float32)}
    cache.put({"k": 1}, a)
    assert cache.has({"k": 1}) and not cache.has({"k": 2})
    b = cache.get({"k": 1})
    assert np.array_equal(a["score"], b["score"]) and cache.hits == 1
    # damaged entries are misses (recomputed), however they are damaged
    entry = tmp_path / f"{cache.key({'k': 1})}.npz"
    good = entry.read_bytes()
    big = {"score": np.random.default_rng(0).random((4, 64, 64)).astype(np.float32), "otsu": np.ones(1, np.float32)}
    cache.put({"k": 3}, big)
    big_entry = tmp_path / f"{cache.key({'k': 3})}.npz"
    flipped = bytearray(big_entry.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF  # inside the compressed score: bad CRC or a zlib error
    for path, damage in ((entry, b"not a zip"), (entry, good[: len(good) // 2]), (big_entry, bytes(flipped))):
        path.write_bytes(damage)
        assert cache.get({"k": 1} if path == entry else {"k": 3}) is None
        assert not cache.has({"k": 1} if path == entry else {"k": 3})  # so compute_split makes it again
    femur = np.zeros((5, 40, 40), bool)
    femur[1:4, 10:20, 12:22] = True
    crop = make_crop(femur, SPACING, "", 1.0)
    assert crop.slices == [1, 2, 3]
    assert np.array_equal(crop.paste(crop.femur, femur.shape), femur)
    back = FemurCrop.from_arrays(crop.to_arrays())
    assert back.box == crop.box and back.slices == crop.slices and np.array_equal(back.femur, crop.femur)
    refused = make_crop(femur, SPACING, "no femur", 0.0)
    assert refused.slices == [] and not mask_of(AnomalyMap(np.zeros((0, 0, 0), np.float32), np.zeros(0)),
                                                refused, (0.5, 0.5), PostConfig()).any()


def test_grid_search_counts_match_masks_and_pick_the_best(tiny_cached):
    maps, cache, method = tiny_cached
    space = SearchSpace((0.2, 0.5, 0.8), ("slice", "volume", "none"), (0.0, 1.0), (0.0, 1.0), (0.0, 3.0))
    counts, n_truth = grid_counts(maps, cache, method.key, "toy", space, list(space.floors))
    assert len(counts) == space.size and n_truth == sum(int(t.lesion.sum()) for t in maps.truths.values())
    for (floor, scope, op, cl, ma), (tp, pred) in counts.items():
        cfg = PostConfig(floor=floor, otsu_scope=scope, opening_mm=op, closing_mm=cl, min_area_mm2=ma)
        want_tp = want_pred = 0
        for case in maps.cases:
            crop, truth = maps.crops[("toy", case)], maps.truths[case]
            m = crop.paste(mask_of(maps.amap(cache, method.key, case), crop, truth.pixel_mm, cfg), truth.shape)
            c = confusion(m, truth.lesion)
            want_tp += c.tp
            want_pred += c.tp + c.fp
        assert (tp, pred) == (want_tp, want_pred), (floor, scope, op, cl, ma)
    r = tune_method(maps, cache, method, space)
    best = max(pooled_dice(tp, pred, n_truth) for tp, pred in counts.values())
    assert math.isclose(r["dice"], best) and r["dice"] > 0.8
    assert r["grid_points"] == space.size and r["top"][0]["dice"] == r["dice"]
    assert r["best"]["floor"] in space.floors


def test_otsu_scopes():
    from bmltrt.postprocess.lesion import mask_from_anomaly, otsu_thresholds

    diff = np.zeros((2, 10, 10), np.float32)
    femur = np.ones_like(diff, bool)
    diff[0, 2:5, 2:5] = 0.9  # bright on slice 0 only
    diff[1] = 0.3  # flat on slice 1: no spread, no per-slice Otsu
    otsu = otsu_thresholds(diff, femur)
    assert np.isinf(otsu[1])
    px = (1.0, 1.0)
    none = PostConfig(floor=0.2, otsu_scope="none", opening_mm=0, closing_mm=0, min_area_mm2=0)
    assert mask_from_anomaly(diff, otsu, femur, px, none)[1].all()  # the floor alone passes slice 1
    per_slice = PostConfig(floor=0.2, otsu_scope="slice", opening_mm=0, closing_mm=0, min_area_mm2=0)
    assert not mask_from_anomaly(diff, otsu, femur, px, per_slice)[1].any()
    vol = PostConfig(floor=0.2, otsu_scope="volume", opening_mm=0, closing_mm=0, min_area_mm2=0)
    assert mask_from_anomaly(diff, otsu, femur, px, vol)[0].sum() == 9
    with pytest.raises(ValueError):
        PostConfig(otsu_scope="image")


def test_intensity_baseline_map():
    rng = np.random.default_rng(0)
    truth, femur, _ = _toy_case(rng, "a", (24, 24))
    norm = (0.4 + 0.05 * rng.random(femur.shape) + 0.5 * truth.lesion).astype(np.float32)
    crop = make_crop(femur, SPACING, "", 1.0)
    full = IntensityMethod("toy").compute(ScanContext("a", norm, SPACING, femur, crop))
    assert full.min() >= 0 and full.max() <= 1 and not full[~femur].any()
    assert full[truth.lesion].mean() > 0.9 > full[femur & ~truth.lesion].mean()


# -- against detect itself ------------------------------------------------------------------

def test_evaluation_masks_are_detects_masks(phantom_case, detector, tmp_path):
    from bmltrt.evaluation.maps import OursMethod, compute_split
    from bmltrt.io import load_scan

    scan_path, _ = phantom_case
    data = dataset_of(tmp_path / "ds", {"test": [scan_path]})
    maps = compute_split(data, "test", [("shipped", detector)], [OursMethod(detector, "shipped")], MapCache(None))
    case = maps.cases[0]
    crop, truth = maps.crops[("shipped", case)], maps.truths[case]
    det = detector.detect(load_scan(scan_path))
    for cfg in (detector.config.post, PostConfig(floor=0.3, otsu_scope="none", closing_mm=2.0)):
        mine = crop.paste(mask_of(maps.amap(MapCache(None), "ours/shipped/256", case), crop, truth.pixel_mm, cfg),
                          truth.shape)
        if cfg is detector.config.post:
            assert np.array_equal(mine, det.lesion.astype(bool))
        assert mine.any()
    assert crop.femur_dice > 0.95 and not crop.refused


# -- tables ------------------------------------------------------------------------------------

def _summary(dice):
    region = {"pooled": {"dice": dice, "iou": dice / (2 - dice), "sensitivity": 0.8, "specificity": 0.99,
                         "accuracy": 0.98},
              "per_case_mean": {"dice": dice - 0.01, "iou": 0.5, "sensitivity": 0.7, "specificity": 0.99,
                                "accuracy": 0.98}, "counts": {}}
    return {"n_cases": 2, "volume": region, "femur": region,
            "lesion_wise": {"n_true": 3, "n_pred": 4, "sensitivity": 1.0, "precision": 0.75, "f1": 0.857},
            "size_groups": [{"n_cases": 1, "volume_mm3_min": 10.0, "volume_mm3_max": 10.0, "dice_mean": dice - 0.1,
                             "iou_mean": 0.4},
                            {"n_cases": 1, "volume_mm3_min": 90.0, "volume_mm3_max": 90.0, "dice_mean": dice + 0.1,
                             "iou_mean": 0.6}]}


def _doc(label="new", dices=(0.6, 0.7), base_dice=0.65):
    rows = [{"key": f"ours/{label}/{r}", "method": "ours", "title": "LaMa", "models": label, "resolution": r,
             "status": "ok", "params": {"floor": 0.5, "opening_mm": 1.2, "closing_mm": 1.2, "min_area_mm2": 4.0,
                                        "otsu_scope": "slice"}, "params_source": "tuned", "summary": _summary(d),
             "femur_dice_mean": 0.99} for r, d in zip((256, 448), dices)]
    rows.append({"key": f"intensity/{label}", "method": "intensity", "title": "HE", "models": label,
                 "resolution": None, "status": "ok", "params": None, "summary": _summary(base_dice)})
    rows.append({"key": "mkd/448", "method": "mkd", "title": "MKD", "models": None, "resolution": 448,
                 "status": "not run", "note": "needs VGG16 ImageNet weights, not available"})
    return {"format": "bmltrt-evaluation-2", "command": "bmltrt evaluate x", "date": "2026-11-25T00:00:00+00:00",
            "data": {"path": "ds", "split": "test", "n_cases": 2, "n_lesions": 3, "mode": "phantom"},
            "backend": {"name": "onnxruntime", "device": "cpu", "precision": "fp32"},
            "model_sets": [{"label": label}], "rows": rows, "cases": [{"row": "x", "case": "a", "dice": 0.5}]}


def test_table_writers(tmp_path):
    from bmltrt.evaluation.tables import (README_BEGIN, README_END, csv_text, merge, paste_readme, report_markdown,
                                          resolution_markdown, verdict, write_outputs)

    doc = _doc()
    paths = write_outputs(doc, tmp_path)
    assert {"evaluation.json", "table1.csv", "table1.md", "cases.csv", "figure3.png"} <= set(paths)
    assert json.loads((tmp_path / "evaluation.json").read_text())["rows"][0]["key"] == "ours/new/256"
    header = csv_text(doc).splitlines()[0].split(",")
    for col in ("volume_dice_pooled", "volume_dice_per_case_mean", "femur_specificity_pooled",
                "volume_accuracy_per_case_mean", "lesion_f1", "lesion_precision", "paper_dice", "paper_accuracy"):
        assert col in header
    md = (tmp_path / "table1.md").read_text()
    assert "0.42" in md and "0.39" in md  # the paper's Dice at 448 and 256 beside ours
    assert "needs VGG16 ImageNet weights, not available" in md and "0.20" in md  # MKD's row and paper number
    assert "figure3.png" in md and "over the true femur" in md
    assert verdict(doc) == ["ours [new] at 448 (pooled Dice 0.700) beats HE intensity threshold (0.650)",
                            "ours [new] at 448: autoencoder not run"]
    assert "does NOT beat" in verdict(_doc(dices=(0.6, 0.6), base_dice=0.65))[0]
    both = merge([doc, _doc("old", (0.5, 0.55))])
    res = resolution_markdown([both])
    assert "Dice [new]" in res and "Dice [old]" in res and "| 448 | 0.42 | 0.700 | 0.857 | 0.550 |" in res
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n\n{README_BEGIN}\nold stuff\n{README_END}\n\nafter\n")
    paste_readme(readme, report_markdown([doc, _doc("old")], short=True))
    text = readme.read_text()
    assert "old stuff" not in text and "before" in text and "after" in text and "0.42" in text
    assert text.count(README_BEGIN) == 1 and "Dice [old]" in text


# -- the models folder's tuned post-processing ------------------------------------------------

def test_detect_reads_the_tuned_postprocessing(tmp_path):
    from bmltrt.pipeline import DetectConfig, Detector
    from bmltrt.postprocess.tuned import tuned_document, write_tuned
    from bmltrt.runtime.backends import make_backend
    from bmltrt.runtime.models import ModelStore, default_models_dir

    models = tmp_path / "models"
    models.mkdir()
    for f in default_models_dir().glob("*.onnx"):
        (models / f.name).symlink_to(f)
    (models / "manifest.json").write_text((default_models_dir() / "manifest.json").read_text())
    man = ModelStore.open(models).manifest
    entry = {"floor": 0.33, "opening_mm": 0.8, "closing_mm": 2.0, "min_area_mm2": 10.0, "otsu_scope": "none",
             "val_dice": 0.5}
    write_tuned(models, tuned_document(man, {256: entry}, {"data": "x", "split": "val"}))
    be, _ = make_backend("onnxruntime", "cpu", models)
    d = Detector(be, DetectConfig(resolution=256))
    assert d.config.post.floor == 0.33 and d.config.post.otsu_scope == "none" and not d.post_warnings
    assert "postprocess.json" in d.config.post_source
    d = Detector(be, DetectConfig(resolution=256, post_overrides={"floor": 0.7}))
    assert d.config.post.floor == 0.7 and d.config.post.closing_mm == 2.0
    assert Detector(be, DetectConfig(resolution=128)).config.post == PostConfig()  # no entry for 128
    doc = json.loads((models / "postprocess.json").read_text())
    doc["models"]["inpainter_256"] = "0" * 64
    (models / "postprocess.json").write_text(json.dumps(doc))
    assert "tuned with another inpainter_256" in Detector(be, DetectConfig(resolution=256)).post_warnings[0]



@pytest.mark.parametrize("bad", [{"floor": 5.0}, {"floor": float("nan")}, {"opening_mm": -3},
                                 {"closing_mm": "wide"}, {"nbins": 0}, {"otsu_scope": "all"}, 7,
                                 {"flor": 0.1}])
def test_detect_refuses_a_postprocessing_file_with_bad_values(tmp_path, phantom_case, bad):
    """A hand-edited postprocess.json with a floor above 1, NaN or a negative footprint made
    detect find nothing and say nothing; now one line, exit 2, no outputs."""
    from bmltrt.cli import app as cli_app
    from bmltrt.runtime.models import default_models_dir

    models = tmp_path / "models"
    models.mkdir()
    for f in default_models_dir().glob("*.onnx"):
        (models / f.name).symlink_to(f)
    (models / "manifest.json").write_text((default_models_dir() / "manifest.json").read_text())
    entry = bad if not isinstance(bad, dict) else {**PostConfig().to_dict(), **bad}
    (models / "postprocess.json").write_text(json.dumps({"format": "bmltrt-postprocess-1",
                                                         "by_resolution": {"256": entry}}))
    r = CliRunner().invoke(cli_app, ["detect", str(phantom_case[0]), "-o", str(tmp_path / "out"), "--models", str(models),
                                     "-r", "256"])
    line = _one_line_exit_2(r)
    assert "postprocess.json" in line and "resolution 256" in line
    assert not any((tmp_path / "out").glob("*.nii.gz"))


def _models_copy(root: Path) -> Path:
    from bmltrt.runtime.models import default_models_dir

    root.mkdir()
    for f in default_models_dir().glob("*.onnx"):
        (root / f.name).symlink_to(f)
    (root / "manifest.json").write_text((default_models_dir() / "manifest.json").read_text())
    return root


def _set(doc: dict, dotted: str, value) -> dict:
    *path, last = dotted.split(".")
    d = doc
    for k in path:
        d = d[int(k)] if isinstance(d, list) else d[k]
    last = int(last) if isinstance(d, list) else last
    if value is _DELETE:
        del d[last]
    else:
        d[last] = value
    return doc


_DELETE = object()


@pytest.mark.parametrize("edit,said", [
    ("models.inpainter_256.resolution=abc", "resolution 'abc' is not a whole number"),
    ("models.inpainter_256.resolution=DELETE", "resolution None is not a whole number"),
    ("default_resolution=abc", "default_resolution 'abc'"),
    ("default_resolution=999", "no inpainter for the models folder's default resolution 999"),
    ("models.inpainter_256.precisions=fp32", "precisions is not a JSON object"),
    ("models.inpainter_256.precisions.fp32.file=3", "inpainter_256 fp32: no file name"),
    ("models.segmenter.config.patch=16", "config.patch 16 is not three whole numbers"),
    ("models.segmenter.kind=unet", "kind 'unet' is not segmenter or inpainter"),
    ("postprocess=[1, 2]", "postprocess.json is not a bmltrt post-processing file"),
    ('postprocess={"models": "x", "by_resolution": {}}', "postprocess.json is not a bmltrt post-processing file"),
    ('postprocess={"tuned": [], "by_resolution": {}}', "postprocess.json is not a bmltrt post-processing file"),
    ('postprocess={"format": "other", "by_resolution": {}}', "format 'other'"),
    ("postprocess=" + "[" * 100000 + "]" * 100000, "RecursionError"),
    ("postprocess=LINK", "postprocess.json is not a bmltrt post-processing file"),
    ("graph=damaged", "cannot read the graph"),
    ("models.segmenter.config.overlap=DELETE", "config.overlap None"),
    ("models.segmenter.config.patch=[16, 112, 113]", "is not the graph's input"),
    ("models.segmenter.config.inplane_spacing_mm=0.01", "inplane_spacing_mm 0.01"),
    ("models.segmenter.precisions.fp32.io.inputs=x", "io.inputs is not a list"),
    ("models.segmenter.precisions.fp32.io.inputs.0.shape=DELETE", "shape None"),
    ("models.segmenter.precisions.fp32.io.inputs.0.name=wrong", "the graph's tensor image (float32) is wrong (float32) in the manifest"),
    ("models.inpainter_128.resolution=256", "both claim resolution 256"),
    ("models.inpainter_128.kind=DELETE", "kind None"),
    ("format=bmltrt-models-99", "format 'bmltrt-models-99'"),
    ("manifest=" + "[" * 100000 + "]" * 100000, "manifest.json is not valid JSON (RecursionError)"),
])
def test_a_damaged_models_folder_is_one_line_before_any_scan(tmp_path, phantom_case, edit, said):
    """Hand edits and bad copies of a models folder crashed as 'internal error', exit 1."""
    from bmltrt.cli import app as cli_app
    from bmltrt.io.checksum import file_sha256
    from bmltrt.runtime.models import default_models_dir

    models = _models_copy(tmp_path / "models")
    doc = json.loads((models / "manifest.json").read_text())
    key, _, value = edit.partition("=")
    if key == "postprocess" and value == "LINK":
        (models / "postprocess.json").symlink_to(tmp_path / "gone.json")  # a broken link: not "no file"
    elif key == "postprocess":
        (models / "postprocess.json").write_text(value)
    elif key == "manifest":
        doc = None
        (models / "manifest.json").write_text(value)
    elif key == "graph":  # bytes damaged, and the damage's sha256 written into the manifest too
        (models / "inpainter_256.onnx").unlink()
        b = bytearray((default_models_dir() / "inpainter_256.onnx").read_bytes())
        b[1000:5096] = bytes(x ^ 0x5A for x in b[1000:5096])
        (models / "inpainter_256.onnx").write_bytes(bytes(b))
        sha = file_sha256(models / "inpainter_256.onnx")
        doc["models"]["inpainter_256"]["sha256"] = doc["models"]["inpainter_256"]["precisions"]["fp32"]["sha256"] = sha
        doc["files"] = {k: (sha if k == "inpainter_256.onnx" else v) for k, v in doc.get("files", {}).items()}
    else:
        _set(doc, key, _DELETE if value == "DELETE" else json.loads(value) if value[:1] in "0123456789[" else value)
    if doc is not None:
        (models / "manifest.json").write_text(json.dumps(doc))
    r = CliRunner().invoke(cli_app, ["detect", str(phantom_case[0]), "-o", str(tmp_path / "out"), "--models",
                                     str(models)])
    line = _one_line_exit_2(r)
    assert said in line, line
    assert not (tmp_path / "out").exists()


# -- command line ------------------------------------------------------------------------------

def _one_line_exit_2(r):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.output, r.stderr
    return lines[0]


def test_evaluate_bad_input_one_line_exit_2(tiny_dataset, tmp_path):
    run = CliRunner().invoke
    line = _one_line_exit_2(run(app, ["evaluate", str(tiny_dataset), "--split", "tset", "-o", str(tmp_path / "o")]))
    assert "tset" in line and "val or test" in line
    empty = tmp_path / "empty"
    (empty / "test").mkdir(parents=True)
    (empty / "dataset.json").write_text(json.dumps({"splits": {"train": [], "val": [], "test": []}}))
    assert "empty" in _one_line_exit_2(run(app, ["evaluate", str(empty), "--split", "test", "-o", str(tmp_path / "o")]))
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "is a file" in _one_line_exit_2(run(app, ["evaluate", str(tiny_dataset), "-o", str(afile)]))
    assert "--tune" in _one_line_exit_2(run(app, ["evaluate", str(tiny_dataset), "--split", "val", "--tune",
                                                  "-o", str(tmp_path / "o")]))
    assert "not found" in _one_line_exit_2(run(app, ["evaluate", str(tmp_path / "nothing"), "-o", str(tmp_path / "o")]))
    # a baseline checkpoint that is not there; a binary file given as an evaluation
    line = _one_line_exit_2(run(app, ["evaluate", str(tiny_dataset), "-o", str(tmp_path / "o"),
                                      "--autoencoder", str(tmp_path / "none.pt")]))
    assert "--autoencoder: no such checkpoint" in line
    binary = tmp_path / "scan.nii.gz"
    binary.write_bytes(bytes(range(256)) * 4)
    assert "cannot read an evaluation" in _one_line_exit_2(run(app, ["evaluate", "table", str(binary),
                                                                     "-o", str(tmp_path / "t")]))
    # the map cache: contradictions, and a file where its folder goes (--cache or $BMLTRT_CACHE)
    assert "contradict" in _one_line_exit_2(run(app, ["evaluate", str(tiny_dataset), "-o", str(tmp_path / "o"),
                                                      "--cache", str(tmp_path / "c"), "--no-cache"]))
    assert "--cache is a file" in _one_line_exit_2(run(app, ["evaluate", str(tiny_dataset), "-o",
                                                             str(tmp_path / "o"), "--cache", str(afile)]))
    line = _one_line_exit_2(run(app, ["evaluate", str(tiny_dataset), "-o", str(tmp_path / "o")],
                                env={"BMLTRT_CACHE": str(afile)}))
    assert "$BMLTRT_CACHE lies under a file" in line, line
    assert not (tmp_path / "o").exists() and not (tmp_path / "t").exists()


def test_damaged_datasets_and_masks_off_their_scans_grid_are_one_line(tmp_path):
    """A dataset.json that is not JSON, not an object, or whose split is not a list of names
    (or lists a case twice), and a truth mask of another shape, another affine or not binary:
    one line naming the file, exit 2, never scores against it."""
    run = CliRunner().invoke
    root = tmp_path / "ds"
    for kind in ("images", "femur", "lesion"):
        (root / "test" / kind).mkdir(parents=True)
    affine = np.diag([3.0, 0.5, 0.5, 1.0])
    save_nifti(root / "test" / "images" / "c.nii.gz", np.random.default_rng(0).random((12, 64, 64)), affine)
    save_nifti(root / "test" / "femur" / "c.nii.gz", np.zeros((12, 64, 64)), affine, np.uint8)
    man = root / "dataset.json"
    for text, said in (("{oops", "damaged (JSONDecodeError)"), ("[1, 2]", 'no "splits"'),
                       (json.dumps({"splits": {"test": "c"}}), 'split "test" is not a list'),
                       (json.dumps({"splits": {"test": ["c", "c"]}}), "lists case c twice")):
        man.write_text(text)
        line = _one_line_exit_2(run(app, ["evaluate", str(root), "-o", str(tmp_path / "o"), "--no-baselines"]))
        assert said in line and "dataset.json" in line, line
    man.write_text(json.dumps({"splits": {"train": [], "val": [], "test": ["c"]}}))
    lesion = root / "test" / "lesion" / "c.nii.gz"
    flipped = affine.copy()
    flipped[:3, :3] *= -1
    for data, aff, said in ((np.zeros((12, 64, 40)), affine, "grid (12, 64, 40) is not its scan's (12, 64, 64)"),
                            (np.zeros((12, 64, 64)), flipped, "affine differs"),
                            (np.where(np.arange(64) > 40, 3.7, 0.0)[None, None].repeat(12, 0).repeat(64, 1), affine,
                             "not a binary mask (values 0, 3.7)")):
        save_nifti(lesion, data, aff, np.uint8 if said.startswith(("grid", "affine")) else np.float32)
        line = _one_line_exit_2(run(app, ["evaluate", str(root), "-o", str(tmp_path / "o"), "--no-baselines"]))
        assert said in line and "c.nii.gz" in line, line
    assert not (tmp_path / "o").exists()


def test_a_damaged_evaluation_json_is_one_line(tmp_path):
    """`evaluate table` on an evaluation.json with a field deleted or of the wrong type."""
    src = json.loads((REPO / "benchmarks" / "results" / "oai_painted_test" / "evaluation.json").read_text())
    for name, doc in (("nodate", {k: v for k, v in src.items() if k != "date"}), ("rows", dict(src, rows=None)),
                      ("backend", dict(src, backend="x")), ("list", [])):
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(doc))
        line = _one_line_exit_2(CliRunner().invoke(app, ["evaluate", "table", str(p)]))
        assert ("damaged or hand-edited" in line or "not an evaluation" in line) and p.name in line, line
    p.write_text(json.dumps(src))
    assert CliRunner().invoke(app, ["evaluate", "table", str(p)]).exit_code == 0


def test_a_baseline_without_torch_is_one_line(tmp_path, monkeypatch):
    """The runtime has no torch; the autoencoder and MKD baselines run in it."""
    import importlib.util

    from bmltrt.errors import BmlError
    from bmltrt.evaluation.evaluate import baseline_needs_torch

    ck = tmp_path / "checkpoint.pt"
    ck.write_bytes(b"x")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(BmlError, match="not installed") as e:
        baseline_needs_torch("--mkd", ck)
    assert "leave out --mkd" in str(e.value)


def test_evaluate_tune_then_test(tiny_dataset, tmp_path):
    out = tmp_path / "ev"
    r = CliRunner().invoke(app, ["evaluate", str(tiny_dataset), "--tune", "--search", "quick", "--resolutions",
                                 "128,256", "--cache", str(tmp_path / "cache"), "-o", str(out)])
    assert r.exit_code == 0, r.output + r.stderr
    doc = json.loads((out / "evaluation.json").read_text())
    keys = [row["key"] for row in doc["rows"]]
    assert keys[:3] == ["ours/shipped/128", "ours/shipped/256", "intensity/shipped"]
    assert {"autoencoder", "mkd/320", "mkd/448"} <= set(keys)
    ours = doc["rows"][1]
    assert ours["status"] == "ok" and ours["params_source"].startswith("tuned on val")
    assert 0.0 <= ours["summary"]["volume"]["pooled"]["dice"] <= 1.0 and ours["femur_dice_mean"] > 0.95
    assert set(doc["tuning"]["methods"]) == set(keys[:3]) and doc["tuning"]["split"] == "val"
    # val and test hold the same scan: its maps, made for val, come from the cache for test
    assert doc["data"]["split"] == "test" and doc["timing"]["scans_loaded"] == 0 and doc["timing"]["cache_hits"] > 0
    pp = json.loads((out / "postprocess.json").read_text())
    assert set(pp["by_resolution"]) == {"128", "256"}
    for f in ("table1.md", "table1.csv", "cases.csv", "figure3.png"):
        assert (out / f).exists()
    # A second run finds every map in the cache: no scan is loaded again.
    r = CliRunner().invoke(app, ["evaluate", str(tiny_dataset), "--params", str(out / "evaluation.json"),
                                 "--resolutions", "128,256", "--cache", str(tmp_path / "cache"), "-o", str(out / "again")])
    assert r.exit_code == 0, r.output + r.stderr
    again = json.loads((out / "again" / "evaluation.json").read_text())
    assert again["timing"]["scans_loaded"] == 0
    assert again["rows"][1]["summary"] == ours["summary"]
    r = CliRunner().invoke(app, ["evaluate", "table", str(out), str(out / "again"), "-o", str(tmp_path / "t")])
    assert r.exit_code == 0, r.output + r.stderr
    assert "0.39" in (tmp_path / "t" / "report.md").read_text()


def test_evaluate_tune_save_writes_the_models_postprocessing(tiny_dataset, tmp_path):
    """`evaluate tune --save` (README: "How well it works") puts the choice into the models
    folder's postprocess.json, which detect then reads; the line says which folder."""
    from bmltrt.pipeline import DetectConfig, Detector
    from bmltrt.runtime.backends import make_backend

    shipped = Path(__file__).resolve().parents[1] / "export"
    models = tmp_path / "my[models]"  # a folder name rich would take for markup
    models.mkdir()
    for f in shipped.iterdir():
        if f.suffix == ".onnx" or f.name == "manifest.json":
            (models / f.name).symlink_to(f)
    r = CliRunner().invoke(app, ["evaluate", "tune", str(tiny_dataset), "--search", "quick", "--resolutions", "128",
                                 "--models", str(models), "--no-baselines", "--save", "-o", str(tmp_path / "t")])
    assert r.exit_code == 0, r.output + r.stderr
    text = " ".join(r.output.split())
    assert "[my[models]] saved" in text and "ours/my[models]/128 val pooled Dice" in text
    saved = json.loads((models / "postprocess.json").read_text())
    chosen = json.loads((tmp_path / "t" / "postprocess.json").read_text())
    assert saved["by_resolution"] == chosen["by_resolution"] and set(saved["by_resolution"]) == {"128"}
    det = Detector(make_backend("onnxruntime", "cpu", models_dir=models)[0], DetectConfig(resolution=128))
    assert "postprocess.json" in det.config.post_source
    assert det.config.post.floor == saved["by_resolution"]["128"]["floor"]


# -- baselines (b) and (c): mechanics at toy size ----------------------------------------------

@needs_torch
def test_autoencoder_trains_and_scores(tiny_dataset, tmp_path):
    from bmltrt.evaluation.autoencoder import AutoencoderMethod, AutoencoderScorer

    ck = tmp_path / "ae"
    r = CliRunner().invoke(app, ["train", "autoencoder", "--data", str(tiny_dataset), "--out", str(ck), "--config",
                                 "tiny", "--resolution", "32", "--steps", "4", "--batch-size", "2", "--val-every", "4"])
    assert r.exit_code == 0, r.output + r.stderr
    scorer = AutoencoderScorer(ck / "checkpoint.pt")
    assert scorer.resolution == 32 and scorer.steps == 4
    rng = np.random.default_rng(1)
    truth, femur, _ = _toy_case(rng, "a", (24, 24))
    norm = (0.5 + 0.1 * rng.random(femur.shape)).astype(np.float32)
    assert scorer.reconstruct(norm[1:3]).shape == (2, 48, 48)
    crop = make_crop(femur, SPACING, "", 1.0)
    full = AutoencoderMethod(scorer, "toy").compute(ScanContext("a", norm, SPACING, femur, crop))
    assert full.shape == femur.shape and full.min() >= 0 and not full[~femur].any()


@needs_torch
def test_mkd_mechanics_with_random_weights(tiny_dataset, tmp_path):
    import torch

    from bmltrt.errors import BmlError
    from bmltrt.evaluation.mkd import VGG16, BlockFeatures, MkdScorer, load_vgg16_features, train_mkd
    from bmltrt.training.loop import RunOptions

    # torchvision's layout (features.N.*), random weights: the file format is what is tested.
    sd = {f"features.{k}": v for k, v in BlockFeatures(VGG16, batch_norm=False).features.state_dict().items()}
    sd["classifier.0.weight"] = torch.zeros(2, 2)
    torch.save(sd, tmp_path / "vgg.pth")
    feats = load_vgg16_features(tmp_path / "vgg.pth")
    assert len(feats) == 26
    torch.save({"features.0.weight": torch.zeros(3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(BmlError, match="not VGG16"):
        load_vgg16_features(tmp_path / "bad.pth")
    opts = RunOptions(data=tiny_dataset, out=tmp_path / "mkd", steps=6, batch_size=2, lr=1e-3, val_every=6,
                      ckpt_every=6)
    res = train_mkd(opts, feats, resolution=32)
    losses = [h["loss"] for h in json.loads((tmp_path / "mkd" / "history.json").read_text())]
    assert res["steps"] == 6 and all(np.isfinite(losses))
    scorer = MkdScorer(tmp_path / "mkd" / "checkpoint.pt")
    maps = scorer.score(np.random.default_rng(0).random((2, 40, 48)).astype(np.float32))
    assert maps.shape == (2, 40, 48) and np.isfinite(maps).all() and maps.min() >= 0 and maps.max() > 0
    r = CliRunner().invoke(app, ["train", "mkd", "--vgg16-weights", str(tmp_path / "none.pth"), "--data",
                                 str(tiny_dataset), "--out", str(tmp_path / "m2")])
    assert "needs VGG16 ImageNet weights" in _one_line_exit_2(r)


def test_two_models_folders_side_by_side(tiny_dataset, tmp_path):
    from bmltrt.runtime.models import default_models_dir

    d = str(default_models_dir())
    out = tmp_path / "two"
    r = CliRunner().invoke(app, ["evaluate", str(tiny_dataset), "--models", f"new={d}", "--models", f"old={d}",
                                 "--same-femur", "--no-baselines", "-o", str(out)])
    assert r.exit_code == 0, r.output + r.stderr
    doc = json.loads((out / "evaluation.json").read_text())
    a, b = doc["rows"]
    assert (a["key"], b["key"]) == ("ours/new/256", "ours/old/256") and b["femur_from"] == "new"
    assert a["summary"] == b["summary"] and doc["timing"]["scans_loaded"] <= 1
    md = (out / "table1.md").read_text()
    assert "Dice [new]" in md and "Dice [old]" in md and "[old] scores the femur of [new]" in md
    line = _one_line_exit_2(CliRunner().invoke(app, ["evaluate", str(tiny_dataset), "--models", f"x={d}",
                                                     "--models", f"x={d}", "-o", str(tmp_path / "o")]))
    assert "labelled 'x'" in line


def test_painted_datasets_name_their_painter(tmp_path):
    """Scores on painted label maps compare only within one painter version: evaluation
    records it (datasets made before it was recorded are painter 1) and the caption says it."""
    from bmltrt.evaluation.evaluate import _painter
    from bmltrt.evaluation.tables import caption

    def ds(name, settings):
        (tmp_path / name).mkdir()
        (tmp_path / name / "dataset.json").write_text(json.dumps({"settings": settings}))
        return tmp_path / name

    assert _painter(ds("old", {"mode": "labels"})) == 1
    assert _painter(ds("new", {"mode": "labels", "painter": 2})) == 2
    assert _painter(ds("ph", {"mode": "phantom"})) is None
    doc = {"data": {"split": "test", "path": "x", "mode": "labels", "painter": 2, "n_cases": 3, "n_lesions": 4},
           "backend": {"name": "onnxruntime", "device": "cpu", "precision": "fp32"}, "date": "2026-12-06"}
    assert "(painter 2)" in caption(doc)
    doc["data"].update(mode="phantom", painter=None)
    assert "painter" not in caption(doc)


def test_an_overwritten_evaluation_keeps_no_file_of_the_earlier_run(tmp_path):
    """--overwrite: the earlier run's figure3.png (this run had no lesion to draw) or
    postprocess_<label>.json (another model set) passed for this run's; `evaluate table`
    then linked them."""
    from bmltrt.evaluation.cli import RUN_OUTPUTS, _remove_stale

    for name in ("evaluation.json", "figure3.png", "postprocess_a.json", "postprocess.json", "notes.md",
                 "postprocess_backup.txt"):
        (tmp_path / name).write_text("x")
    _remove_stale(tmp_path, RUN_OUTPUTS + ("postprocess*.json",), ["evaluation.json", "postprocess.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluation.json", "notes.md", "postprocess.json",
                                                          "postprocess_backup.txt"]
