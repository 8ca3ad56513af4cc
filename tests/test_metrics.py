import math

import numpy as np

from bmltrt.evaluation.metrics import Counts, confusion, evaluate_case, lesion_detection, scores, size_groups, summarize


def test_confusion_and_scores_hand_worked():
    truth = np.zeros((1, 4, 4), bool)
    truth[0, :2, :2] = True  # 4 voxels
    pred = np.zeros_like(truth)
    pred[0, :2, :1] = True  # 2 voxels, both true
    pred[0, 3, 3] = True  # 1 false positive
    c = confusion(pred, truth)
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 1, 2, 11)
    s = scores(c)
    assert math.isclose(s["dice"], 4 / 7)
    assert math.isclose(s["iou"], 2 / 5)
    assert math.isclose(s["sensitivity"], 0.5)
    assert math.isclose(s["specificity"], 11 / 12)
    assert math.isclose(s["accuracy"], 13 / 16)


def test_region_restricts_counts():
    truth = np.array([[[1, 0, 0, 0]]], bool)
    pred = np.array([[[1, 1, 0, 1]]], bool)
    region = np.array([[[1, 1, 0, 0]]], bool)
    c = confusion(pred, truth, region)
    assert (c.tp, c.fp, c.fn, c.tn) == (1, 1, 0, 0)
    assert scores(c)["specificity"] == 0.0  # the one negative voxel in the region is a false positive


def test_empty_conventions():
    z = np.zeros((2, 3, 3), bool)
    s = scores(confusion(z, z))
    assert s["dice"] == 1.0 and s["iou"] == 1.0
    assert math.isnan(s["sensitivity"]) and s["specificity"] == 1.0
    fp = z.copy()
    fp[0, 0, 0] = True
    s = scores(confusion(fp, z))
    assert s["dice"] == 0.0 and s["iou"] == 0.0 and math.isnan(s["sensitivity"])
    d = lesion_detection(z, z)
    assert math.isnan(d["lesion_sensitivity"]) and math.isnan(d["lesion_precision"]) and math.isnan(d["lesion_f1"])
    d = lesion_detection(fp, z)
    assert d["lesion_precision"] == 0.0 and d["lesion_f1"] == 0.0
    d = lesion_detection(z, fp)
    assert d["lesion_sensitivity"] == 0.0 and math.isnan(d["lesion_precision"]) and d["lesion_f1"] == 0.0


def test_lesion_wise_detection_counts_components():
    truth = np.zeros((5, 10, 10), bool)
    truth[0:2, 0:2, 0:2] = True  # lesion A
    truth[3:5, 7:9, 7:9] = True  # lesion B (missed)
    pred = np.zeros_like(truth)
    pred[1, 1, 1] = True  # one voxel of overlap with A: a hit
    pred[4, 0, 9] = True  # a false positive component
    d = lesion_detection(pred, truth)
    assert (d["n_true"], d["n_pred"], d["detected"], d["true_positive_pred"]) == (2, 2, 1, 1)
    assert math.isclose(d["lesion_f1"], 0.5)
    # 26-connectivity: diagonal neighbours in 3D are one lesion
    diag = np.zeros((3, 3, 3), bool)
    diag[0, 0, 0] = diag[1, 1, 1] = diag[2, 2, 2] = True
    assert lesion_detection(diag, diag)["n_true"] == 1


def test_pooled_vs_per_case_and_size_groups():
    t1 = np.zeros((1, 10, 10), bool)
    t1[0, :5, :5] = True  # 25 voxels
    p1 = t1.copy()  # perfect
    t2 = np.zeros((1, 10, 10), bool)
    t2[0, 0, 0] = True  # 1 voxel
    p2 = np.zeros_like(t2)  # missed
    r = [evaluate_case("a", p1, t1, np.ones_like(t1), 1.0), evaluate_case("b", p2, t2, np.ones_like(t2), 1.0)]
    s = summarize(r)
    assert math.isclose(s["volume"]["pooled"]["dice"], 50 / 51)
    assert math.isclose(s["volume"]["per_case_mean"]["dice"], 0.5)
    g = size_groups(r, n_groups=5)
    assert len(g) == 2 and g[0]["volume_mm3_max"] == 1.0 and g[1]["dice_mean"] == 1.0
    assert Counts(1, 2, 3, 4) + Counts(1, 1, 1, 1) == Counts(2, 3, 4, 5)
