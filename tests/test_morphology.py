"""The sync-free primitives of the GPU loop: the shift code and the component logic run
here with numpy against scipy; the union-find kernel is compiled as C++ and run on the
CPU; the cupy paths are compared on a GPU."""

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
from scipy import ndimage as ndi

from bmltrt import morphology as mo

from conftest import needs_gpu


def _masks(seed=0, shape=(5, 40, 48), p=0.45):
    rng = np.random.default_rng(seed)
    smooth = ndi.gaussian_filter(rng.random(shape), (0.6, 1.5, 1.5))
    return smooth > np.quantile(smooth, 1 - p)


def _footprints():
    rng = np.random.default_rng(3)
    disk = np.zeros((1, 7, 7), bool)
    yy, xx = np.mgrid[-3:4, -3:4]
    disk[0] = (yy / 3.2) ** 2 + (xx / 3.0) ** 2 <= 1
    odd = rng.random((1, 3, 5)) > 0.4  # not symmetric
    odd[0, 1, 2] = True
    cube = rng.random((3, 3, 3)) > 0.5
    return [disk, odd, cube, np.ones((1, 1, 1), bool)]


@pytest.mark.parametrize("k", range(4))
def test_shift_morphology_equals_scipy(k):
    fp = _footprints()[k]
    for seed in range(3):
        m = _masks(seed)
        for ours, ref in ((mo.binary_erosion, ndi.binary_erosion), (mo.binary_dilation, ndi.binary_dilation),
                          (mo.binary_opening, ndi.binary_opening), (mo.binary_closing, ndi.binary_closing)):
            got = ours(m, fp, impl="shift")
            assert got.dtype == bool and np.array_equal(got, ref(m, structure=fp)), (ours.__name__, seed)
            assert np.array_equal(ours(m, fp), got)  # the numpy default (scipy) agrees


def test_bincount_fixed():
    x = np.array([[0, 3, 3], [1, 0, 3]])
    assert list(mo.bincount_fixed(x, 5)) == [2, 1, 0, 3, 0]


def _old_largest_filled(mask):
    """The clean-up as it was (scipy label + bincount + binary_fill_holes)."""
    if not mask.any():
        return mask
    labels, n = ndi.label(mask, structure=np.ones((3, 3, 3), bool))
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == sizes.argmax()
    return ndi.binary_fill_holes(mask, structure=mo.INPLANE_CROSS)


def test_largest_component_and_fill_holes_equal_scipy():
    for seed in range(4):
        m = _masks(seed, p=0.3)
        got = mo.fill_holes_inplane(mo.largest_component(m, np.ones((3, 3, 3), bool)))
        assert np.array_equal(got, _old_largest_filled(m))
        assert np.array_equal(mo.fill_holes_inplane(m), ndi.binary_fill_holes(m, structure=mo.INPLANE_CROSS))
    empty = np.zeros((3, 8, 8), bool)
    assert not mo.largest_component(empty, np.ones((3, 3, 3), bool)).any()
    # ties go to the component scipy labels first (smallest first voxel)
    two = np.zeros((1, 6, 6), bool)
    two[0, 0, 0:2] = True
    two[0, 4, 4:6] = True
    lc = mo.largest_component(two, np.ones((3, 3, 3), bool))
    assert lc[0, 0, 0] and not lc[0, 4, 4]


def test_remove_small_islands_equals_reference():
    m = _masks(7, p=0.2)
    labels, n = ndi.label(m, structure=mo.INPLANE_SQUARE)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= 30
    keep[0] = False
    assert np.array_equal(mo.remove_small_islands(m, 30), keep[labels])
    assert mo.remove_small_islands(m, 1) is m


# -- the CUDA union-find, compiled as C++ and run on the CPU -------------------------

