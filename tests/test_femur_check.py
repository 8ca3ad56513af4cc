"""The femur-plausibility check: stated rules, and what it does on volumes that are not knees."""

import numpy as np
import pytest

from bmltrt.errors import BmlError
from bmltrt.postprocess.femur_check import check_femur

SPACING = (3.0, 0.357, 0.357)


def femur_like(shape=(36, 448, 448)):
    """A distal femur: a shaft from the top of the image into two condyles."""
    s, h, w = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    sz, sy, sx = SPACING
    cond = ((s - 18) * sz / 40) ** 2 + ((h - 260) * sy / 30) ** 2 + ((w - 224) * sx / 32) ** 2 < 1
    shaft = (((s - 18) * sz / 15) ** 2 + ((w - 224) * sx / 14) ** 2 < 1) & (h < 260)
    return cond | shaft


def test_a_femur_shaped_mask_is_plausible():
    m = femur_like()
    c = check_femur(m.astype(np.float32) * 0.97, m, SPACING)
    assert c.plausible and not c.refuse, c.reasons
    assert 40 < c.volume_cm3 < 700 and c.span_mm > 60 and c.top_fraction == 0.0


def test_nothing_found_is_refused():
    m = np.zeros((36, 448, 448), bool)
    c = check_femur(np.zeros(m.shape, np.float32), m, SPACING)
    assert c.refuse and "no femur" in c.reasons[0]


@pytest.mark.parametrize("what, make, words", [
    ("tiny", lambda m: m & (np.arange(448)[None, :, None] > 300) & (np.arange(36)[:, None, None] == 18),
     "is this a sagittal knee MRI"),
    ("thin", lambda m: m & (np.abs(np.arange(36) - 18)[:, None, None] < 3), "spans only"),
    ("low", lambda m: m & (np.arange(448)[None, :, None] > 240), "upper half"),
])
def test_implausible_masks_get_a_reason(what, make, words):
    m = make(femur_like())
    c = check_femur(m.astype(np.float32), m, SPACING)
    assert not c.plausible and any(words in r for r in c.reasons), (what, c.reasons)


def test_pieces_and_doubt_are_reported():
    m = femur_like()
    prob = m.astype(np.float32) * 0.6  # unsure everywhere
    prob[:, 400:440, 10:200] = 0.9  # and a second large blob that is not the femur
    c = check_femur(prob, m, SPACING)
    assert any("pieces" in r for r in c.reasons) and any("unsure" in r for r in c.reasons)


@pytest.mark.parametrize("kind", ["blank", "noise"])
def test_volumes_that_are_not_knees_are_refused_or_flagged(detector, kind):
    """A blank and a noise volume never give a femur without a warning or a refusal."""
    from bmltrt.io import load_scan

    rng = np.random.default_rng(0)
    if kind == "blank":
        vol = (rng.random((448, 448, 36)) < 0.001).astype(np.float32) * 5  # a few hot pixels on black
    else:
        vol = rng.normal(500, 150, (448, 448, 36)).clip(0)
    import nibabel as nib
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        aff = np.array([[0, 0, 3.0, 0], [-0.357, 0, 0, 0], [0, -0.357, 0, 0], [0, 0, 0, 1]])
        path = Path(d) / f"{kind}.nii.gz"
        nib.save(nib.Nifti1Image(vol.astype(np.int16), aff), str(path))
        try:
            scan = load_scan(path)
            det = detector.detect(scan)
        except BmlError:
            return  # refused: fine
        assert not det.report["femur_check"]["plausible"]
        assert any("implausible femur" in w for w in det.report["warnings"])


def test_the_outline_must_follow_image_edges():
    from bmltrt.postprocess.femur_check import MIN_EDGE_RATIO, edge_ratio

    m = femur_like((12, 224, 224))
    rng = np.random.default_rng(1)
    knee = np.where(m, 0.2, 0.6).astype(np.float32) + rng.normal(0, 0.03, m.shape).astype(np.float32)
    noise = rng.random(m.shape).astype(np.float32)
    assert edge_ratio(knee, m) > 2 * MIN_EDGE_RATIO
    assert edge_ratio(noise, m) < MIN_EDGE_RATIO
    assert edge_ratio(np.zeros(m.shape, np.float32), m) == 0.0


def test_a_smooth_random_field_is_refused_not_reported_with_lesions(detector, tmp_path):
    """Not white noise: a smoothed random field (blobs of MR-like size) got a 125 cm3 "femur"
    and 25 "lesions", reported "ok" beside two warnings. A mask that follows no edges from a
    segmenter that is unsure is no knee: refused."""
    import nibabel as nib
    from scipy import ndimage as ndi

    from bmltrt.io import load_scan

    field = ndi.gaussian_filter(np.random.default_rng(5).normal(0, 1, (224, 224, 36)), (4, 4, 1))
    vol = 500 + 70 * field / field.std()
    aff = np.array([[0, 0, 3.0, 0], [-0.7, 0, 0, 0], [0, -0.7, 0, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(vol.astype(np.int16), aff), str(tmp_path / "field.nii.gz"))
    with pytest.raises(BmlError, match="no knee found"):
        detector.detect(load_scan(tmp_path / "field.nii.gz"))
