"""Label-driven training data: anatomy completion, geometry, appearance, both samplers."""

import numpy as np
import pytest

from bmltrt.synth import anatomy as A
from bmltrt.synth import labelgen as G
from bmltrt.synth import tissue_labels as T

from conftest import SHARED_DATA, needs_shared, save_nifti


def small_knee_labels() -> np.ndarray:
    """A right knee drawn from ellipsoids, OAI-like layout: (LR, AP, SI) axes are set by the
    affine in `knee_file`; here the working orientation [LR, SI(down), AP]."""
    S, H, W = 60, 110, 100
    s, h, w = np.meshgrid(np.arange(S), np.arange(H), np.arange(W), indexing="ij")
    lab = np.zeros((S, H, W), np.uint8)
    fem = (((s - 30) / 22.0) ** 2 + ((h - 45) / 22.0) ** 2 + ((w - 50) / 24.0) ** 2 < 1) | \
          ((((s - 30) / 12.0) ** 2 + ((w - 50) / 12.0) ** 2 < 1) & (h < 45))
    tib = (((s - 30) / 22.0) ** 2 + ((h - 88) / 14.0) ** 2 + ((w - 50) / 22.0) ** 2 < 1) | \
          ((((s - 30) / 12.0) ** 2 + ((w - 50) / 12.0) ** 2 < 1) & (h > 88))
    pat = ((s - 30) / 12.0) ** 2 + ((h - 45) / 12.0) ** 2 + ((w - 16) / 5.0) ** 2 < 1
    lab[fem] = T.FEMUR
    lab[tib] = T.TIBIA
    lab[pat & ~fem] = T.PATELLA
    from scipy import ndimage as ndi

    shell = ndi.binary_dilation(fem, iterations=3) & ~fem & ~tib & (h > 50)
    lab[shell] = T.FEM_CART
    return lab


def knee_file(path):
    """The small knee as a NIfTI label map at 0.6 mm, stored RAS (like the mesh maps)."""
    lab = small_knee_labels()
    # working [R, I, P] -> stored [R, A, S]: flip P->A and I->S, reorder to (LR, AP, SI)
    stored = np.ascontiguousarray(lab[:, ::-1, ::-1].transpose(0, 2, 1))
    return save_nifti(path, stored, np.diag([0.6, 0.6, 0.6, 1.0]))


def test_canonical_labels_undo_the_storage_order(tmp_path):
    lab, sp = A.canonical_labels(knee_file(tmp_path / "k.nii.gz"))
    assert np.allclose(sp, 0.6)
    assert np.array_equal(lab, small_knee_labels())


def test_complete_anatomy_keeps_the_bones_and_adds_a_leg():
    lab = small_knee_labels()
    out = A.complete_anatomy(A.extend_field_of_view(lab), np.random.default_rng(0))
    si = int(round(A.EXTEND_SI_MM / A.GRID_MM))
    pad = int(round(A.PAD_MM / A.GRID_MM))
    inner = out[pad:-pad, si:-si, pad:-pad]
    # the femur, its cortex and scar are exactly the map's femur
    assert np.array_equal(T.FEMUR_TABLE[inner].astype(bool), lab == T.FEMUR)
    present = set(np.unique(out).tolist())
    assert {T.FEMUR_CORTEX, T.BONE_CORTEX, T.FAT, T.MUSCLE, T.FLUID, T.TENDON}.issubset(present)
    # the shafts continue beyond the map's field of view
    assert (out[:, 0] == T.FEMUR).any() or (out[:, 0] == T.FEMUR_CORTEX).any()
    # air only outside the leg: the bones are never next to air
    bones = np.isin(out, T.BONE_PARTS)
    from scipy import ndimage as ndi
    assert not (ndi.binary_dilation(bones, iterations=2) & (out == T.AIR)).any()


