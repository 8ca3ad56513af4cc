"""The training recipe of export/train_defaults.sh at toy size: label maps -> anatomy bank ->
label-driven scans -> a few real optimiser steps of both networks, resumable."""

import json

import numpy as np

import pytest
import torch
from typer.testing import CliRunner

from bmltrt.cli import app

from conftest import needs_torch
from test_labelgen import knee_file

pytestmark = needs_torch


@pytest.fixture(scope="module")
def labels_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("labels")
    knee_file(d / "knee_labels.nii.gz")
    return d


def _run(args):
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output + (r.stderr or "")
    return r


def test_segmenter_trains_on_label_maps_and_resumes(labels_dir, tmp_path):
    cfg = tmp_path / "seg.json"
    cfg.write_text(json.dumps({"features": [4, 4, 8, 16, 32, 4], "inplane_spacing_mm": 4.0,
                               "patch": [16, 32, 32], "overlap": 0.25}))
    common = ["train", "segmenter", "--labels", str(labels_dir), "--bank-cache", str(tmp_path / "bank"),
              "--phantoms", "0", "--out", str(tmp_path / "seg"), "--config", str(cfg), "--batch-size", "2",
              "--val-every", "3", "--autocast", "bf16"]
    _run(common + ["--steps", "3"])
    ck = torch.load(tmp_path / "seg" / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 3 and ck["config"]["autocast"] == "bf16"
    assert 0.0 <= ck["history"][-1]["gen_dice"] <= 1.0  # scored on generated validation scans
    best = torch.load(tmp_path / "seg" / "best.pt", weights_only=False)  # the best on generated scans
    assert best["metrics"]["gen_dice"] == ck["history"][-1]["best"]
    assert json.loads((tmp_path / "seg" / "history.json").read_text())[-1]["step"] == 3
    # the same command without --resume would start again over the run's weights: refused
    before = (tmp_path / "seg" / "checkpoint.pt").read_bytes()
    r = CliRunner().invoke(app, common + ["--steps", "4"])
    assert r.exit_code == 2 and "already holds a checkpoint" in r.stderr and "--resume" in r.stderr, r.stderr
    assert (tmp_path / "seg" / "checkpoint.pt").read_bytes() == before
    leftover = tmp_path / "seg" / ".checkpoint.pt.x1y2.part"  # a save cut by SIGKILL
    leftover.write_bytes(b"")
    _run(common + ["--steps", "4", "--resume"])
    last = torch.load(tmp_path / "seg" / "checkpoint.pt", weights_only=False)
    assert last["step"] == 4 and not leftover.exists()
    # a run at or past --stop-at is not trained on to --steps over that checkpoint
    before = (tmp_path / "seg" / "checkpoint.pt").read_bytes()
    r = CliRunner().invoke(app, common + ["--steps", "8", "--stop-at", "4", "--resume"])
    assert r.exit_code == 2 and "already at step 4, at or past --stop-at 4" in r.stderr, r.stderr
    assert (tmp_path / "seg" / "checkpoint.pt").read_bytes() == before
    # nor resumed with another schedule or other samples halfway (--steps may grow)
    r = CliRunner().invoke(app, common + ["--steps", "8", "--resume", "--lr", "1e-5", "--lesion-p", "0.9"])
    assert r.exit_code == 2 and "other settings (--lr 0.002 -> 1e-05; lesion_p 0.5 -> 0.9)" in r.stderr, r.stderr
    assert (tmp_path / "seg" / "checkpoint.pt").read_bytes() == before
    # resuming with another network config, or from a checkpoint cut short: one line each
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"features": [4, 4, 8, 16, 32, 4], "inplane_spacing_mm": 3.0,
                                 "patch": [16, 32, 32], "overlap": 0.25}))
    r = CliRunner().invoke(app, [str(other) if a == str(cfg) else a for a in common] + ["--steps", "5", "--resume"])
    assert r.exit_code == 2 and "another segmenter config (inplane_spacing_mm 4.0 -> 3.0)" in r.stderr, r.stderr
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "checkpoint.pt").write_bytes((tmp_path / "seg" / "checkpoint.pt").read_bytes()[:5000])
    r = CliRunner().invoke(app, [str(tmp_path / "cut") if a == str(tmp_path / "seg") else a for a in common]
                           + ["--steps", "5", "--resume"])
    assert r.exit_code == 2 and "the checkpoint cannot be read" in r.stderr, r.stderr
    # fine-tuning starts from those weights, with every generated scan carrying lesions
    # (another --seed reuses the anatomy bank: it is keyed by --bank-seed, not rebuilt)
    bank = sorted(p.name for p in (tmp_path / "bank").iterdir())
    tune = [a if a != str(tmp_path / "seg") else str(tmp_path / "tuned") for a in common]
    _run(tune + ["--steps", "10", "--stop-at", "1", "--init", str(tmp_path / "seg" / "checkpoint.pt"), "--lesion-p",
                 "1", "--lr", "1e-9", "--lesion-surface-p", "0.6", "--lesion-breach-p", "0.5", "--lesion-weight", "5",
                 "--shell-weight", "5", "--dark-muscle-p", "0.7", "--consistency-weight", "2", "--anchor-weight", "3",
                 "--anchor-scope", "lesions",
                 "--runtime-smoothing-p", "0.5", "--fat-like-marrow-p", "0.6", "--seed", "7"])
    assert sorted(p.name for p in (tmp_path / "bank").iterdir()) == bank
    tuned = torch.load(tmp_path / "tuned" / "checkpoint.pt", weights_only=False)
    assert tuned["config"]["lesion_p"] == 1.0 and tuned["config"]["init"].endswith("checkpoint.pt")
    assert tuned["config"]["lesion_surface_p"] == 0.6 and tuned["config"]["lesion_weight"] == 5.0
    assert tuned["config"]["shell_weight"] == 5.0 and tuned["config"]["lesion_breach_p"] == 0.5
    assert tuned["config"]["dark_muscle_p"] == 0.7 and tuned["config"]["consistency_weight"] == 2.0
    assert tuned["history"][-1]["consistency"] >= 0.0  # each generated crop came in two contrasts
    assert tuned["config"]["anchor_scope"] == "lesions"
    assert tuned["config"]["anchor_weight"] == 3.0 and tuned["config"]["runtime_smoothing_p"] == 0.5
    assert tuned["config"]["seg_antialias"] > 0  # the runtime's smoothing, recorded with the run
    assert tuned["config"]["fat_like_marrow_p"] == 0.6
    assert tuned["history"][-1]["anchor"] < 1e-4  # the teacher is the --init network, frozen
    assert tuned["step"] == 1 and tuned["history"][-1]["step"] == 1  # --stop-at 1 of a 10-step schedule
    assert 0.0 <= tuned["history"][-1]["gen_lesion_in_femur"] <= 1.0  # generated scans carry lesions
    k = "conv_0_0.conv_0.conv.weight"
    assert torch.allclose(tuned["modules"]["net"][k], last["modules"]["net"][k], atol=1e-6)  # tiny lr: where it started


