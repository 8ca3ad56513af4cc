import numpy as np
from skimage import exposure, filters

from bmltrt.postprocess import PostConfig, equalize_hist, lesion_mask, otsu_thresholds

from conftest import needs_gpu


def test_equalize_hist_matches_skimage():
    rng = np.random.default_rng(0)
    stack = rng.gamma(2.0, 1.0, (3, 64, 64)).astype(np.float32)
    ours = equalize_hist(stack, 256)
    for i in range(3):
        ref = exposure.equalize_hist(stack[i], nbins=256)
        # skimage interpolates between bin centres, we look the bin's CDF up: they differ
        # by at most one bin's share of the pixels
        one_bin = np.histogram(stack[i], 256)[0].max() / stack[i].size
        assert np.abs(ours[i] - ref).max() <= one_bin + 1e-4
    assert ours.dtype == np.float32


def test_otsu_matches_skimage_on_bimodal_slices():
    rng = np.random.default_rng(1)
    a = np.concatenate([rng.normal(0.2, 0.05, 3000), rng.normal(0.7, 0.05, 1000)]).reshape(1, 50, 80)
    b = np.concatenate([rng.normal(0.1, 0.02, 2000), rng.normal(0.4, 0.03, 2000)]).reshape(1, 50, 80)
    stack = np.concatenate([a, b]).astype(np.float32)
    t = otsu_thresholds(stack, np.ones_like(stack, bool), 256)
    for i in range(2):
        ref = filters.threshold_otsu(stack[i], nbins=256)
        width = (stack[i].max() - stack[i].min()) / 256
        assert abs(t[i] - ref) <= width * 1.01
    assert np.isinf(otsu_thresholds(stack, np.zeros_like(stack, bool))).all()


def _pair(seed=2, blob=True):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:128, :128]
    femur = ((yy - 64) ** 2 + (xx - 64) ** 2 < 45 ** 2)
    x = np.where(femur, 0.2, 0.5) + rng.normal(0, 0.02, (128, 128))
    x_tilde = x.copy()
    x_tilde[femur] = 0.2 + rng.normal(0, 0.02, femur.sum())
    truth = ((yy - 80) ** 2 + (xx - 60) ** 2 < 10 ** 2)
    if blob:
        x[truth] += 0.4
    return x[None].astype(np.float32), x_tilde[None].astype(np.float32), femur[None], truth[None]


def test_lesion_mask_finds_bright_blob_and_nothing_when_healthy():
    x, xt, fem, truth = _pair()
    m = lesion_mask(x, xt, fem, (0.5, 0.5), PostConfig())
    dice = 2 * (m & truth).sum() / (m.sum() + truth.sum())
    assert dice > 0.9
    x, xt, fem, truth = _pair(blob=False)
    assert not lesion_mask(x, xt, fem, (0.5, 0.5), PostConfig()).any()


@needs_gpu
def test_cupy_path_equals_numpy_path():
    import cupy as cp

    x, xt, fem, _ = _pair()
    ref = lesion_mask(x, xt, fem, (0.5, 0.5))
    got = lesion_mask(cp.asarray(x), cp.asarray(xt), cp.asarray(fem), (0.5, 0.5))
    assert isinstance(got, cp.ndarray)
    assert np.array_equal(cp.asnumpy(got), ref)
    he = equalize_hist(cp.asarray(x))
    assert np.allclose(cp.asnumpy(he), equalize_hist(x), atol=1e-6)


def test_guided_filter_near_the_femur_is_the_full_filter_there():
    """guided_filter_near crops the CPU work to where the probability is; inside that box it
    gives what the whole-volume filter gives, and an all-zero probability comes back as is."""
    from bmltrt.postprocess.guided import guided_filter, guided_filter_near

    rng = np.random.default_rng(0)
    guide = rng.random((6, 120, 140)).astype(np.float32)
    p = np.zeros_like(guide)
    p[2:4, 40:70, 50:90] = 1.0
    full = guided_filter(guide, p, (3, 3), 0.001, passes=2)
    near = guided_filter_near(guide, p, (3, 3), 0.001, passes=2)
    assert near.dtype == np.float32 and np.array_equal(near > 0.5, full > 0.5)
    assert np.allclose(near[2:4, 30:80, 40:100], full[2:4, 30:80, 40:100], atol=1e-5)
    assert near[0].max() == 0 and near[:, :, :20].max() == 0  # far away: untouched zeros
    zero = np.zeros_like(guide)
    assert guided_filter_near(guide, zero, (3, 3), 0.001) is zero
