import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from typer.testing import CliRunner

from bmltrt.cli import app
from bmltrt.io import load_scan
from bmltrt.runtime.sliding_window import gaussian_importance, sliding_window, window_starts

from conftest import SHARED_DATA, needs_shared


def test_window_starts_cover_and_blending_is_exact():
    assert window_starts(36, 16, 0.4) == [0, 10, 20]
    assert window_starts(10, 16, 0.4) == [0]
    vol = np.random.default_rng(0).random((20, 30, 30)).astype(np.float32)

    def predict(batch):  # logits whose softmax is a known function of the input
        return np.concatenate([np.zeros_like(batch), batch * 3], axis=1)

    prob = sliding_window(vol, (8, 16, 16), predict, batch_size=3, overlap=0.5)
    expect = 1 / (1 + np.exp(-3 * vol))
    assert prob.shape == (2, 20, 30, 30) and np.allclose(prob[1], expect, atol=1e-5)
    assert gaussian_importance((4, 4, 4)).min() > 0


@pytest.fixture(scope="module")
def canonical_result(phantom_case, detector):
    scan_path, _ = phantom_case
    return detector.detect(load_scan(scan_path))


def test_phantom_detection_is_accurate(canonical_result, phantom_case):
    _, ph = phantom_case
    d = canonical_result
    fem = ph.femur.astype(bool)
    les = ph.lesion.astype(bool)
    femur_dice = 2 * (d.femur.astype(bool) & fem).sum() / (d.femur.sum() + fem.sum())
    lesion_dice = 2 * (d.lesion.astype(bool) & les).sum() / (d.lesion.sum() + les.sum())
    assert femur_dice > 0.95
    assert lesion_dice > 0.5
    r = d.report
    assert r["lesion_count"] >= 1 and r["backend"] == "onnxruntime" and r["precision"] == "fp32"
    assert len(r["models"]["segmenter"]["sha256"]) == 64
    field_mm = max(n * s for n, s in zip(d.scan.data.shape[1:], d.scan.spacing[1:]))
    assert r["repainting_margin_mm"] == pytest.approx(3.2 * field_mm / r["resolution"], abs=1e-3)


def test_flipped_permuted_scan_gives_the_same_mask(phantom_case, canonical_result, detector, tmp_path):
    scan_path, _ = phantom_case
    img = nib.load(str(scan_path))
    data = np.asanyarray(img.dataobj)
    # stored as (S->I, R->L, P->A): permuted and flipped
    target = axcodes2ornt(("I", "L", "A"))
    tr = ornt_transform(io_orientation(img.affine), target)
    new_data = apply_orientation(data, tr)
    new_aff = img.affine @ nib.orientations.inv_ornt_aff(tr, data.shape)
    p = tmp_path / "flipped.nii.gz"
    nib.save(nib.Nifti1Image(new_data, new_aff), str(p))
    scan = load_scan(p)
    assert scan.input_axcodes == ("I", "L", "A")
    d = detector.detect(scan)
    assert np.array_equal(d.lesion, canonical_result.lesion)
    assert np.array_equal(d.femur, canonical_result.femur)
    # and the mask written back lands on the flipped grid
    from bmltrt.io import save_mask_like

    out = nib.load(str(save_mask_like(d.lesion, scan, tmp_path / "m.nii.gz")))
    assert np.allclose(out.affine, new_aff)
    canon_in = nib.load(str(scan_path))
    assert np.array_equal(np.asanyarray(out.dataobj),
                          apply_orientation(np.asanyarray(canon_in.dataobj) * 0 + _input_mask(canonical_result, scan_path), tr))


def _input_mask(result, scan_path):
    """The canonical result's lesion mask on the canonical file's grid."""
    return load_scan(scan_path).to_input_grid(result.lesion)


def test_same_input_twice_is_byte_identical(phantom_case, canonical_result, detector):
    scan_path, _ = phantom_case
    again = detector.detect(load_scan(scan_path))
    assert again.lesion.tobytes() == canonical_result.lesion.tobytes()
    assert again.femur.tobytes() == canonical_result.femur.tobytes()


