import numpy as np
import pytest

from conftest import needs_torch

pytestmark = needs_torch
RESOLUTIONS = (128, 192, 256, 320, 448)


@pytest.mark.parametrize("res", RESOLUTIONS)
def test_fft_paths_agree(res):
    import torch

    from bmltrt.models.lama import FourierUnit

    torch.manual_seed(0)
    fu = FourierUnit(4, 4).eval()
    x = torch.randn(2, 4, res // 8, res // 8)  # the FourierUnit runs at 1/8 resolution
    with torch.no_grad():
        a = fu(x)
        fu.fft_impl = "matmul"
        b = fu(x)
    assert (a - b).abs().max().item() < 1e-5
    # and the raw transforms, at full resolution too
    from bmltrt.models.dft import irfft2_matmul, rfft2_matmul

    y = torch.randn(1, 2, res, res)
    re, im = rfft2_matmul(y)
    ref = torch.fft.rfft2(y, norm="ortho")
    assert (re - ref.real).abs().max() < 1e-4 and (im - ref.imag).abs().max() < 1e-4
    assert (irfft2_matmul(ref.real, ref.imag, res) - y).abs().max() < 1e-4


@pytest.mark.parametrize("res", RESOLUTIONS)
def test_generator_shapes_and_composite(res):
    import torch

    from bmltrt.models.lama import INPAINTER_PRESETS, LamaGenerator, composite, inpainter_input

    g = LamaGenerator(INPAINTER_PRESETS["tiny"]).eval()
    x = torch.rand(1, 1, res, res)
    m = torch.zeros_like(x)
    m[..., res // 4: res // 2, res // 3: res // 2] = 1
    with torch.no_grad():
        out = g(inpainter_input(x, m))
    assert out.shape == (1, 1, res, res)
    c = composite(x, m, out)
    changed = (c != x)
    assert not changed[m == 0].any()  # only the masked region changes
    assert changed[m == 1].float().mean() > 0.9


def test_preset_sizes_match_lama():
    from bmltrt.models.lama import INPAINTER_PRESETS, LamaGenerator, count_parameters

    assert 50e6 < count_parameters(LamaGenerator(INPAINTER_PRESETS["big"])) < 52e6
    assert 26e6 < count_parameters(LamaGenerator(INPAINTER_PRESETS["fourier"])) < 28e6
    n_small = count_parameters(LamaGenerator(INPAINTER_PRESETS["small"]))
    assert 3e6 < n_small and 4 * n_small < 16 * 2**20  # float32 weights in one file a device call brings back


def test_segmenter_steps_lower_the_loss():
    import torch

    from bmltrt.models.unetpp import SegmenterConfig, build_segmenter
    from bmltrt.training.segmenter import dice_ce_loss

    torch.manual_seed(0)
    net = build_segmenter(SegmenterConfig(features=(4, 4, 8, 16, 32, 4)))
    x = torch.rand(2, 1, 16, 32, 32)
    y = (x > 0.6).float()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    losses = []
    for _ in range(8):
        loss = dice_ce_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]


def test_generator_steps_lower_the_masked_l1():
    import torch

    from bmltrt.models.lama import InpainterConfig, LamaGenerator, composite, inpainter_input
    from bmltrt.training.inpainter import masked_l1

    torch.manual_seed(0)
    g = LamaGenerator(InpainterConfig(ngf=8, n_blocks=1))
    x = 0.3 + 0.1 * torch.rand(4, 1, 64, 64)
    m = torch.zeros_like(x)
    m[..., 16:40, 20:44] = 1
    opt = torch.optim.Adam(g.parameters(), 3e-3)
    losses = []
    for _ in range(15):
        loss = masked_l1(composite(x, m, g(inpainter_input(x, m))), x, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    from bmltrt.synth.dataset import synth_dataset

    root = tmp_path_factory.mktemp("ds")
    synth_dataset(root, 3, seed=2)
    return root


def test_resumed_run_equals_uninterrupted(tiny_dataset, tmp_path):
    import torch

    from bmltrt.models.lama import InpainterConfig
    from bmltrt.training.inpainter import train_inpainter
    from bmltrt.training.loop import RunOptions

    cfg = InpainterConfig(ngf=8, n_blocks=1)
    common = dict(data=tiny_dataset, batch_size=2, val_every=2, ckpt_every=2, seed=3)
    train_inpainter(RunOptions(out=tmp_path / "a", steps=4, **common), cfg, 64)

    class Interrupted(Exception):
        pass

    def kill_at_3(done, total, logs):  # dies during step 3, after the step-2 checkpoint
        if done == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_inpainter(RunOptions(out=tmp_path / "b", steps=4, **common), cfg, 64, progress=kill_at_3)
    train_inpainter(RunOptions(out=tmp_path / "b", steps=4, resume=True, **common), cfg, 64)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for k, v in a["modules"]["gen"].items():
        assert torch.equal(v, b["modules"]["gen"][k]), k
    assert a["history"][-1]["loss_g"] == b["history"][-1]["loss_g"]


def test_export_inpainter_matches_torch_without_dft_op(tiny_dataset, tmp_path):
    import onnxruntime as ort

    from bmltrt.export.onnx_export import TENSORRT10_SAFE_OPS, export_models
    from bmltrt.models.lama import InpainterConfig
    from bmltrt.training.inpainter import train_inpainter
    from bmltrt.training.loop import RunOptions

    train_inpainter(RunOptions(data=tiny_dataset, out=tmp_path / "r", steps=1, batch_size=2, val_every=1),
                    InpainterConfig(ngf=8, n_blocks=1), 64)
    man = export_models(None, [tmp_path / "r" / "checkpoint.pt"], tmp_path / "models", default_resolution=64)
    e = man["models"]["inpainter_64"]
    assert "DFT" not in e["ops"] and set(e["ops"]) <= TENSORRT10_SAFE_OPS
    assert e["max_abs_err_vs_torch"] < 1e-4 and len(e["sha256"]) == 64
    sess = ort.InferenceSession(str(tmp_path / "models" / e["file"]), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"masked_and_mask": np.random.default_rng(0).random((3, 2, 64, 64), np.float32)})[0]
    assert out.shape == (3, 1, 64, 64)