@pytest.fixture(scope="module")
def anatomy():
    lab = A.complete_anatomy(A.extend_field_of_view(small_knee_labels()), np.random.default_rng(1))
    return A.Anatomy(lab, "small", A.knee_centre(lab), {"kind": "knee"})


def test_segmenter_sample_is_a_normalised_scan_with_its_femur(anatomy):
    rng = np.random.default_rng(3)
    smp = G.segmenter_sample(anatomy, rng)
    n, h, w = smp.image.shape
    assert 2.0 <= smp.spacing[0] <= 4.5 and smp.spacing[1:] == (1.6, 1.6)
    assert n * smp.spacing[0] >= 75 and 70 <= h <= 120 and 70 <= w <= 120
    assert smp.image.dtype == np.float32 and 0 <= smp.image.min() and smp.image.max() <= 1.5
    assert smp.femur.shape == smp.image.shape and 0 < smp.femur.mean() < 0.5
    again = G.segmenter_sample(anatomy, np.random.default_rng(3))
    assert np.array_equal(again.image, smp.image)  # the same seed, the same scan
    assert smp.image2 is None


def test_paired_sample_is_the_same_knee_in_a_second_contrast(anatomy):
    """paired=True adds the knee painted again (for the consistency loss) and leaves the
    first scan exactly as an unpaired sample of that seed draws it."""
    plain = G.segmenter_sample(anatomy, np.random.default_rng(8), lesion_p=1.0)
    pair = G.segmenter_sample(anatomy, np.random.default_rng(8), lesion_p=1.0, paired=True)
    assert np.array_equal(pair.image, plain.image) and np.array_equal(pair.femur, plain.femur)
    assert pair.image2.shape == pair.image.shape and pair.image2.dtype == np.float32
    assert 0 <= pair.image2.min() and pair.image2.max() <= 1.5
    assert not np.allclose(pair.image2, pair.image, atol=0.05)  # another appearance
    fem = pair.femur > 0.5
    assert pair.image2[fem].mean() != pytest.approx(pair.image[fem].mean(), abs=1e-3)
    zero = pair.image == 0  # a zeroed field-of-view border is the same in both
    assert np.array_equal(zero & (pair.image2 == 0), zero & (pair.image2 <= 0))


def _edge_width(profile) -> float:
    """10-90 % rise of a rising edge, in pixels."""
    i = np.arange(len(profile))
    return float(np.interp(0.9, profile, i) - np.interp(0.1, profile, i))


@pytest.mark.parametrize("src_mm", [0.3, 0.5, 0.7])
def test_runtime_smoothing_on_the_grid_matches_detects_resampling(src_mm):
    """A step edge scanned at src_mm pixels and brought to 1.6 mm by the runtime
    (to_segmenter_grid, SEG_ANTIALIAS) is as wide as the generator's: drawn on the grid (a
    pixel averages its area), then runtime_smoothing. Without it the generator's edge is
    half as wide: what the shipped segmenter was trained on."""
    from bmltrt.pipeline import SEG_ANTIALIAS
    from bmltrt.runtime.preprocess import to_segmenter_grid

    edge_mm, n = 80.3, int(round(160 / src_mm))
    fine = (((np.arange(n) + 0.5) * src_mm) > edge_mm).astype(np.float32)
    runtime = to_segmenter_grid(np.broadcast_to(fine, (1, n, n)).copy(), (3.0, src_mm, src_mm), 1.6,
                                SEG_ANTIALIAS)[0, 50]
    grid = np.clip(((np.arange(100) + 0.5) * 1.6 + 0.8 - edge_mm) / 1.6, 0, 1).astype(np.float32)
    drawn = np.broadcast_to(grid, (1, 100, 100)).copy()
    smoothed, sigma = G.runtime_smoothing(drawn, np.random.default_rng(0), 1.6, SEG_ANTIALIAS, (src_mm, src_mm))
    f = 1.6 / src_mm
    assert sigma == pytest.approx(SEG_ANTIALIAS * (f - 1) / (2 * f))
    assert _edge_width(smoothed[0, 50]) == pytest.approx(_edge_width(runtime), rel=0.1)
    assert _edge_width(grid) < 0.7 * _edge_width(runtime)