_SHIM = r"""
#include <cstdint>
struct bml_dim3 { int x; };
static bml_dim3 blockDim = {256}, blockIdx = {0}, threadIdx = {0};
#define __device__
#define __global__
static int atomicMin(int* a, int v) { int old = *a; if (v < old) *a = v; return old; }
"""
_DRIVER = r"""
template <class F> static void launch(int n, int reverse, F f) {
    int blocks = (n + 255) / 256;
    for (int b = 0; b < blocks; b++)
        for (int t = 0; t < 256; t++) {
            blockIdx.x = reverse ? blocks - 1 - b : b;
            threadIdx.x = reverse ? 255 - t : t;
            f();
        }
}
extern "C" void run_cc(const bool* mask, int* p, int d0, int d1, int d2, const int* offs, int noffs,
                       int reverse) {
    int n = d0 * d1 * d2;
    launch(n, 0, [&] { bml_cc_init(mask, p, n); });
    launch(n, reverse, [&] { bml_cc_merge(mask, p, d0, d1, d2, offs, noffs); });
    launch(n, reverse, [&] { bml_cc_flatten(p, n); });
}
"""


@pytest.fixture(scope="module")
def cc_lib(tmp_path_factory):
    gxx = shutil.which("g++")
    if not gxx:
        pytest.skip("no C++ compiler")
    d = tmp_path_factory.mktemp("cc")
    (d / "cc.cpp").write_text(_SHIM + mo._CC_SOURCE + _DRIVER)
    r = subprocess.run([gxx, "-O1", "-std=c++14", "-shared", "-fPIC", str(d / "cc.cpp"), "-o", str(d / "cc.so")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return ctypes.CDLL(str(d / "cc.so"))


def _run_cc(lib, mask, structure, reverse):
    m = np.ascontiguousarray(mask, bool)
    p = np.empty(m.shape, np.int32)  # roots; component_ids adds 1 on the device
    offs = np.ascontiguousarray(mo.backward_offsets(structure).ravel())
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    lib.run_cc(ptr(m), ptr(p), *[ctypes.c_int(s) for s in m.shape], ptr(offs), ctypes.c_int(len(offs) // 3),
               ctypes.c_int(reverse))
    return p


@pytest.mark.parametrize("structure", ["full", "cross", "square"])
def test_union_find_kernel_source_labels_like_scipy(cc_lib, structure):
    s = {"full": np.ones((3, 3, 3), bool), "cross": mo.INPLANE_CROSS, "square": mo.INPLANE_SQUARE}[structure]
    for seed, reverse in ((0, 0), (1, 1), (2, 1)):
        m = _masks(seed, shape=(4, 30, 33), p=0.5)
        roots = _run_cc(cc_lib, m, s, reverse)
        labels, n = ndi.label(m, structure=s)
        assert np.array_equal(roots < 0, ~m)
        # the same partition, each root the component's smallest linear index
        flat_l, flat_r = labels.ravel(), roots.ravel()
        first = np.array([np.flatnonzero(flat_l == k)[0] for k in range(1, n + 1)])
        assert np.array_equal(flat_r[m.ravel()], first[flat_l[m.ravel()] - 1])


def test_union_find_kernel_compiles_for_cuda(tmp_path):
    nvcc = shutil.which("nvcc")
    if not nvcc:
        pytest.skip("no nvcc")
    (tmp_path / "cc.cu").write_text(mo._CC_SOURCE)
    for arch in ("sm_87", "sm_90"):  # Jetson Orin, H100
        r = subprocess.run([nvcc, "--ptx", f"-arch={arch}", str(tmp_path / "cc.cu"), "-o", str(tmp_path / "cc.ptx")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


@needs_gpu
def test_cupy_primitives_equal_numpy():
    import cupy as cp

    for seed in range(3):
        m = _masks(seed, shape=(6, 64, 70), p=0.35)
        g = cp.asarray(m)
        for fp in _footprints():
            for fn in (mo.binary_erosion, mo.binary_dilation, mo.binary_opening, mo.binary_closing):
                assert np.array_equal(cp.asnumpy(fn(g, fp)), fn(m, fp))
        full = np.ones((3, 3, 3), bool)
        assert np.array_equal(cp.asnumpy(mo.largest_component(g, full)), mo.largest_component(m, full))
        assert np.array_equal(cp.asnumpy(mo.fill_holes_inplane(g)), mo.fill_holes_inplane(m))
        assert np.array_equal(cp.asnumpy(mo.remove_small_islands(g, 20)), mo.remove_small_islands(m, 20))
        assert np.array_equal(cp.asnumpy(mo.bincount_fixed(cp.asarray([0, 2, 2]), 4)), [1, 0, 2, 0])
