"""The shipped models on real knee MRI (../shared/data/real; skipped where absent).

No masks exist for these scans, but the two qDESS echoes are the same knee in the same
position: a femur segmentation that sees anatomy, not contrast, gives both the same mask.
"""

import pytest

from conftest import SHARED_DATA, needs_shared

REAL = SHARED_DATA / "real"
pytestmark = [needs_shared, pytest.mark.realdata]


def _femur(detector, name):
    from bmltrt.io import load_scan
    from bmltrt.postprocess.femur_check import check_femur
    from bmltrt.runtime.preprocess import normalize_intensity

    path = REAL / name
    if not path.exists():
        pytest.skip(f"{name} not present")
    scan = load_scan(path)
    norm = normalize_intensity(scan.data)
    prob = detector.femur_probability(norm, scan.spacing)
    mask = detector.femur_mask(prob, scan.spacing)
    return mask, check_femur(prob, mask, scan.spacing, norm)


def _echo_dice(detector):
    m1, c1 = _femur(detector, "pykneer_qdess_echo1_oailike_448x448x40.nii.gz")
    m2, c2 = _femur(detector, "pykneer_qdess_echo2_oailike_448x448x40.nii.gz")
    assert c1.plausible and c2.plausible, (c1.reasons, c2.reasons)
    return 2 * (m1 & m2).sum() / (m1.sum() + m2.sum())


@pytest.fixture(scope="module")
def echo_dice(detector):
    return _echo_dice(detector)


def test_both_qdess_echoes_get_nearly_the_same_femur(echo_dice):
    # What the shipped models reach (0.932: stage-6 segmenter with the smoothed and sharp
    # passes of 2026-12-07; 0.915 with the sharp pass alone, 0.902 without mirror averaging;
    # stage 4 gave 0.910 without, stage 3 0.900): a floor against regressions.
    # Phantom-trained models gave 0.82.
    assert echo_dice >= 0.925, f"echo 1 / echo 2 femur Dice {echo_dice:.3f}"


@pytest.mark.xfail(strict=True, reason="issue 7's target; the shipped models reach 0.932: the two masks part "
                   "by 1-2 mm along the border, most at the lateral and medial edge slices (6-8, "
                   "28-30: 0.67-0.90 a slice against 0.91-0.97 in 9-27)")
def test_both_qdess_echoes_get_the_same_femur(echo_dice):
    assert echo_dice >= 0.95, f"echo 1 / echo 2 femur Dice {echo_dice:.3f}"


def test_a_scan_without_fat_suppression_gets_a_plausible_femur(detector):
    _, c = _femur(detector, "pymskt_mese_t2_echo1_TE6.3.nii.gz")
    assert c.plausible, c.reasons
