"""Binary morphology and connected components that never wait for the GPU.

The GPU-resident loop may not synchronise with the device between the upload of a scan
and the download of its masks. cupyx.scipy.ndimage cannot promise that: its binary
morphology reads the structuring element back (`int(count_nonzero(structure))`), its
`label` reads the number of labels back, `binary_fill_holes` iterates until nothing
changes, and `cupy.bincount` reads the maximum back. So this module gives the few
primitives the pipeline needs, each one code path for numpy and cupy:

- ``binary_erosion/dilation/opening/closing(mask, footprint)``: the footprint is a
  host (numpy) array, so its offsets are known without asking the device; on cupy the
  result is an AND/OR of shifted views (one small kernel per footprint pixel); on numpy
  scipy.ndimage does it (faster on a CPU). Both give scipy's result (border value 0,
  odd footprints centred), which the tests check with the shift code run on numpy.
- ``component_ids(mask, structure)``: an id per connected component (0 outside the
  mask) below a host-known bound; numpy: scipy's labels; cupy: union-find roots + 1
  (Playne & Hawick 2018, one pass with atomicMin), the root being the component's
  smallest linear index, so components are ordered as scipy numbers them.
- ``bincount_fixed``, ``largest_component``, ``fill_holes_inplane``,
  ``remove_small_islands`` on top of those, with no data-dependent shapes.
"""

from __future__ import annotations

import numpy as np

from bmltrt.arrays import array_module

# --------------------------------------------------------------------------- counts


def bincount_fixed(x, length: int):
    """Counts of each value of the int array `x` in [0, length): np.bincount with a
    length known on the host (values outside the range are not allowed)."""
    xp = array_module(x)
    flat = x.ravel()
    if xp is np:
        return np.bincount(flat, minlength=length)[:length]
    import cupyx

    out = xp.zeros(length, xp.int32)
    cupyx.scatter_add(out, flat.astype(xp.int32, copy=False), xp.ones(flat.shape, xp.int32))
    return out


# --------------------------------------------------------------------------- morphology


def _offsets(footprint) -> np.ndarray:
    fp = np.asarray(footprint, bool)
    if any(s % 2 == 0 for s in fp.shape):
        raise ValueError(f"footprint shape {fp.shape}: odd sizes only")
    return np.argwhere(fp) - np.array(fp.shape) // 2


def _shift_reduce(mask, footprint, erode: bool):
    """AND (erosion) or OR (dilation) of shifted copies of `mask`; outside counts as 0."""
    xp = array_module(mask)
    offs = _offsets(footprint)
    if mask.ndim != offs.shape[1]:
        raise ValueError("footprint and mask must have the same number of dimensions")
    r = np.abs(offs).max(axis=0) if len(offs) else np.zeros(mask.ndim, int)
    padded = xp.pad(mask.astype(bool, copy=False), [(int(a), int(a)) for a in r])
    out = None
    for off in offs:
        # erosion looks at p + off; dilation at p - off (scipy reflects the footprint)
        d = off if erode else -off
        view = padded[tuple(slice(int(ri + di), int(ri + di + n)) for ri, di, n in zip(r, d, mask.shape))]
        if out is None:
            out = view.copy()
        elif erode:
            out &= view
        else:
            out |= view
    if out is None:  # empty footprint: erosion of nothing is everything, dilation nothing
        return xp.full(mask.shape, erode, bool)
    return out


def binary_erosion(mask, footprint, impl: str | None = None):
    """scipy.ndimage.binary_erosion(mask, structure=footprint) (border 0), no device sync."""
    xp = array_module(mask)
    if (impl or ("scipy" if xp is np else "shift")) == "scipy":
        from scipy import ndimage

        return ndimage.binary_erosion(mask, structure=np.asarray(footprint, bool))
    return _shift_reduce(mask, footprint, erode=True)


def binary_dilation(mask, footprint, impl: str | None = None):
    """scipy.ndimage.binary_dilation(mask, structure=footprint), no device sync."""
    xp = array_module(mask)
    if (impl or ("scipy" if xp is np else "shift")) == "scipy":
        from scipy import ndimage

        return ndimage.binary_dilation(mask, structure=np.asarray(footprint, bool))
    return _shift_reduce(mask, footprint, erode=False)


def binary_opening(mask, footprint, impl: str | None = None):
    return binary_dilation(binary_erosion(mask, footprint, impl), footprint, impl)


def binary_closing(mask, footprint, impl: str | None = None):
    return binary_erosion(binary_dilation(mask, footprint, impl), footprint, impl)


# --------------------------------------------------------------------------- components