def test_smoothed_samples_are_the_same_knee_blurred(anatomy):
    """smoothing_p=1 blurs the scan (both echoes of a pair) and keeps its femur and lesions;
    smoothing_p=0 draws exactly the scan of older runs (no extra random draw)."""
    kw = dict(lesion_p=1.0, surface_p=1.0)
    plain = G.segmenter_sample(anatomy, np.random.default_rng(5), **kw)
    off = G.segmenter_sample(anatomy, np.random.default_rng(5), smoothing_p=0.0, antialias=2.5, **kw)
    assert np.array_equal(off.image, plain.image)
    on = G.segmenter_sample(anatomy, np.random.default_rng(5), smoothing_p=1.0, antialias=2.5, paired=True, **kw)
    assert np.array_equal(on.femur, plain.femur) and np.array_equal(on.lesion, plain.lesion)

    def roughness(img):
        return float(np.abs(np.diff(img, axis=2)).mean())
    assert roughness(on.image) < 0.75 * roughness(plain.image)
    unpaired_echo2 = G.segmenter_sample(anatomy, np.random.default_rng(5), paired=True, **kw).image2
    assert roughness(on.image2) < 0.75 * roughness(unpaired_echo2)


def test_lesions_are_femur_and_brighter_in_fat_suppressed_contrast(anatomy):
    rng = np.random.default_rng(5)
    pose = G.random_pose(anatomy, rng, strength=0.0)
    labels = G.sample_labels(anatomy, pose, rng, G._slice_positions(30, 3.0, 1), 100, 100, 1.6)
    with_les = G.add_lesions(labels, (3.0, 1.6, 1.6), np.random.default_rng(2), max_lesions=3)
    les = with_les == T.FEM_LESION
    assert les.any()
    assert np.array_equal(T.FEMUR_TABLE[with_les], T.FEMUR_TABLE[labels])  # still femur
    _, means = G.draw_contrast(np.random.default_rng(0), "iw_fs")
    img = G.paint(with_les, np.random.default_rng(0), means)
    assert img[les].mean() > 1.5 * img[with_les == T.FEMUR].mean()


def test_surface_lesions_touch_the_bone_under_the_cartilage(anatomy):
    """--lesion-surface-p: small lesions seeded at the subchondral surface (most real BMLs),
    so the segmenter learns that a bright spot at the bone's edge is still femur."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(5)
    pose = G.random_pose(anatomy, rng, strength=0.0)
    labels = G.sample_labels(anatomy, pose, rng, G._slice_positions(30, 3.0, 1), 100, 100, 1.6)
    sp = (3.0, 1.6, 1.6)
    femur = T.FEMUR_TABLE[labels].astype(bool)
    depth = ndi.distance_transform_edt(femur, sampling=sp)

    def lesion_depths(surface_p):
        d = []
        for seed in range(12):
            les = G.add_lesions(labels, sp, np.random.default_rng(seed), max_lesions=2, surface_p=surface_p)
            les = les == T.FEM_LESION
            d.append(depth[les].min() if les.any() else np.nan)
            assert np.array_equal(T.FEMUR_TABLE[np.where(les, T.FEM_LESION, labels)], T.FEMUR_TABLE[labels])
        return np.array(d)

    surface, anywhere = lesion_depths(1.0), lesion_depths(0.0)
    # surface lesions reach the femur's outermost voxel layer (depth one pixel), except
    # those drawn where the scan shows no cartilage (a quarter of draws: anywhere near bone)
    def at_surface(d):
        return np.mean(d[~np.isnan(d)] <= 1.6 + 1e-6)

    assert at_surface(surface) >= 0.75 and at_surface(surface) > at_surface(anywhere)


def test_breaching_surface_lesions_touch_the_cartilage(anatomy):
    """--lesion-breach-p: a surface lesion that replaces the cortex under it touches the
    femoral cartilage directly, as a real BML does on the segmenter's 1.6 mm grid (its
    subchondral plate is far thinner than a pixel); the lesion stays femur in the truth,
    and at breach_p 0 the draws are those of the recipes before it."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(5)
    pose = G.random_pose(anatomy, rng, strength=0.0)
    labels = G.sample_labels(anatomy, pose, rng, G._slice_positions(30, 3.0, 1), 100, 100, 1.6)
    sp = (3.0, 1.6, 1.6)
    near_cart = ndi.binary_dilation(labels == T.FEM_CART, np.ones((1, 3, 3), bool))

    def touching(breach_p):
        n = 0
        for seed in range(12):
            out = G.add_lesions(labels, sp, np.random.default_rng(seed), max_lesions=3, surface_p=1.0,
                                breach_p=breach_p)
            les = out == T.FEM_LESION
            assert np.array_equal(T.FEMUR_TABLE[out], T.FEMUR_TABLE[labels])
            n += int((les & near_cart).sum())
        return n

    def draws(**kw):
        return G.add_lesions(labels, sp, np.random.default_rng(3), max_lesions=3, surface_p=1.0, **kw)

    assert touching(1.0) > 1.5 * max(touching(0.0), 1)  # measured 78 against 39
    assert np.array_equal(draws(), draws(breach_p=0.0))


