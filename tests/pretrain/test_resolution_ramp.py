"""The resolution ramp (data.start_image_size, ramp_start_epoch, ramp_end_epoch): each epoch's side
against the formula worked out by hand, the config's refusals, both loaders' batches at each epoch's
side, the compiled step compiled once per side (static shapes), and the ETA's weighting of later,
larger steps. (Kill -9 and resume across a size change: tests/pretrain/test_survival.py.)"""
from types import SimpleNamespace

import pytest
import torch
import torch._dynamo
from conftest import READER, write_noise_jpegs

from byol_fast.config import Config, DataConfig, load_config
from byol_fast.errors import ConfigError
from byol_fast.pretrain.learner import Learner
from byol_fast.runtime.dist import DistInfo
from byol_fast.train import Run
from pipelines.contract import Shard
from pipelines.loader import DaliTwoViewLoader
from pipelines.reference import TorchvisionTwoViewLoader


def ramp(start, end, first, last) -> DataConfig:
    return DataConfig(image_size=end, start_image_size=start, ramp_start_epoch=first, ramp_end_epoch=last)


def test_sides_follow_the_linear_ramp_rounded_to_32_or_16_px():
    # 160 -> 224 over epochs 10-20: 160 + 6.4 (e - 10) px, to the nearest multiple of 32.
    # e = 12: 172.8 -> 160; e = 13: 179.2 -> 192; e = 17: 204.8 -> 192; e = 18: 211.2 -> 224.
    assert ramp(160, 224, 10, 20).sizes(25) == [160] * 13 + [192] * 5 + [224] * 7
    # Below 64 px the step is 16: 32 -> 64 over epochs 0-4 is 32, 40 -> 48, 48, 56 -> 64, 64.
    assert ramp(32, 64, 0, 4).sizes(6) == [32, 48, 48, 64, 64, 64]
    # A side never passes either end: 100 + 2e rounds to 96 (kept at 100) up to e = 5, to 128 (kept at
    # 120) from e = 6 (112 px, halfway, goes up). The ramp may shrink too.
    assert ramp(100, 120, 0, 10).sizes(11) == [100] * 6 + [120] * 5
    assert ramp(224, 160, 0, 2).sizes(3) == [224, 192, 160]
    assert ramp(16, 32, 3, 3).sizes(5) == [16, 16, 16, 32, 32]  # a step at epoch 3
    assert DataConfig(image_size=96).sizes(4) == [96] * 4  # off by default
    assert Config().data.start_image_size == 0


def test_a_ramp_that_runs_backwards_or_below_zero_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"data.ramp_end_epoch: 5 is before ramp_start_epoch \(9\)"):
        load_config(None, ["--data.start_image_size=160", "--data.ramp_start_epoch=9", "--data.ramp_end_epoch=5"])
    with pytest.raises(ConfigError, match=r"data.start_image_size\b.*-32"):
        load_config(None, ["--data.start_image_size=-32"])
    load_config(None, ["--data.ramp_start_epoch=9"])  # no ramp: its epochs are not read


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = write_noise_jpegs(tmp_path_factory.mktemp("ramp_imgs"), 8, seed=3)
    return sorted(str(p) for p in root.rglob("*.jpg"))


RAMP_DATA = DataConfig(image_size=32, start_image_size=16, ramp_start_epoch=1, ramp_end_epoch=2)


def loader(kind, files, data):
    if kind == "dali":
        return DaliTwoViewLoader(files, data, READER, 4, "cpu", Shard(), 0, torch.device("cpu"))
    return TorchvisionTwoViewLoader(files, data, 4, 0, Shard(), 0)


@pytest.mark.parametrize("kind", ["dali", "torchvision"])
def test_both_loaders_give_each_epoch_its_side(files, kind):
    ramped, fixed = loader(kind, files, RAMP_DATA), loader(kind, files, DataConfig(image_size=32))
    for epoch, side in enumerate([16, 16, 32]):
        got = list(ramped)
        assert {tuple(v.shape) for batch in got for v in batch} == {(4, 3, side, side)}, epoch
        want = list(fixed)
        if side == 32:  # at the final side, the very batches of a run without a ramp
            assert all(torch.equal(a, b) for x, y in zip(got, want) for a, b in zip(x, y))


def test_the_compiled_step_compiles_once_per_side_with_static_shapes(monkeypatch):
    """A backend that records each graph it is given: the forward is compiled once per side, for
    that side's concrete shape (no symbolic sizes), and a side met again is not compiled again."""
    graphs, symbolic = [], []

    def recording(gm, example_inputs):
        images = [t for t in example_inputs  # the views (4, 3, S, S), not the 4-D convolution weights
                  if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[:2] == (4, 3) and t.shape[2] >= 16]
        graphs.append([tuple(t.shape) for t in images])
        symbolic.extend(d for node in gm.graph.nodes if node.op == "placeholder"
                        for d in getattr(node.meta.get("example_value"), "shape", ()) if isinstance(d, torch.SymInt))
        return gm.forward

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, dynamic=None: real(fn, backend=recording,
                                                                                 dynamic=dynamic))
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = load_config(None, ["--model.backbone=tiny_resnet", "--model.projector_hidden=32",
                             "--model.projector_out=16", "--model.predictor_hidden=32", "--channels_last=false",
                             "--compile=true", "--epochs=4", "--data.image_size=32", "--data.start_image_size=16",
                             "--data.ramp_start_epoch=1", "--data.ramp_end_epoch=2"])
    lrn = Learner(cfg, torch.device("cpu"), DistInfo())
    g = torch.Generator().manual_seed(0)
    per_side = {}
    for side in (16, 16, 32, 32, 16):
        before = len(graphs)
        batch = [(torch.randn(4, 3, side, side, generator=g), torch.randn(4, 3, side, side, generator=g))]
        lrn.step(batch, 0.01, 0.99)
        per_side.setdefault(side, []).append(len(graphs) - before)
    image_graphs = [shapes for shapes in graphs if shapes]
    assert image_graphs and not symbolic  # every graph for concrete sizes
    assert {s[-1] for shapes in image_graphs for s in shapes} == {16, 32}
    assert per_side[16][0] > 0 and per_side[32][0] > 0  # the first step at each side compiles
    assert per_side[16][1:] == [0, 0] and per_side[32][1:] == [0]  # a side met again never does
    torch._dynamo.reset()


def test_the_eta_counts_a_larger_later_step_by_its_pixels():
    cfg = load_config(None, ["--epochs=4", "--data.image_size=32", "--data.start_image_size=16",
                             "--data.ramp_start_epoch=1", "--data.ramp_end_epoch=2"])
    run = SimpleNamespace(cfg=cfg, step=3, steps_per_epoch=2)  # the sides: 16, 16, 32, 32
    # Step 3 measured a 16 px step; left: one 16 px step (epoch 1) and four 32 px ones, 4x the pixels.
    assert Run._steps_left(run, 8) == pytest.approx(1 + 4 * 4)
    flat = SimpleNamespace(cfg=load_config(None, ["--epochs=4"]), step=3, steps_per_epoch=2)
    assert Run._steps_left(flat, 8) == 5