_CC_SOURCE = r"""
// Connected components by union-find (Playne & Hawick, IEEE TPDS 2018): every voxel
// starts as its own root; each foreground voxel unites with its earlier neighbours;
// a root always points to a smaller index, so the final root of a component is its
// smallest linear index.
extern "C" {

__device__ int bml_cc_find(const volatile int* p, int i) {
    int q = p[i];
    while (q != i) {
        i = q;
        q = p[i];
    }
    return i;
}

__device__ void bml_cc_union(int* p, int a, int b) {
    bool done;
    do {
        a = bml_cc_find(p, a);
        b = bml_cc_find(p, b);
        if (a < b) {
            int old = atomicMin(&p[b], a);
            done = (old == b);
            b = old;
        } else if (b < a) {
            int old = atomicMin(&p[a], b);
            done = (old == a);
            a = old;
        } else {
            done = true;
        }
    } while (!done);
}

__global__ void bml_cc_init(const bool* mask, int* p, int n) {
    int i = blockDim.x * blockIdx.x + threadIdx.x;
    if (i < n) p[i] = mask[i] ? i : -1;
}

// offs: noffs triples (dz, dy, dx) of the neighbours that come earlier in raster order
__global__ void bml_cc_merge(const bool* mask, int* p, int d0, int d1, int d2,
                             const int* offs, int noffs) {
    int i = blockDim.x * blockIdx.x + threadIdx.x;
    int n = d0 * d1 * d2;
    if (i >= n || !mask[i]) return;
    int z = i / (d1 * d2);
    int y = (i / d2) % d1;
    int x = i % d2;
    for (int k = 0; k < noffs; k++) {
        int zz = z + offs[3 * k], yy = y + offs[3 * k + 1], xx = x + offs[3 * k + 2];
        if (zz < 0 || zz >= d0 || yy < 0 || yy >= d1 || xx < 0 || xx >= d2) continue;
        int j = (zz * d1 + yy) * d2 + xx;
        if (mask[j]) bml_cc_union(p, i, j);
    }
}

__global__ void bml_cc_flatten(int* p, int n) {
    int i = blockDim.x * blockIdx.x + threadIdx.x;
    if (i < n && p[i] >= 0) p[i] = bml_cc_find(p, i);
}

}
"""

_CC_THREADS = 256


def backward_offsets(structure) -> np.ndarray:
    """(k, 3) neighbour offsets of a 3x3x3 structure that precede the centre in raster order."""
    s = np.asarray(structure, bool)
    if s.shape != (3, 3, 3):
        raise ValueError("structure must be 3x3x3")
    offs = np.argwhere(s) - 1
    lin = offs[:, 0] * 9 + offs[:, 1] * 3 + offs[:, 2]
    return offs[lin < 0].astype(np.int32)


def _cc_kernels():
    import cupy

    mod = _cc_kernels.__dict__.get("mod")
    if mod is None:
        mod = cupy.RawModule(code=_CC_SOURCE, options=("-std=c++11",))
        _cc_kernels.mod = mod
    return mod


def component_ids(mask, structure) -> tuple:
    """(ids, bound): an int id per connected component of `mask` (3D, `structure` a 3x3x3
    connectivity), 0 outside it, 0 < id < bound. Ids order components as scipy's
    `label` numbers them (by their first voxel in raster order)."""
    xp = array_module(mask)
    if mask.ndim != 3:
        raise ValueError("component_ids works on 3D arrays")
    if xp is np:
        from scipy import ndimage

        labels, n = ndimage.label(mask, structure=np.asarray(structure, bool))
        return labels, int(n) + 1
    n = int(mask.size)
    if n >= 2**31:
        raise ValueError("volume too large for int32 component ids")
    mod = _cc_kernels()
    m = xp.ascontiguousarray(mask.astype(bool, copy=False))
    p = xp.empty(mask.shape, xp.int32)
    offs = xp.asarray(backward_offsets(structure).ravel())  # host -> device through pinned memory: no sync
    grid = ((n + _CC_THREADS - 1) // _CC_THREADS,)
    d0, d1, d2 = (np.int32(s) for s in mask.shape)
    mod.get_function("bml_cc_init")(grid, (_CC_THREADS,), (m, p, np.int32(n)))
    mod.get_function("bml_cc_merge")(grid, (_CC_THREADS,), (m, p, d0, d1, d2, offs, np.int32(len(offs) // 3)))
    mod.get_function("bml_cc_flatten")(grid, (_CC_THREADS,), (p, np.int32(n)))
    p += 1  # roots 0..n-1 -> ids 1..n, background -1 -> 0
    return p, n + 1


def component_sizes(ids, bound: int):
    """Voxels per component id (length `bound`; entry 0 counts the background)."""
    return bincount_fixed(ids, bound)


def largest_component(mask, structure):
    """The largest connected component (ties: the one scipy would label first)."""
    ids, bound = component_ids(mask, structure)
    sizes = component_sizes(ids, bound)
    sizes[0] = 0
    best = sizes.argmax()  # stays on the device
    return (ids == best) & mask.astype(bool, copy=False)


INPLANE_CROSS = np.zeros((3, 3, 3), bool)
INPLANE_CROSS[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
INPLANE_SQUARE = np.zeros((3, 3, 3), bool)
INPLANE_SQUARE[1] = True


def fill_holes_inplane(mask):
    """Per slice (axis 0), fill background regions (4-connected) that do not touch the
    slice border: scipy.ndimage.binary_fill_holes(mask, structure=INPLANE_CROSS)."""
    xp = array_module(mask)
    m = mask.astype(bool, copy=False)
    ids, bound = component_ids(~m, INPLANE_CROSS)
    edges = xp.concatenate([ids[:, 0, :].ravel(), ids[:, -1, :].ravel(), ids[:, :, 0].ravel(), ids[:, :, -1].ravel()])
    touches = bincount_fixed(edges, bound) > 0  # background components that reach the border
    touches[0] = False  # id 0 is the mask itself: kept
    return ~touches[ids]  # the mask, and background that never reaches the border


def remove_small_islands(mask, min_pixels: int, structure=INPLANE_SQUARE):
    """Drop connected components (default: 8-connected in-plane) smaller than `min_pixels`."""
    if min_pixels <= 1:
        return mask
    if array_module(mask) is np and not mask.any():  # a free shortcut on the host (same result)
        return mask
    ids, bound = component_ids(mask, structure)
    keep = bincount_fixed(ids, bound) >= min_pixels
    keep[0] = False
    return keep[ids]