def test_one_inpainter_trains_at_several_resolutions(labels_dir, tmp_path):
    _run(["train", "inpainter", "--labels", str(labels_dir), "--bank-cache", str(tmp_path / "bank"),
          "--phantoms", "0", "--out", str(tmp_path / "inp"), "--config", "tiny", "--resolution", "64,128",
          "--steps", "3", "--batch-size", "2", "--val-every", "3"])
    ck = torch.load(tmp_path / "inp" / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 3 and ck["config"]["resolutions"] == [64, 128]
    assert ck["history"][-1]["gen_masked_l1"] > 0
    # fine-tuning the shipped generator: its float32 graph is the start, its BatchNorms frozen
    _run(["train", "inpainter", "--labels", str(labels_dir), "--bank-cache", str(tmp_path / "bank"),
          "--phantoms", "0", "--out", str(tmp_path / "tuned"), "--config", "tiny", "--resolution", "128",
          "--steps", "1", "--batch-size", "2", "--val-every", "1", "--lr", "1e-9", "--init", "export/inpainter_128.onnx"])
    tuned = torch.load(tmp_path / "tuned" / "checkpoint.pt", weights_only=False)
    assert tuned["config"]["frozen_bn"] is True and tuned["config"]["init"].endswith("inpainter_128.onnx")
    from bmltrt.export.onnx_export import generator_weights_from_graph

    start, _ = generator_weights_from_graph("export/inpainter_128.onnx")
    for k in ("head.1.weight", "blocks.0.conv1.bn_l.running_var", "stem.bn_l.bias"):  # tiny lr, frozen statistics
        assert torch.allclose(tuned["modules"]["gen"][k], start[k], atol=1e-6), k


def test_shipped_inpainter_graph_is_a_fine_tuning_start():
    """The shipped float32 inpainter graph (BatchNorms folded into its convolutions, weights
    renamed by the export) gives back a generator that computes what the graph computes, in
    eval mode and, with its BatchNorms frozen, in training mode too."""
    import onnxruntime as ort

    from bmltrt.models.lama import InpainterConfig, LamaGenerator
    from bmltrt.runtime.models import ModelStore
    from bmltrt.training.checkpoint import load_weights

    store = ModelStore.open()
    path = store.path("inpainter_128", "fp32")
    gen = LamaGenerator(InpainterConfig.from_dict(store.entry("inpainter_128")["config"]))
    gen.load_state_dict(load_weights(path, "inpainter", "gen"))
    x = np.random.default_rng(0).random((2, 2, 128, 128), dtype=np.float32)
    x[:, 1] = x[:, 1] > 0.7
    x[:, 0] *= 1 - x[:, 1]
    graph = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"masked_and_mask": x})[0]
    with torch.no_grad():
        assert np.abs(gen.eval()(torch.from_numpy(x)).numpy() - graph).max() < 1e-4
        assert np.abs(gen.freeze_bn().train()(torch.from_numpy(x)).numpy() - graph).max() < 1e-4
        assert np.abs(gen.freeze_bn(False).train()(torch.from_numpy(x)).numpy() - graph).max() > 1e-3