def test_a_tall_field_of_view_never_shows_the_femoral_shaft_end(anatomy):
    """Rows above the anatomy's top continue it (a knee scan never shows where the thigh
    ends): the femur crosses the top row even when the field of view reaches far above
    the anatomy, and the shaft there is as wide as at the anatomy's top row."""
    rng = np.random.default_rng(0)
    pose = G.random_pose(anatomy, rng, strength=0.0)
    top_mm = pose.centre_mm[1]  # the anatomy's top row lies this far above the FOV centre
    labels = G.sample_labels(anatomy, pose, rng, G._slice_positions(20, 3.0, 1), 100, 100, 1.6,
                             rows_offset_mm=-(top_mm + 60.0))  # the FOV's centre 60 mm above the top
    femur = T.FEMUR_TABLE[labels].astype(bool)
    assert femur[:, 0].any() and femur[:, 0].sum() == femur[:, 20].sum()
    top_row = T.FEMUR_TABLE[anatomy.labels[:, 0]].astype(bool)
    assert top_row.any()


def test_contrast_families_keep_fat_and_marrow_together():
    rng = np.random.default_rng(0)
    for _ in range(50):
        fam, m = G.draw_contrast(rng)
        if fam == "non_fs":
            assert m["marrow"] > m["muscle"] and m["fat"] > m["muscle"]
        elif fam in ("iw_fs", "t2_fs"):
            assert m["fluid"] > m["marrow"] and m["fluid"] > m["fat"]


def test_fat_suppressed_contrasts_sometimes_have_muscle_as_dark_as_marrow():
    """Real DESS echo 2 / T2-fs: muscle can be as dark as the suppressed marrow; the prior
    must produce that now and then (and not always)."""
    rng = np.random.default_rng(0)
    ratios = np.array([m["muscle"] / m["marrow"] for m in (G.draw_contrast(rng, "t2_fs")[1] for _ in range(400))])
    dark = ratios < 1.6 + 1e-6
    assert 0.2 < dark.mean() < 0.5 and ratios.min() >= 0.8 - 1e-6
    # --dark-muscle-p raises the share (a fine-tune aimed at the DESS echo 2 shaft)
    often = np.array([m["muscle"] / m["marrow"] for m in (G.draw_contrast(rng, "t2_fs", 0.8)[1] for _ in range(400))])
    assert 0.7 < (often < 1.6 + 1e-6).mean() < 0.9


