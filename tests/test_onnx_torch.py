"""The ONNX-graph-in-torch executor against ONNX Runtime, and its dtype honesty."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import REPO, needs_torch

pytestmark = needs_torch
SHIPPED = REPO / "export"


def _ort(path_or_model, x):
    import onnxruntime as ort

    src = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


@pytest.mark.parametrize("name,shape,atol", [
    ("segmenter.onnx", (1, 1, 16, 112, 112), 5e-4),  # logits of order 10-100
    ("inpainter_128.onnx", (3, 2, 128, 128), 1e-5),
    ("inpainter_256.onnx", (2, 2, 256, 256), 1e-5),
])
def test_shipped_float32_graphs_match_onnxruntime(name, shape, atol):
    import torch

    from bmltrt.runtime.onnx_torch import OnnxGraphModule

    x = np.random.default_rng(0).random(shape, np.float32)
    mod = OnnxGraphModule(SHIPPED / name)
    with torch.no_grad():
        got = mod(torch.from_numpy(x))
    assert got.dtype == torch.float32
    ref = _ort(SHIPPED / name, x)[0]
    assert got.shape == ref.shape
    assert float(np.abs(got.numpy() - ref).max()) < atol


def _toy(dtype=TensorProto.FLOAT16):
    """x(float32) -> Cast fp16 -> Conv(fp16 weights) -> Relu -> [Cast fp32 out, Shape out]."""
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((4, 2, 3, 3)).astype(
        np.float16 if dtype == TensorProto.FLOAT16 else np.float32), "w")
    nodes = [
        helper.make_node("Cast", ["x"], ["xh"], to=dtype),
        helper.make_node("Pad", ["xh", "pads"], ["xp"], mode="reflect"),
        helper.make_node("Conv", ["xp", "w"], ["c"], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT),
        helper.make_node("Shape", ["r"], ["s"]),
    ]
    pads = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")
    g = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 2, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4, 8, 8]),
                           helper.make_tensor_value_info("s", TensorProto.INT64, [4])], [w, pads])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_each_tensor_keeps_its_dtype_and_several_outputs_come_as_a_tuple():
    import torch

    from bmltrt.runtime.onnx_torch import OnnxGraphModule

    model = _toy()
    onnx.checker.check_model(model, full_check=True)
    mod = OnnxGraphModule(model)
    seen = {}
    x = torch.from_numpy(np.random.default_rng(2).random((2, 2, 8, 8), np.float32))
    y, s = mod.run((x,), hook=lambda name, op, ins, outs, res: seen.update({o: r.dtype for o, r in zip(outs, res)}))
    assert seen["xh"] == seen["xp"] == seen["c"] == seen["r"] == torch.float16  # computed in float16
    assert y.dtype == torch.float32 and s.tolist() == [2, 4, 8, 8]
    ref = _ort(model, x.numpy())[0]
    assert float(np.abs(y.numpy() - ref).max()) < 1e-2  # ORT (float32 inside) vs float16 kernels
    # float16 really rounds: the same graph in float32 differs from the float16 run
    y32 = OnnxGraphModule(_toy(TensorProto.FLOAT))(x)[0]
    assert 0 < float((y32 - y).abs().max()) < 1e-2


def test_initialisers_are_buffers_and_follow_to():
    import torch

    from bmltrt.runtime.onnx_torch import OnnxGraphModule

    mod = OnnxGraphModule(_toy())
    bufs = dict(mod.named_buffers())
    assert any(b.dtype == torch.float16 and b.shape == (4, 2, 3, 3) for b in bufs.values())
    mod.to("meta")
    assert all(b.device.type == "meta" for b in mod.buffers())
    with pytest.raises(TypeError, match="float32"):
        OnnxGraphModule(_toy())(torch.zeros(1, 2, 8, 8, dtype=torch.float16))


def test_unsupported_op_is_named():
    from bmltrt.runtime.onnx_torch import OnnxGraphModule

    g = helper.make_graph([helper.make_node("DFT", ["x"], ["y"], name="fft")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2])])
    with pytest.raises(NotImplementedError, match="DFT.*'fft'"):
        OnnxGraphModule(helper.make_model(g))