def test_inpainter_init_errors_are_one_line(labels_dir, tmp_path):
    from bmltrt.errors import BmlError
    from bmltrt.training.checkpoint import load_weights

    with pytest.raises(BmlError, match="float32"):
        load_weights("export/inpainter_128_fp16.onnx", "inpainter", "gen")
    r = CliRunner().invoke(app, ["train", "inpainter", "--labels", str(labels_dir), "--out", str(tmp_path / "x"),
                                 "--steps", "1", "--init", str(tmp_path / "missing.onnx")])
    assert r.exit_code == 2 and "no such checkpoint" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args, words", [
    (["--resolution", "100"], "multiple of 8"),
    (["--resolution", "a,b"], "not a number"),
    (["--phantom-fraction", "2"], "not in [0, 1]"),
    (["--autocast", "fp8"], "--autocast"),
    (["--bank-seed", "-1"], "--bank-seed"),
    (["--data-workers", "-1"], "--data-workers"),
    (["--fresh-per-step", "0"], "--fresh-per-step"),
])
def test_bad_training_options_are_one_line(labels_dir, tmp_path, args, words):
    r = CliRunner().invoke(app, ["train", "inpainter", "--labels", str(labels_dir), "--out", str(tmp_path / "x"),
                                 "--steps", "1"] + args)
    assert r.exit_code == 2 and words in r.stderr and "Traceback" not in r.output


@pytest.mark.parametrize("args, words", [
    (["--lesion-surface-p", "1.5"], "--lesion-surface-p"),
    (["--lesion-breach-p", "-0.1"], "--lesion-breach-p"),
    (["--lesion-weight", "-1"], "--lesion-weight"),
    (["--shell-weight", "x"], "--shell-weight"),
    (["--consistency-weight", "-1"], "--consistency-weight"),
    (["--anchor-weight", "-1"], "--anchor-weight"),
    (["--anchor-weight", "1"], "--anchor-weight needs --init"),
    (["--anchor-scope", "femur"], "--anchor-scope 'femur' is not one of all, lesions"),
    (["--anchor-scope", "lesions"], "--anchor-scope needs --anchor-weight"),
])
def test_bad_lesion_options_are_one_line(labels_dir, tmp_path, args, words):
    r = CliRunner().invoke(app, ["train", "segmenter", "--labels", str(labels_dir), "--out", str(tmp_path / "x"),
                                 "--steps", "1"] + args)
    assert r.exit_code == 2 and words in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()