def test_fat_like_marrow_ties_fat_to_the_suppressed_marrow():
    """--fat-like-marrow-p: that share of fat-suppressed scans has fat within 0.8-1.25x the
    marrow (both are fat, suppressed alike); drawn apart, they often differ by more; 0
    draws exactly the contrasts of older runs."""
    def ratios(p, n=400):
        rng = np.random.default_rng(1)
        return np.array([m["fat"] / m["marrow"] for m in (G.draw_contrast(rng, "gre_we", 0.3, p)[1] for _ in range(n))])
    apart, tied, some = ratios(0.0), ratios(1.0), ratios(0.5)
    inside = (0.8 - 1e-6, 1.25 + 1e-6)
    assert ((tied >= inside[0]) & (tied <= inside[1])).all()
    assert ((apart < inside[0]) | (apart > inside[1])).mean() > 0.4
    assert 0.4 < ((some < inside[0]) | (some > inside[1])).mean() / ((apart < inside[0]) | (apart > inside[1])).mean() < 0.6
    rng_a, rng_b = np.random.default_rng(2), np.random.default_rng(2)
    assert [G.draw_contrast(rng_a)[1] for _ in range(20)] == [G.draw_contrast(rng_b, None, G.DARK_MUSCLE_P, 0.0)[1]
                                                           for _ in range(20)]
    non_fs = G.draw_contrast(np.random.default_rng(3), "non_fs", 0.3, 1.0)[1]
    assert non_fs == G.draw_contrast(np.random.default_rng(3), "non_fs", 0.3, 0.0)[1]  # fat-suppressed only


@pytest.mark.parametrize("res", (128, 256))
def test_inpainter_sample_is_one_healthy_square_slice(anatomy, res):
    smp = G.inpainter_sample(anatomy, np.random.default_rng(7), res)
    assert smp is not None
    assert smp.image.shape == (res, res) and smp.femur.shape == (res, res)
    assert smp.femur.sum() * (160 / res) ** 2 > 20  # at least 20 mm2 of femur (field of view ~160 mm)
    inside, outside = smp.image[smp.femur], smp.image[~smp.femur]
    assert np.isfinite(inside).all() and outside.max() > 0


def test_swap_femur_seats_a_femur_shape_on_the_host_tibia():
    host = A.extend_field_of_view(small_knee_labels())
    femur = (A.extend_field_of_view(small_knee_labels()) == T.FEMUR).astype(np.uint8)
    femur = np.roll(femur, 20, axis=1)  # a femur from elsewhere, shifted
    out = A.swap_femur(host, femur, np.random.default_rng(0))
    fem = out == T.FEMUR
    assert fem.any() and (out == T.TIBIA).sum() == (host == T.TIBIA).sum()
    assert abs(int(fem.sum()) - int((host == T.FEMUR).sum())) < 0.3 * (host == T.FEMUR).sum()
    assert (out == T.FEM_CART).any()


def test_bank_is_built_once_and_reused(tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    knee_file(labels / "k_labels.nii.gz")
    paths = A.build_bank(labels, tmp_path / "cache", knee_variants=1, swaps_per_femur=0, phantoms=0)
    assert len(paths) == 1 and paths[0].exists()
    stamp = paths[0].stat().st_mtime_ns
    again = A.build_bank(labels, tmp_path / "cache", knee_variants=1, swaps_per_femur=0, phantoms=0)
    assert again == paths and paths[0].stat().st_mtime_ns == stamp
    an = A.load_anatomy(paths[0])
    assert an.labels.dtype == np.uint8 and an.info["kind"] == "knee"


@needs_shared
def test_real_train_labels_make_plausible_scans():
    files = sorted((SHARED_DATA / "train_labels").glob("mskt_dess_right_a*.nii.gz"))
    if not files:
        pytest.skip("no train_labels")
    lab = A.load_source(files[0])
    assert np.isin(lab, (T.FEMUR,)).sum() * A.GRID_MM ** 3 / 1000 > 100  # cm3 of distal femur