def test_healthy_scan_has_no_lesion_above_min_area(healthy_case, detector):
    scan_path, _ = healthy_case
    scan = load_scan(scan_path)
    d = detector.detect(scan)
    min_px = detector.config.post.min_area_mm2 / (scan.spacing[1] * scan.spacing[2])
    from scipy import ndimage as ndi

    for s in range(d.lesion.shape[0]):
        lab, n = ndi.label(d.lesion[s])
        sizes = np.bincount(lab.ravel())[1:]
        assert not (sizes > min_px).any(), f"slice {s}: lesion of {sizes.max()} px on a healthy scan"


def test_batch_with_a_corrupt_file_finishes_the_others(phantom_case, tmp_path):
    scan_path, _ = phantom_case
    bad = tmp_path / "corrupt.nii.gz"
    b = scan_path.read_bytes()
    bad.write_bytes(b[: len(b) // 3])
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["detect", str(bad), str(scan_path), "-o", str(out)])
    assert res.exit_code == 2
    assert "corrupt.nii.gz" in res.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["bmltrt_summary.csv", "knee_bml.nii.gz", "knee_femur.nii.gz", "knee_overlay.png",
                     "knee_report.json"]
    rep = json.loads((out / "knee_report.json").read_text())
    assert {"lesion_count", "lesion_volume_mm3", "lesions", "femur_volume_mm3", "timings_s", "models"} <= set(rep)
    bml = nib.load(str(out / "knee_bml.nii.gz"))
    src = nib.load(str(scan_path))
    assert bml.shape == src.shape and np.allclose(bml.affine, src.affine)
    # a second run refuses to overwrite, and leaves the outputs alone
    before = (out / "knee_bml.nii.gz").read_bytes()
    res = CliRunner().invoke(app, ["detect", str(scan_path), "-o", str(out)])
    assert res.exit_code == 2 and "exist" in res.stderr
    assert (out / "knee_bml.nii.gz").read_bytes() == before


def test_unavailable_backend_is_said_plainly(phantom_case, tmp_path):
    scan_path, _ = phantom_case
    res = CliRunner().invoke(app, ["detect", str(scan_path), "-o", str(tmp_path / "o"), "--backend", "tensorrt"])
    assert res.exit_code == 2 and "TensorRT is not installed" in res.stderr and "tensorrt-cu12" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = CliRunner().invoke(app, ["detect", str(scan_path), "-o", str(tmp_path / "o"), "--resolution", "999"])
    assert res.exit_code == 2 and "no inpainter" in res.stderr


def test_demo_runs_and_an_interrupted_rerun_leaves_no_mixed_folder(tmp_path, monkeypatch):
    import hashlib

    import bmltrt.synth.dataset as dataset
    from bmltrt.pipeline import Detector

    demo = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "-o", str(demo)])
    assert res.exit_code == 0, res.output + res.stderr
    assert "lesion Dice" in res.output
    assert (demo / "demo_knee_overlay.png").exists()

    def state():
        return {str(f.relative_to(demo)): hashlib.sha256(f.read_bytes()).hexdigest()
                for f in sorted(demo.rglob("*")) if f.is_file()}

    before = state()
    write_case = dataset.write_case

    def stopped_while_writing(root, split, case, ph):
        write_case(root, split, case, ph)  # every file written (beside the folder), then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset, "write_case", stopped_while_writing)
    res = CliRunner().invoke(app, ["demo", "-o", str(demo), "--seed", "7"])
    assert res.exit_code == 130 and "Traceback" not in res.output + res.stderr
    assert state() == before  # the earlier demo, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # nothing left beside it
    monkeypatch.setattr(dataset, "write_case", write_case)

    def stopped_while_detecting(self, scan, progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(Detector, "detect_checked", stopped_while_detecting)
    res = CliRunner().invoke(app, ["demo", "-o", str(demo), "--seed", "7"])
    assert res.exit_code == 130
    after = state()
    assert sorted(after) == [f"input/{k}/demo_knee.nii.gz" for k in ("femur", "images", "lesion")]  # no old outputs
    assert after["input/images/demo_knee.nii.gz"] != before["input/images/demo_knee.nii.gz"]  # the seed-7 knee
    monkeypatch.undo()
    res = CliRunner().invoke(app, ["demo", "-o", str(tmp_path / "demo")])  # a rerun replaces its own files
    assert res.exit_code == 0, res.output + res.stderr
    again = state()
    assert again.pop("demo_knee_report.json") and again == {k: v for k, v in before.items()
                                                            if k != "demo_knee_report.json"}  # timings differ


def test_demo_never_replaces_a_users_files(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "demo_knee_bml.nii.gz").write_text("precious")
    (tmp_path / "e" / "input").mkdir(parents=True)
    (tmp_path / "e" / "input" / "mine.txt").write_text("precious")
    # at the very name of the demo's phantom: not the demo's (no "bmltrt synth" in its header)
    (tmp_path / "f" / "input" / "images").mkdir(parents=True)
    (tmp_path / "f" / "input" / "images" / "demo_knee.nii.gz").write_text("precious")
    (tmp_path / "g" / "demo_knee_report.json").mkdir(parents=True)  # a folder where an output goes
    said = {"d": "did not write", "e": "did not write", "f": "did not write", "g": "a folder or other non-file"}
    for d, what in said.items():
        res = CliRunner().invoke(app, ["demo", "-o", str(tmp_path / d)])
        assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert what in res.stderr, res.stderr
    assert (tmp_path / "d" / "demo_knee_bml.nii.gz").read_text() == "precious"
    assert sorted(p.name for p in (tmp_path / "e").rglob("*")) == ["input", "mine.txt"]
    assert (tmp_path / "f" / "input" / "images" / "demo_knee.nii.gz").read_text() == "precious"


@needs_shared
@pytest.mark.parametrize("name", ["pykneer_qdess_echo2_oailike_448x448x40.nii.gz",
                                  "pykneer_qdess_echo1_oailike_448x448x40.nii.gz",
                                  "pymskt_mese_t2_echo1_TE6.3.nii.gz"])
def test_real_scans_run(name, detector, tmp_path):
    p = SHARED_DATA / "real" / name
    if not p.exists():
        pytest.skip(f"{name} absent")
    from bmltrt.report import write_outputs

    d = detector.detect(load_scan(p))
    paths = write_outputs(d, tmp_path)
    assert nib.load(str(paths["bml"])).shape == nib.load(str(p)).shape
    assert d.femur.sum() > 0


def test_edge_slices_of_the_femur_are_not_searched():
    """The outermost femur slices (under EDGE_SLICE_FRACTION of the largest femur slice's
    area: partial-volume caps of the condyles) are neither inpainted nor searched, and the
    evaluation scores exactly the slices the pipeline uses."""
    from bmltrt.evaluation.maps import scored_slices
    from bmltrt.pipeline import EDGE_SLICE_FRACTION, femur_slice_plan

    spacing = (3.0, 0.5, 0.5)
    femur = np.zeros((6, 64, 64), bool)
    for s, half in enumerate((0, 3, 8, 20, 20, 12)):  # areas 0, 36, 256, 1600, 1600, 576 px
        femur[s, 32 - half:32 + half, 32 - half:32 + half] = True
    plan = femur_slice_plan(femur, spacing, EDGE_SLICE_FRACTION)
    # slice 1: 9 mm2 < 20 mm2; slice 2: 64 mm2 but 16 % of 400 mm2; slice 5: 36 % (kept)
    assert plan.tolist() == [False, False, False, True, True, True]
    assert femur_slice_plan(femur, spacing, 0.0).tolist() == [False, False, True, True, True, True]
    assert scored_slices(femur, spacing) == [3, 4, 5]
    assert scored_slices(femur, spacing, 0.0) == [2, 3, 4, 5]


def test_notches_are_filled_only_where_the_segmenter_was_unsure():
    """fill_notches: a notch cut into the femur border is filled where the femur probability
    passes the gate (a carved lesion) and left open where it is ~0 (cartilage, fluid); the
    rest of the border does not move."""
    from bmltrt.pipeline import NOTCH_FILL_GATE, NOTCH_FILL_MM, fill_notches

    spacing = (3.0, 0.36, 0.36)
    femur = np.zeros((2, 160, 160), bool)
    femur[:, 30:130, 30:130] = True
    femur[:, 30:42, 60:75] = False  # a notch 4.3 mm deep, 5.4 mm wide, in the top border
    prob = np.where(femur, 0.9, 0.0).astype(np.float32)
    prob[0, 30:42, 60:75] = 0.4  # slice 0: the segmenter was unsure in the notch (gate 0.3)
    out = fill_notches(femur, prob, spacing, NOTCH_FILL_MM, NOTCH_FILL_GATE)
    assert out[0, 34:42, 60:75].all() and out[0, 30:42, 60:75].mean() > 0.6  # filled, the mouth rounded
    assert not out[1, 30:42, 60:75].any()  # probability 0: stays open
    square = np.zeros((160, 160), bool)
    square[30:130, 30:130] = True
    assert not (out[0] & ~square).any() and (out[0] | ~femur[0]).all()  # nothing else grows or shrinks
    assert fill_notches(femur, prob, spacing, 0.0, NOTCH_FILL_GATE) is femur  # off


def test_the_femur_probability_is_pulled_onto_the_scans_edge(detector):
    """refine_probability (guided filter): a coarse probability whose 0.5 contour lies 1.4 mm
    outside the bone's edge in the scan ends up on that edge; deep inside and far outside
    it does not move; radius 0 turns it off; a bad radius or eps is refused."""
    import dataclasses

    from bmltrt.errors import BmlError
    from bmltrt.pipeline import Detector
    from bmltrt.postprocess.guided import guided_filter

    spacing = (3.0, 0.36, 0.36)
    yy = np.arange(160)[None, :, None] * np.ones((2, 1, 160))
    norm = np.where(yy < 80, 0.3, 0.9).astype(np.float32)  # bone (dark marrow) above row 80
    norm += np.random.default_rng(0).normal(0, 0.02, norm.shape).astype(np.float32)
    prob = (1 / (1 + np.exp((yy - 84) / 3.0))).astype(np.float32)  # 0.5 at row 84: 4 px too far
    out = detector.refine_probability(norm, prob, spacing)
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    rows = (out > 0.5).sum(axis=1)  # per column: how many rows are femur
    assert np.abs(rows - 80).max() <= 1 and np.abs((prob > 0.5).sum(axis=1) - 84).max() == 0
    assert np.allclose(out[:, :40], prob[:, :40], atol=0.02) and np.allclose(out[:, 130:], prob[:, 130:], atol=0.02)
    flat = np.full((1, 50, 50), 0.7, np.float32)  # a constant probability stays constant
    assert np.allclose(guided_filter(norm[:1, :50, :50], flat, (5, 5), 0.01), 0.7, atol=1e-4)
    off = Detector(detector.backend, dataclasses.replace(detector.config, femur_refine_mm=0.0))
    assert off.refine_probability(norm, prob, spacing) is prob
    for mm, eps, passes in ((-1.0, 0.01, 1), (4.0, 0.0, 1), (4.0, 0.01, 0)):
        with pytest.raises(BmlError, match="femur refinement"):
            Detector(detector.backend, dataclasses.replace(detector.config, femur_refine_mm=mm, femur_refine_eps=eps,
                                                           femur_refine_passes=passes))


def test_femur_slices_with_a_sliver_of_femur_are_dropped_from_the_mask(detector):
    """femur_mask drops slices with under femur_min_slice_fraction of the largest femur
    slice's area (fragments beside the outermost condyle on real scans)."""
    import dataclasses

    from bmltrt.pipeline import Detector

    prob = np.zeros((4, 64, 64), np.float32)
    prob[:, 10:50, 10:50] = 0.9
    prob[0, 10:50, 10:50] = 0.0
    prob[0, 28:32, 28:32] = 0.9  # 16 px: 1 % of a full slice, connected to slice 1
    prob[3, 10:50, 10:50] = 0.0
    prob[3, 20:36, 20:36] = 0.9  # 256 px: 16 %
    spacing = (3.0, 0.5, 0.5)
    femur = detector.femur_mask(prob, spacing)
    assert femur.reshape(4, -1).sum(1).tolist() == [0, 1600, 1600, 256]
    keep_all = Detector(detector.backend, dataclasses.replace(detector.config, femur_min_slice_fraction=0.0))
    assert keep_all.femur_mask(prob, spacing)[0].sum() == 16


def test_mirror_averaging_makes_the_femur_of_a_mirrored_knee_its_mirror(phantom_case, detector):
    """mirror_tta (on by default) averages the femur probability with that of the knee
    mirrored left <-> right: the probability of a mirrored knee is then exactly the mirror
    of the knee's. Without it the two differ (patch tiling, an imperfectly symmetric net)."""
    import dataclasses

    from bmltrt.pipeline import Detector
    from bmltrt.runtime.preprocess import normalize_intensity

    scan = load_scan(phantom_case[0])
    norm = normalize_intensity(scan.data)
    mirrored = np.ascontiguousarray(norm[::-1])
    assert detector.config.mirror_tta
    ticks = []
    p = detector.femur_probability(norm, scan.spacing, on_patch=lambda d, n: ticks.append((d, n)))
    n = ticks[-1][1]  # progress counts the patches of both passes, up to all of them
    assert ticks[-1][0] == n and [d for d, _ in ticks] == sorted(d for d, _ in ticks) and ticks[0][0] < n / 2
    assert np.allclose(detector.femur_probability(mirrored, scan.spacing)[::-1], p, atol=1e-6)
    single = Detector(detector.backend, dataclasses.replace(detector.config, mirror_tta=False, femur_refine_mm=0.0,
                                                            seg_antialias=0.0))
    q, q_mirrored = single.femur_probability(norm, scan.spacing), single.femur_probability(mirrored, scan.spacing)[::-1]
    assert np.abs(q - q_mirrored).max() > 1e-3
    both = Detector(detector.backend, dataclasses.replace(single.config, mirror_tta=True))
    assert np.allclose(both.femur_probability(norm, scan.spacing), 0.5 * (q + q_mirrored), atol=1e-6)


def test_averaged_repaintings_make_the_repainting_of_a_mirrored_slice_its_mirror(phantom_case, detector):
    """inpaint_mirrors=4 averages the repaintings of a slice and of its three in-plane mirrors,
    so a mirrored slice is repainted as the mirror of the slice's repainting (on a grid that
    needs no padding or resizing); one pass is not mirror-symmetric; a bad count is refused."""
    import dataclasses

    from bmltrt.errors import BmlError
    from bmltrt.pipeline import Detector
    from bmltrt.runtime.preprocess import normalize_intensity

    scan = load_scan(phantom_case[0])
    norm, femur_truth = normalize_intensity(scan.data), load_scan(
        str(phantom_case[0]).replace("images", "femur"), is_mask=True).data > 0
    s = int(np.argmax(femur_truth.sum((1, 2))))
    h, w = norm.shape[1:]
    top, left = (h - 256) // 2, (w - 256) // 2
    x = np.ascontiguousarray(norm[s - 1:s + 2, top:top + 256, left:left + 256])
    fem = np.ascontiguousarray(femur_truth[s - 1:s + 2, top:top + 256, left:left + 256])
    spacing = (scan.spacing[0], 0.5, 0.5)
    for k, symmetric in ((1, False), (4, True)):
        det = Detector(detector.backend, dataclasses.replace(detector.config, resolution=256, inpaint_mirrors=k,
                                                             edge_slice_fraction=0.0))
        comp, keep = det.inpaint(x, fem, spacing)
        comp_m, _ = det.inpaint(np.ascontiguousarray(x[:, ::-1]), np.ascontiguousarray(fem[:, ::-1]), spacing)
        assert keep.all() and (comp != x).any()
        assert np.allclose(comp_m[:, ::-1], comp, atol=1e-5) == symmetric
    with pytest.raises(BmlError, match="inpaint_mirrors"):
        Detector(detector.backend, dataclasses.replace(detector.config, inpaint_mirrors=3))


def test_segmenter_grid_antialiasing_cuts_fine_pixel_noise_and_keeps_edges():
    """to_segmenter_grid: antialias 0 is plain linear resampling; > 0 smooths each in-plane
    axis that shrinks before resampling, so the noise of 0.36 mm pixels does not reach the
    1.6 mm grid, while a bone edge stays where it was; slices are never smoothed, and an
    axis that is not shrunk is left alone."""
    from bmltrt.runtime.preprocess import inplane_shape, to_segmenter_grid, zoom_to

    rng = np.random.default_rng(0)
    spacing = (3.0, 0.36, 0.36)
    step = np.zeros((3, 440, 440), np.float32)
    step[:, :, 220:] = 1.0  # an edge half way across the columns
    noise = rng.standard_normal(step.shape).astype(np.float32) * 0.2
    plain = to_segmenter_grid(step + noise, spacing, 1.6)
    assert np.array_equal(plain, zoom_to(step + noise, inplane_shape(step.shape, spacing, 1.6)))
    smooth = to_segmenter_grid(step + noise, spacing, 1.6, antialias=2.5)
    assert smooth.shape == plain.shape == (3, 99, 99)
    flat = slice(10, 40)  # columns far from the edge: only noise varies there
    assert smooth[:, :, flat].std() < 0.25 * plain[:, :, flat].std()
    crossing = [np.flatnonzero(r > 0.5)[0] for r in smooth.reshape(-1, 99)]
    assert set(crossing) <= {49, 50} and (plain[:, :, 49:] > 0.5).mean() > 0.9
    slab = np.zeros((3, 40, 40), np.float32)
    slab[1] = 1.0  # one bright slice: the slice axis is not smoothed
    assert np.array_equal(to_segmenter_grid(slab, (3.0, 1.6, 1.6), 1.6, antialias=2.5), slab)


def test_sharp_pass_adds_only_bright_femur_to_the_smoothed_pass(phantom_case, detector):
    """By default the femur probability is the smoothed pass's, raised to the sharp pass's
    where the scan is brighter than the femur's 90th intensity percentile (bright lesions);
    seg_antialias 0 is the sharp pass alone, lesion_rescue_percentile 0 the smoothed alone."""
    import dataclasses

    from bmltrt.pipeline import Detector
    from bmltrt.runtime.preprocess import normalize_intensity

    scan = load_scan(phantom_case[0])
    norm = normalize_intensity(scan.data)
    c = detector.config
    assert c.seg_antialias > 0 and c.lesion_rescue_percentile > 0
    both = detector.femur_probability(norm, scan.spacing)
    smooth = Detector(detector.backend, dataclasses.replace(c, lesion_rescue_percentile=0.0)).femur_probability(
        norm, scan.spacing)
    sharp = Detector(detector.backend, dataclasses.replace(c, seg_antialias=0.0)).femur_probability(norm, scan.spacing)
    assert np.abs(smooth - sharp).max() > 0.2  # the smoothing changes what the segmenter sees
    assert (both >= smooth - 1e-6).all()
    raised = both > smooth + 1e-6
    assert raised.any() and np.allclose(both[raised], sharp[raised], atol=1e-6)
    marrow = norm[smooth > 0.5]
    assert norm[raised].min() > np.percentile(marrow, 75)  # only bright voxels are raised
    added = (both > 0.5) & (smooth <= 0.5)  # femur that only the sharp pass saw
    assert added.sum() < 0.1 * (smooth > 0.5).sum()


def test_repainting_margin_is_counted_in_inpainter_pixels(detector):
    """By default the femur is grown by MASK_DILATE_INPAINTER_PX pixels of the inpainter's
    grid, so by a wider margin at a coarser resolution or a larger field (painted-OAI val,
    benchmarks/results/inpaint_margin/); a number given is that margin in mm everywhere."""
    import dataclasses
    import sys

    from bmltrt.pipeline import MASK_DILATE_INPAINTER_PX, DetectConfig, Detector

    oai = ((37, 448, 448), (3.0, 160 / 448, 160 / 448))  # a 160 mm field, as OAI's sagittal IW
    margins = {r: Detector(detector.backend, DetectConfig(resolution=r)).repainting_margin_mm(*oai)
               for r in (128, 256, 448)}
    assert margins == pytest.approx({128: 4.0, 256: 2.0, 448: 2 * 256 / 448})
    # non-square scan pixels (0.357 x 0.714 mm, 448 x 224: a 160 mm field): the inpainter still
    # gets square pixels of 160 / 256 mm (slices_to_square pads to a square in mm), so 2 mm,
    # 6 scan pixels along the rows and 3 along the columns
    det256 = Detector(detector.backend, DetectConfig(resolution=256))
    wide = ((37, 448, 224), (3.0, 160 / 448, 320 / 448))
    assert det256.repainting_margin_mm(*wide) == pytest.approx(2.0)
    assert det256.repainting_footprint(*wide).shape == (1, 13, 7)
    # a 120 mm field (320 pixels of 0.375 mm) padded to a square: pixels of 120 / 256 mm
    small_field = det256.repainting_margin_mm((30, 320, 280), (3.0, 0.375, 0.375))
    assert small_field == pytest.approx(MASK_DILATE_INPAINTER_PX * 120 / 256)
    given = Detector(detector.backend, DetectConfig(resolution=448, mask_dilate_mm=3.0))
    assert given.repainting_margin_mm(*oai) == 3.0
    assert dataclasses.asdict(DetectConfig())["mask_dilate_mm"] is None  # "by the scan's grid"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from with_detect_config import detect_config_overrides

    assert detect_config_overrides(["mask_dilate_mm=1.5"]) == {"mask_dilate_mm": 1.5}
    # the evaluation cache keys a map by the margin the scan's grid resolves: the rule and the
    # number it gives share maps, another field of view does not
    from bmltrt.evaluation.maps import OursMethod

    def key(config, grid):
        return OursMethod(Detector(detector.backend, config), "a").identity_for(*grid)

    assert key(DetectConfig(resolution=128), oai) == key(DetectConfig(resolution=128, mask_dilate_mm=4.0), oai)
    assert key(DetectConfig(resolution=128), oai) != key(DetectConfig(resolution=128), ((37, 384, 384), oai[1]))


def test_the_inpainter_gets_square_pixels_from_non_square_scan_pixels():
    """A disc of 40 mm on a 0.357 x 0.714 mm grid (448 x 224 pixels, a 160 mm field) is a
    disc on the inpainter's square grid, centred, and comes back to the scan's pixels."""
    from bmltrt.runtime.preprocess import slices_to_square, square_to_slices

    sy, sx = 160 / 448, 160 / 224
    yy, xx = np.mgrid[:448, :224]
    disc = ((((yy + 0.5) * sy - 80) ** 2 + ((xx + 0.5) * sx - 80) ** 2) <= 20 ** 2).astype(np.float32)[None]
    sq = slices_to_square(disc, 256, pixel_mm=(sy, sx))[0] > 0.5
    rows, cols = np.flatnonzero(sq.any(1)), np.flatnonzero(sq.any(0))
    assert abs(len(rows) - len(cols)) <= 1 and abs(len(rows) - 64) <= 2  # 40 mm at 160 / 256 mm a pixel
    assert abs(rows.mean() - 127.5) < 1 and abs(cols.mean() - 127.5) < 1
    back = square_to_slices(sq[None].astype(np.float32), 448, 224, pixel_mm=(sy, sx))[0] > 0.5
    assert back.shape == (448, 224) and (back ^ (disc[0] > 0.5)).sum() < 0.03 * disc.sum()
    # square pixels: the same as without pixel sizes (a square of pixels)
    img = np.random.default_rng(0).random((2, 300, 200)).astype(np.float32)
    assert np.array_equal(slices_to_square(img, 128, pixel_mm=(0.4, 0.4)), slices_to_square(img, 128))


def test_the_python_api_refuses_what_it_cannot_use_in_one_line(detector):
    """detect_image: arrays of non-numbers, affines that are not voxel grids, an image with an
    affine as well; DetectConfig values out of range. A BmlError each, before any network
    runs (they were nibabel and numpy errors, or silently accepted). 64-bit integers, bool
    and float128 arrays are cast, as the CLI reads such files."""
    import dataclasses

    import nibabel as nib

    from bmltrt.errors import BmlError
    from bmltrt.io.nifti import image_from_array
    from bmltrt.pipeline import Detector

    a = np.random.default_rng(0).random((12, 20, 30)) * 100
    aff = np.diag([3.0, 0.5, 0.5, 1.0])
    bottom = aff.copy()
    bottom[3] = [0.1, 0, 0, 2]
    for arr, affine, said in ((a.astype(object), aff, "holds object values"), (a, "eye", "not a matrix of numbers"),
                              (a, np.where(np.eye(4) == 1, np.nan, aff), "NaN or Inf"), (a, bottom, "last row"),
                              (a, np.diag([3.0, 0.0, 0.5, 1.0]), "not invertible"),
                              (nib.Nifti1Image(a, aff), aff, "the image has its own")):
        with pytest.raises(BmlError, match=said):
            detector.detect_image(arr, affine)
    for dtype in (np.int64, np.uint64, bool, np.longdouble):
        assert image_from_array(a.astype(dtype), aff).get_data_dtype().itemsize <= 4
    for change, said in (({"femur_threshold": float("nan")}, "femur_threshold"), ({"mask_dilate_mm": -1.0}, "mask_dilate"),
                         ({"post_overrides": {"floor": 5.0}}, "floor 5.0"), ({"post_overrides": {"nope": 1}}, "nope")):
        with pytest.raises(BmlError, match=said):
            Detector(detector.backend, dataclasses.replace(detector.config, post=None, **change))