def test_training_needs_some_data(tmp_path):
    r = CliRunner().invoke(app, ["train", "segmenter", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "no training data" in r.stderr


def test_lesion_weight_makes_a_carved_lesion_cost_more():
    """--lesion-weight: a segmentation that leaves the lesion out of the femur costs more than
    one that keeps it, by more with the weight than without."""
    from bmltrt.training.segmenter import dice_ce_loss

    target = torch.zeros(1, 1, 4, 16, 16)
    target[..., 2:14, 2:14] = 1
    lesion = torch.zeros_like(target, dtype=torch.bool)
    lesion[..., 2:5, 6:10] = True  # at the femur's surface
    keep = torch.where(target > 0, 4.0, -4.0)
    carve = torch.where((target > 0) & ~lesion, 4.0, -4.0)
    as_logits = lambda v: torch.cat([-v, v], 1)  # noqa: E731
    gap = [float(dice_ce_loss(as_logits(carve), target, lesion, w) - dice_ce_loss(as_logits(keep), target, lesion, w))
           for w in (0.0, 5.0)]
    assert 0 < gap[0] < gap[1]
    assert gap[1] - gap[0] > 5 * 7.9  # the weighted term: ~8 nats per carved voxel (logit 4 vs -4)


def test_shell_weight_makes_a_swollen_femur_cost_more():
    """--shell-weight: a femur grown by one pixel all round costs more with the weight than
    without; the exact femur pays nothing extra."""
    from bmltrt.training.segmenter import dice_ce_loss, outer_shell

    target = torch.zeros(1, 1, 4, 16, 16)
    target[..., 4:12, 4:12] = 1
    shell = outer_shell(target)
    assert int(shell.sum()) == 4 * (10 * 10 - 8 * 8)  # the in-plane ring, every slice
    exact = torch.where(target > 0, 4.0, -4.0)
    swollen = torch.where((target > 0) | shell, 4.0, -4.0)
    as_logits = lambda v: torch.cat([-v, v], 1)  # noqa: E731
    gap = [float(dice_ce_loss(as_logits(swollen), target, shell_weight=w) - dice_ce_loss(as_logits(exact), target,
                                                                                            shell_weight=w))
           for w in (0.0, 2.0)]
    assert 0 < gap[0] < gap[1] and gap[1] - gap[0] > 2 * 7.9  # ~8 nats per wrong ring voxel
    assert abs(float(dice_ce_loss(as_logits(exact), target, shell_weight=2.0)
                     - dice_ce_loss(as_logits(exact), target))) < 0.01


def test_consistency_without_label_maps_is_one_line(tmp_path):
    """Only generated scans come in two contrasts: on phantoms alone the option would do nothing."""
    r = CliRunner().invoke(app, ["train", "segmenter", "--data", str(tmp_path), "--out", str(tmp_path / "x"),
                                 "--steps", "1", "--consistency-weight", "1"])
    assert r.exit_code == 2 and "--consistency-weight needs --labels" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()


def test_consistency_loss_is_zero_for_agreeing_scans_and_pulls_them_together():
    """--consistency-weight: two scans of one knee that disagree on the femur border pay for
    it; identical predictions pay nothing; the gradient moves each toward the other."""
    from bmltrt.training.segmenter import consistency_loss

    target = torch.zeros(1, 1, 4, 16, 16)
    target[..., 4:12, 4:12] = 1
    as_logits = lambda m: torch.cat([4 - 8 * m, 8 * m - 4], 1)  # noqa: E731  (femur +4 inside, -4 outside)
    a = as_logits(target)
    wider = torch.zeros_like(target)
    wider[..., 3:13, 3:13] = 1
    b = as_logits(wider).requires_grad_(True)
    assert float(consistency_loss(a, a.clone())) == 0.0
    loss = consistency_loss([a, a], [b, b])  # deep-supervision lists too
    assert 0.1 < float(loss) < 1.0  # the ring of 36 voxels per slice, out of 100 near the femur
    loss.backward()
    ring = (wider > 0) & (target == 0)
    assert (b.grad[:, 1:2][ring] > 0).all()  # lowering b's femur logit on the ring lowers the loss


def test_lesion_scoped_anchor_holds_only_near_lesions():
    """--anchor-scope lesions: a student that moved the femur border far from any lesion pays
    nothing; one that carved a lesion out of the femur pays, and its gradient puts it back."""
    from bmltrt.training.segmenter import anchor_drift, near_lesions

    as_logits = lambda m: torch.cat([4 - 8 * m, 8 * m - 4], 1)  # noqa: E731
    femur = torch.zeros(1, 1, 5, 24, 24)
    femur[..., 4:20, 4:20] = 1
    lesion = torch.zeros_like(femur, dtype=torch.bool)
    lesion[:, :, 2, 6:8, 6:8] = True
    region = near_lesions(lesion)
    assert region.shape == (1, 5, 24, 24) and region[0, 2, 3:11, 3:11].all() and region.sum() == 3 * 8 * 8
    teacher = as_logits(femur)
    border_moved = femur.clone()
    border_moved[..., 17:20, :] = 0  # far from the lesion
    assert anchor_drift(as_logits(border_moved), teacher, region) < 1e-6
    assert anchor_drift(as_logits(border_moved), teacher) > 0.01  # the "all" scope pays for it
    carved = femur.clone()
    carved[lesion] = 0
    student = as_logits(carved).requires_grad_(True)
    drift = anchor_drift(student, teacher, region)
    assert drift > 0.01
    drift.backward()
    assert (student.grad[:, 1:2][lesion] < 0).all()  # raising the femur logit on the lesion lowers it
    assert anchor_drift(teacher, teacher, torch.zeros_like(region)) == 0  # no lesion in the batch: nothing


def test_shipped_segmenter_graph_is_a_fine_tuning_start():
    """--init export/segmenter.onnx: the shipped float32 graph's weights load into the torch
    segmenter, which then computes what the graph computes."""
    import onnxruntime as ort

    from bmltrt.models.unetpp import SegmenterConfig, SegmenterLogits, build_segmenter
    from bmltrt.runtime.models import ModelStore
    from bmltrt.training.checkpoint import load_weights

    store = ModelStore.open()
    entry = store.entry("segmenter", "fp32")
    net = build_segmenter(SegmenterConfig(**entry["config"]))
    missing, unexpected = net.load_state_dict(load_weights(store.path("segmenter", "fp32"), "segmenter", "net"),
                                              strict=False)
    assert not unexpected and all(k.startswith("final_conv_0_") for k in missing)  # unused deep-supervision heads
    x = np.random.default_rng(0).random((1, 1, *entry["config"]["patch"]), dtype=np.float32)
    with torch.no_grad():
        ours = SegmenterLogits(net)(torch.from_numpy(x)).numpy()
    graph = ort.InferenceSession(str(store.path("segmenter", "fp32")), providers=["CPUExecutionProvider"])
    assert np.abs(ours - graph.run(None, {"image": x})[0]).max() < 1e-3


def test_init_from_a_float16_graph_is_one_line(tmp_path):
    from bmltrt.errors import BmlError
    from bmltrt.runtime.models import ModelStore
    from bmltrt.training.checkpoint import load_weights

    with pytest.raises(BmlError, match="float32"):
        load_weights(ModelStore.open().path("segmenter", "fp16"), "segmenter", "net")
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(BmlError, match="not an ONNX graph"):
        load_weights(bad, "segmenter", "net")


def test_retrained_segmenter_ships_with_the_folders_inpainters(tmp_path):
    """export --from-onnx DIR --segmenter CKPT: the new segmenter, DIR's inpainter graphs as they are."""
    from bmltrt.io.checksum import file_sha256
    from bmltrt.models.unetpp import SegmenterConfig, build_segmenter
    from bmltrt.runtime.models import ModelStore

    cfg = SegmenterConfig(features=(4, 4, 8, 16, 32, 4), inplane_spacing_mm=4.0, patch=(16, 32, 32), overlap=0.25)
    torch.manual_seed(0)
    ck = tmp_path / "seg.pt"
    torch.save({"kind": "segmenter", "step": 1, "config": {"segmenter": cfg.to_dict()},
                "modules": {"net": build_segmenter(cfg).state_dict()}}, ck)
    out = tmp_path / "models"
    r = CliRunner().invoke(app, ["export", "--from-onnx", "export", "--segmenter", str(ck), "--precision", "fp32",
                                 "--no-lint", "--out", str(out)])
    assert r.exit_code == 0, r.output
    new, shipped = ModelStore.open(out), ModelStore.open()
    assert new.entry("segmenter")["config"]["patch"] == [16, 32, 32]  # from the checkpoint
    assert new.entry("segmenter")["source"]["checkpoint"] == "seg.pt"
    assert new.resolutions() == shipped.resolutions()
    for res in shipped.resolutions():  # the same inpainter graphs (sha256 of the source graph)
        assert new.entry(f"inpainter_{res}")["source"]["sha256"] == file_sha256(shipped.path(f"inpainter_{res}", "fp32"))


def test_the_fine_grid_preset_fine_tunes_the_shipped_segmenter():
    """--config cpu-fine --init export/segmenter.onnx: the same network on a grid twice as
    fine, so the shipped graph's weights fit it."""
    from bmltrt.models.unetpp import SEGMENTER_PRESETS, build_segmenter
    from bmltrt.runtime.models import ModelStore
    from bmltrt.training.checkpoint import load_weights

    fine, cpu = SEGMENTER_PRESETS["cpu-fine"], SEGMENTER_PRESETS["cpu"]
    assert fine.inplane_spacing_mm == cpu.inplane_spacing_mm / 2 and fine.features == cpu.features
    store = ModelStore.open()
    _, unexpected = build_segmenter(fine).load_state_dict(
        load_weights(store.path("segmenter", "fp32"), "segmenter", "net"), strict=False)
    assert not unexpected


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    """--autocast bf16 warns on a CPU that emulates bfloat16 (far slower than float32)."""
    from bmltrt.training.loop import cpu_has_native_bf16

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert cpu_has_native_bf16(str(info)) is False
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_native_bf16(str(info)) is True
    assert cpu_has_native_bf16(str(tmp_path / "absent")) is None


# -- the generator in worker processes (--data-workers) -------------------------------------

@pytest.fixture(scope="module")
def toy_bank(labels_dir, tmp_path_factory):
    from bmltrt.training.data import bank_paths

    return bank_paths(labels_dir, tmp_path_factory.mktemp("bank"), phantoms=0)


def _coarse_scan(anatomy, rng, **kw):
    from bmltrt.synth.labelgen import segmenter_sample

    return segmenter_sample(anatomy, rng, 4.0, lesion_p=1.0, **kw)


def _dying_worker(anatomy, rng):
    import os

    os._exit(3)  # as the kernel's out-of-memory killer would end it


def test_data_workers_make_the_same_scans_whatever_their_number(toy_bank):
    from bmltrt.training.data import SampleWorkers

    made = {}
    for n, seed in ((1, 3), (2, 3), (2, 4), (1, (3, 100))):
        with SampleWorkers(toy_bank, n, seed) as workers:
            nxt = workers.stream(_coarse_scan, stream=0, prefetch=3)
            other = workers.stream(_coarse_scan, stream=1)
            made[n, seed] = [nxt(None) for _ in range(3)] + [other()]
    for a, b in zip(made[1, 3], made[2, 3]):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.femur, b.femur)
        assert np.array_equal(a.lesion, b.lesion)
    images = [s.image for s in made[1, 3]]
    assert not any(np.array_equal(images[0], x) for x in images[1:])  # streams and samples differ
    assert not np.array_equal(images[0], made[2, 4][0].image)  # and runs of another seed
    assert not np.array_equal(images[0], made[1, (3, 100)][0].image)  # or resumed from step 100


def test_a_dead_data_worker_is_one_line(toy_bank):
    from bmltrt.errors import BmlError
    from bmltrt.training.data import SampleWorkers

    with SampleWorkers(toy_bank, 1, 0) as workers:
        nxt = workers.stream(_dying_worker)
        with pytest.raises(BmlError, match="worker process stopped") as err:
            nxt()
    assert "--data-workers" in err.value.hint


def test_both_networks_train_on_scans_made_by_data_workers(labels_dir, toy_bank, tmp_path):
    cfg = tmp_path / "seg.json"
    cfg.write_text(json.dumps({"features": [4, 4, 8, 16, 32, 4], "inplane_spacing_mm": 4.0,
                               "patch": [16, 32, 32], "overlap": 0.25}))
    bank = str(toy_bank[0].parent)
    _run(["train", "segmenter", "--labels", str(labels_dir), "--bank-cache", bank, "--phantoms", "0",
          "--out", str(tmp_path / "seg"), "--config", str(cfg), "--batch-size", "2", "--steps", "2",
          "--val-every", "2", "--data-workers", "2", "--fresh-per-step", "3"])
    ck = torch.load(tmp_path / "seg" / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 2 and np.isfinite(ck["history"][-1]["loss"])
    assert ck["config"]["data_workers"] == 2 and ck["config"]["fresh_per_step"] == 3
    _run(["train", "segmenter", "--labels", str(labels_dir), "--bank-cache", bank, "--phantoms", "0",
          "--out", str(tmp_path / "seg"), "--config", str(cfg), "--batch-size", "2", "--steps", "3",
          "--val-every", "3", "--data-workers", "1", "--resume"])
    assert torch.load(tmp_path / "seg" / "checkpoint.pt", weights_only=False)["step"] == 3
    _run(["train", "inpainter", "--labels", str(labels_dir), "--bank-cache", bank, "--phantoms", "0",
          "--out", str(tmp_path / "inp"), "--config", "tiny", "--resolution", "64", "--steps", "1",
          "--batch-size", "2", "--val-every", "1", "--data-workers", "1"])
    ck = torch.load(tmp_path / "inp" / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 1 and ck["config"]["data_workers"] == 1 and ck["history"][-1]["gen_masked_l1"] > 0


def test_data_workers_without_label_maps_are_ignored_with_a_warning(tmp_path):
    from bmltrt.cli import _sample_options

    assert _sample_options(None, 2, 4) == {}
    assert _sample_options(tmp_path, 2, None) == {"data_workers": 2}


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" in f.read()  # a zombie has exited; its reaper is not ours
    except FileNotFoundError:
        return True


def test_data_workers_exit_when_their_trainer_is_killed_outright(toy_bank, tmp_path):
    """SIGKILL (or the out-of-memory killer) gives the trainer no chance to stop its workers:
    they must notice and exit, not wait for work forever holding the anatomy bank."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "trainer.py"
    script.write_text(
        "import sys, time\n"
        "from bmltrt.synth.labelgen import segmenter_sample\n"
        "from bmltrt.training.data import SampleWorkers\n"
        "if __name__ == '__main__':\n"
        "    w = SampleWorkers(sys.argv[1:], 2, 0)\n"
        "    w.stream(segmenter_sample, 4.0)()\n"
        "    print(*[p.pid for p in w._pool._processes.values()], flush=True)\n"
        "    time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, str(script), *map(str, toy_bank)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(x) for x in p.stdout.readline().split()]
        assert len(pids) == 2 and not any(_gone(x) for x in pids)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    deadline = time.time() + 15
    while time.time() < deadline and not all(_gone(x) for x in pids):
        time.sleep(0.2)
    left = [x for x in pids if not _gone(x)]
    for x in left:
        os.kill(x, signal.SIGKILL)
    assert not left, f"workers {left} outlived their trainer"


def test_gpu_train_script_runs_on_a_cpu(labels_dir, toy_bank, tmp_path):
    """scripts/gpu_train.sh is run on a lent GPU machine in one short call: its logic is
    checked here (a CPU, a tiny network, the toy bank), so a lease is not spent on a typo."""
    import os
    import shutil
    import subprocess
    import sys

    data = tmp_path / "device"
    r = subprocess.run(["bash", "scripts/gpu_train.sh", str(tmp_path / "out"), "1"], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": sys.executable, "DATA": str(data)})
    assert r.returncode == 2 and "gpu_train_prepare.sh" in r.stdout  # nothing prepared: one line
    shutil.copytree(labels_dir, data / "train_labels")
    shutil.copytree(toy_bank[0].parent, data / "anatomy_bank")
    cfg = tmp_path / "seg.json"
    cfg.write_text(json.dumps({"features": [4, 4, 8, 16, 32, 4], "inplane_spacing_mm": 4.0,
                               "patch": [16, 32, 32], "overlap": 0.25}))
    env = {**os.environ, "PYTHON": sys.executable, "DATA": str(data), "DEVICE": "cpu", "CONFIG": str(cfg),
           "INIT": "", "STEPS": "2", "BATCH": "2", "WORKERS": "1", "AUTOCAST": "none", "VAL_EVERY": "2",
           "EXTRA": "--phantoms 0"}
    r = subprocess.run(["bash", "scripts/gpu_train.sh", str(tmp_path / "out"), "1"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("PASSED"), r.stdout + r.stderr
    ck = torch.load(tmp_path / "out" / "seg" / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 2 and ck["config"]["data_workers"] == 1 and ck["config"]["fresh_per_step"] == 3
    device = json.loads((tmp_path / "out" / "device.json").read_text())
    assert device["device"] == "cpu" and device["data_workers"] == 1 and "--data-workers 1" in device["command"]

    # NET=inpainter: the generator's weights alone come back (the full checkpoint, with the
    # discriminator and both optimisers, is over a device call's 16 MiB a file for "small")
    # and `bmltrt export` makes a graph of them.
    from bmltrt.export.onnx_export import inpainter_graph
    from bmltrt.training.checkpoint import load

    env.update(NET="inpainter", CONFIG="tiny", RESOLUTIONS="64", KEEP=str(tmp_path / "keep"))
    r = subprocess.run(["bash", "scripts/gpu_train.sh", str(tmp_path / "out"), "1"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("PASSED"), r.stdout + r.stderr
    inp = tmp_path / "out" / "inp"
    assert sorted(p.name for p in inp.iterdir()) == ["gen_best.pt", "gen_last.pt", "history.json"]
    slim = load(inp / "gen_last.pt")
    assert slim["step"] == 2 and list(slim["modules"]) == ["gen"] and "optimizers" not in slim
    assert (tmp_path / "keep" / "checkpoint.pt").stat().st_size > 2 * (inp / "gen_last.pt").stat().st_size
    _, entry = inpainter_graph(slim)
    assert entry["resolution"] == 64 and entry["max_abs_err_vs_torch"] < 1e-4
    env["NET"] = "both"
    r = subprocess.run(["bash", "scripts/gpu_train.sh", str(tmp_path / "out2"), "1"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 2 and "NET=both" in r.stdout


def test_more_data_workers_than_the_memory_holds_is_one_line(labels_dir, toy_bank, tmp_path, monkeypatch):
    """Each worker loads the anatomy bank (about 1 GB for train_labels/): asking for more than
    fit must stop before any starts, not let the kernel kill one mid-run."""
    import bmltrt.training.data as data

    monkeypatch.setattr(data, "available_memory", lambda: 300 * 2**20)
    cfg = tmp_path / "seg.json"
    cfg.write_text(json.dumps({"features": [4, 4, 8, 16, 32, 4], "inplane_spacing_mm": 4.0,
                               "patch": [16, 32, 32], "overlap": 0.25}))
    r = CliRunner().invoke(app, ["train", "segmenter", "--labels", str(labels_dir), "--bank-cache",
                                 str(toy_bank[0].parent), "--phantoms", "0", "--out", str(tmp_path / "x"),
                                 "--config", str(cfg), "--steps", "1", "--data-workers", "3"])
    assert r.exit_code == 2 and "--data-workers 3 needs about" in r.stderr, r.output
    assert "use --data-workers 1" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()
