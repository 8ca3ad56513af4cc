"""An ONNX graph run op by op in torch, every tensor in the dtype the graph gives it.

Two uses: the honest FP16 check (ONNX Runtime's CPU provider computes an FP16 graph in
float32 behind inserted casts; torch on a CPU runs real float16 kernels, so a float16
tensor here is rounded to float16 after every op, as on a GPU), and a torch backend that
runs the exported graphs on any torch device without re-tracing the networks.

    mod = OnnxGraphModule("export/inpainter_256.onnx").to("cuda")
    y = mod(torch.rand(4, 2, 256, 256, device="cuda"))

Initialisers and Constant nodes become buffers, so ``.to(device)`` moves them. Integer
(shape) tensors stay int64. Supported ops: see ``SUPPORTED_OPS``; any other op raises
``NotImplementedError`` naming it and the node, when the module is built. On the CPU a
float16 Conv, ConvTranspose or MatMul takes float16 operands, accumulates in float32 and
rounds its result to float16, as tensor cores and TensorRT's FP16 kernels do (and 10-20x
faster than torch's CPU float16 convolution); every other float16 op is torch's own.

This module needs torch and onnx, not ONNX Runtime; ``bmltrt.runtime`` does not import it
(the runtime package imports without torch).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

# ONNX TensorProto element type -> torch dtype
_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _tensor(t: onnx.TensorProto) -> torch.Tensor:
    arr = numpy_helper.to_array(t)
    return torch.from_numpy(np.array(arr, copy=True))


def _ints(t) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _sym_pads(pads: list[int], nd: int):
    """ONNX pads [b1..bn, e1..en] -> (torch padding, extra F.pad list or None)."""
    if not pads:
        return [0] * nd, None
    begin, end = pads[:nd], pads[nd:]
    if begin == end:
        return begin, None
    extra = []
    for b, e in zip(reversed(begin), reversed(end)):
        extra += [b, e]
    return [0] * nd, extra


def _f32_accumulate(fn):
    """float16 in, float32 accumulation, float16 out, on the CPU: what tensor cores (and
    TensorRT's FP16 kernels) do, and 10-20x faster than torch's CPU float16 convolutions.
    The result is rounded to float16 like any float16 op's; other devices run natively."""
    def run(x, *args, **kw):
        if x.dtype == torch.float16 and x.device.type == "cpu":
            args = [a.float() if torch.is_tensor(a) and a.dtype == torch.float16 else a for a in args]
            return fn(x.float(), *args, **kw).half()
        return fn(x, *args, **kw)
    return run


@_f32_accumulate
def _conv(x, w, b=None, *, transpose=False, **a):
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise NotImplementedError("Conv/ConvTranspose auto_pad other than NOTSET")
    nd = x.dim() - 2
    strides = a.get("strides", [1] * nd)
    dil = a.get("dilations", [1] * nd)
    group = a.get("group", 1)
    pad, extra = _sym_pads(list(a.get("pads", [])), nd)
    if transpose:
        if "output_shape" in a:
            raise NotImplementedError("ConvTranspose with output_shape")
        if extra is not None:
            raise NotImplementedError("ConvTranspose with asymmetric pads")
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
        return fn(x, w, b, stride=strides, padding=pad, output_padding=a.get("output_padding", [0] * nd),
                  groups=group, dilation=dil)
    if extra is not None:
        x = F.pad(x, extra)
    fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return fn(x, w, b, stride=strides, padding=pad, dilation=dil, groups=group)


def _pad(x, pads, value=None, axes=None, mode=b"constant"):
    mode = mode.decode() if isinstance(mode, bytes) else mode
    p = _ints(pads)
    n = x.dim()
    if axes is not None:
        ax = [a % n for a in _ints(axes)]
        full = [0] * (2 * n)
        for i, a in enumerate(ax):
            full[a], full[n + a] = p[i], p[len(ax) + i]
        p = full
    begin, end = p[:n], p[n:]
    if any(v < 0 for v in p):
        raise NotImplementedError("Pad with negative pads")
    nz = [i for i in range(n) if begin[i] or end[i]]
    if not nz:
        return x
    first = nz[0]
    tp = []
    for i in reversed(range(first, n)):
        tp += [begin[i], end[i]]
    if mode == "constant":
        v = 0.0 if value is None or value.numel() == 0 else value.reshape(-1)[0].item()
        return F.pad(x, tp, mode="constant", value=v)
    tmode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    k = n - first  # torch pads the trailing k <= 3 dims of an (N, C, *k dims) tensor
    if k > 3:
        raise NotImplementedError(f"Pad mode {mode} over more than 3 trailing axes")
    y = x.reshape((-1, 1) + tuple(x.shape[first:]))
    out = F.pad(y, tp, mode=tmode)
    return out.reshape(tuple(x.shape[:first]) + tuple(out.shape[2:]))


def _slice(x, starts, ends, axes=None, steps=None):
    s, e = _ints(starts), _ints(ends)
    ax = _ints(axes) if axes is not None else list(range(len(s)))
    st = _ints(steps) if steps is not None else [1] * len(s)
    for a, b, c, d in zip(ax, s, e, st):
        a %= x.dim()
        dim = x.shape[a]
        b, c = (b + dim if b < 0 else b), (c + dim if c < 0 else c)
        if d > 0:
            b, c = max(0, min(dim, b)), max(0, min(dim, c))
            x = x.narrow(a, b, max(0, c - b))[(slice(None),) * a + (slice(None, None, d),)]
        elif d < 0:  # backwards: ONNX clamps start to [0, dim-1] and end to [-1, dim-1]
            b, c = max(0, min(dim - 1, b)), max(-1, min(dim - 1, c))
            x = x.index_select(a, torch.arange(b, c, d, device=x.device))
        else:
            raise ValueError("Slice step 0")
    return x


def _reshape(x, shape, allowzero=0):
    sh = _ints(shape)
    if not allowzero:
        sh = [x.shape[i] if v == 0 else v for i, v in enumerate(sh)]
    return x.reshape(sh)


def _gather(x, idx, axis=0):
    axis %= x.dim()
    i = idx.long()
    i = torch.where(i < 0, i + x.shape[axis], i)
    out = x.index_select(axis, i.reshape(-1).to(x.device))
    return out.reshape(tuple(x.shape[:axis]) + tuple(i.shape) + tuple(x.shape[axis + 1:]))


def _div(a, b):
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _split(x, split=None, axis=0, num_outputs=None):
    axis %= x.dim()
    if split is not None:
        sizes = _ints(split)
    else:
        n = num_outputs
        size = -(-x.shape[axis] // n)
        sizes = [size] * (n - 1) + [x.shape[axis] - size * (n - 1)]
    return tuple(torch.split(x, sizes, dim=axis))


def _maxpool(x, kernel_shape, strides=None, pads=None, dilations=None, ceil_mode=0, auto_pad=b"NOTSET",
             storage_order=0):
    nd = x.dim() - 2
    pad, extra = _sym_pads(list(pads or []), nd)
    if extra is not None:
        x = F.pad(x, extra, value=float("-inf"))
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
    return fn(x, kernel_shape, strides or kernel_shape, pad, dilations or [1] * nd, bool(ceil_mode))


def _bn(x, scale, bias, mean, var, epsilon=1e-5, momentum=0.9, training_mode=0):
    if training_mode:
        raise NotImplementedError("BatchNormalization with training_mode=1")
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, epsilon)


def _clip(x, lo=None, hi=None):
    return torch.clamp(x, None if lo is None else lo.item(), None if hi is None else hi.item())


def _const_of_shape(shape, value=None):
    v = _tensor(value) if value is not None else torch.zeros(1, dtype=torch.float32)
    return torch.full(_ints(shape), v.reshape(-1)[0].item(), dtype=v.dtype, device=shape.device)


def _shape(x, start=0, end=None):
    return torch.tensor(list(x.shape)[start:end], dtype=torch.int64, device=x.device)


def _unsqueeze(x, axes):
    n = x.dim() + len(_ints(axes))
    for a in sorted(v % n for v in _ints(axes)):
        x = x.unsqueeze(a)
    return x


def _squeeze(x, axes=None):
    if axes is None:
        return x.squeeze()
    for a in sorted((v % x.dim() for v in _ints(axes)), reverse=True):
        x = x.squeeze(a)
    return x


# op -> fn(*inputs, **attrs). Inputs arrive as tensors (None for an omitted optional input).
_OPS = {
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Div": _div,
    "Neg": lambda a: -a,
    "Sqrt": torch.sqrt,
    "Pow": lambda a, b: torch.pow(a, b),
    "MatMul": _f32_accumulate(torch.matmul),
    "Relu": torch.relu,
    "LeakyRelu": lambda x, alpha=0.01: F.leaky_relu(x, alpha),
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Clip": _clip,
    "Identity": lambda x: x,
    "Conv": lambda x, w, b=None, **a: _conv(x, w, b, **a),
    "ConvTranspose": lambda x, w, b=None, **a: _conv(x, w, b, transpose=True, **a),
    "BatchNormalization": _bn,
    "InstanceNormalization": lambda x, s, b, epsilon=1e-5: F.instance_norm(x, weight=s, bias=b, eps=epsilon),
    "MaxPool": _maxpool,
    "Concat": lambda *xs, axis: torch.cat(xs, dim=axis),
    "Split": _split,
    "Slice": _slice,
    "Reshape": _reshape,
    "Transpose": lambda x, perm=None: x.permute(*(perm if perm is not None else reversed(range(x.dim())))),
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Pad": lambda x, pads, value=None, axes=None, mode=b"constant": _pad(x, pads, value, axes, mode),
    "Cast": lambda x, to, saturate=1: x.to(_DTYPES[to]),
    "Shape": _shape,
    "Gather": _gather,
    "ConstantOfShape": _const_of_shape,
}
SUPPORTED_OPS = frozenset(_OPS) | {"Constant"}


def _load(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(str(Path(model)))


class OnnxGraphModule(torch.nn.Module):
    """Runs an ONNX graph op by op in torch; every tensor keeps the dtype the graph gives it."""

    def __init__(self, model, device="cpu"):
        super().__init__()
        proto = _load(model)
        g = proto.graph
        unsupported = [(n.op_type, n.name) for n in g.node if n.op_type not in SUPPORTED_OPS]
        if unsupported:
            ops = sorted({o for o, _ in unsupported})
            raise NotImplementedError(
                f"OnnxGraphModule does not support op(s) {', '.join(ops)} (first at node {unsupported[0][1]!r}); "
                f"supported: {', '.join(sorted(SUPPORTED_OPS))}")
        self._buffer_of: dict[str, str] = {}
        for t in g.initializer:
            self._add_buffer(t.name, _tensor(t))
        init_names = {t.name for t in g.initializer}
        self.input_names = [i.name for i in g.input if i.name not in init_names]
        self.input_dtypes = [_DTYPES.get(i.type.tensor_type.elem_type) for i in g.input if i.name not in init_names]
        self.output_names = [o.name for o in g.output]
        self._nodes = []
        for n in g.node:
            a = _attrs(n)
            if n.op_type == "Constant":
                if "value" not in a:
                    raise NotImplementedError(f"Constant node {n.name!r} without a 'value' tensor")
                self._add_buffer(n.output[0], _tensor(a["value"]))
                continue
            self._nodes.append((n.op_type, n.name, list(n.input), list(n.output), a))
        self.to(device)

    def _add_buffer(self, name: str, t: torch.Tensor):
        key = f"_t{len(self._buffer_of)}"
        self.register_buffer(key, t)
        self._buffer_of[name] = key

    def forward(self, *inputs):
        return self.run(inputs)

    def run(self, inputs, hook=None):
        """forward(*inputs); hook(node_name, op_type, inputs, output_names, outputs), if given, is called
        after every node with its input and output tensors (activation ranges are measured with it)."""
        if len(inputs) != len(self.input_names):
            raise ValueError(f"the graph takes {len(self.input_names)} input(s) ({', '.join(self.input_names)}), "
                             f"got {len(inputs)}")
        env = {name: getattr(self, key) for name, key in self._buffer_of.items()}
        for name, want, x in zip(self.input_names, self.input_dtypes, inputs):
            if want is not None and x.dtype != want:
                raise TypeError(f"graph input {name!r} is {want}, got {x.dtype}")
            env[name] = x
        env[""] = None
        for op, name, ins, outs, attrs in self._nodes:
            args = [env[i] for i in ins]
            while args and args[-1] is None:
                args.pop()
            try:
                res = _OPS[op](*args, **attrs)
            except NotImplementedError as exc:
                raise NotImplementedError(f"{op} node {name!r}: {exc}") from None
            res = res if isinstance(res, tuple) else (res,)
            for o, r in zip(outs, res):
                env[o] = r
            if hook is not None:
                hook(name, op, args, outs, res)
        out = tuple(env[o] for o in self.output_names)
        return out[0] if len(out) == 1 else out
