"""PixPro in training: the instance+pixpro step through the Learner, starting the encoders
from supervised torchvision weights (model.init), and the encoder's life after pretraining in
torchvision's detection and segmentation models. (Resuming bit for bit: tests/test_survival.py.)"""
import subprocess
import sys

import pytest
import torch
import torchvision
from conftest import CHILD_ENV, ROOT, TINY_MODEL, TINY_RUN, write_noise_jpegs

from byol_fast.errors import CheckpointError
from byol_fast.config import load_config
from byol_fast.runtime.dist import DistInfo
from byol_fast.pretrain.learner import Learner

PIXPRO = ["--model.loss=instance+pixpro", "--model.pixel_hidden=32", "--model.pixel_out=16"]


def learner(*extra) -> Learner:
    return Learner(load_config(overrides=[*TINY_MODEL, *PIXPRO, *extra]), torch.device("cpu"), DistInfo())


def windows(n, size=64):
    """Random crop windows of a size x size image and random flips, (n, 5)."""
    g = torch.Generator().manual_seed(n)
    lo = torch.rand(n, 2, generator=g) * size / 2
    hi = lo + size / 4 + torch.rand(n, 2, generator=g) * size / 4
    return torch.cat([lo, hi, (torch.rand(n, 1, generator=g) < 0.5).float()], dim=1)


def test_the_pixpro_loss_falls_on_a_fixed_batch_and_only_pixpro_leaves_the_instance_loss_out():
    torch.manual_seed(0)
    lrn = learner()
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    batch = [(x1, x2, windows(8), windows(8))]
    first = [lrn.step(batch, 0.05, 0.99).item() for _ in range(2)]
    for _ in range(10):
        last = lrn.step(batch, 0.05, 0.99).item()
    assert last < first[0] - 0.1, (first, last)
    assert "pixpro_loss" in lrn.last and lrn.last["positive_pairs"].item() > 0
    pixpro_only = learner("--model.loss=pixpro")
    out = pixpro_only.byol(*batch[0])
    assert torch.allclose(out["loss"], out["pixpro_loss"])  # model.pixpro_weight 1, no instance term


@pytest.mark.slow
def test_an_instance_pixpro_learner_tells_images_apart_as_it_learns():
    """pair_top1 rises: 16 images, each step two fresh views of each through the reference loader's
    windowed views (crops and flips; the crop windows feed PixPro's pairs), instance+pixpro.
    pair_retrieval (the prediction of view 1 nearest its own image's target projection of view 2)
    starts near chance (1/16) and rises well above it; both losses fall."""
    import copy

    import numpy as np
    from PIL import Image

    from byol_fast.pretrain.health import pair_retrieval
    from pipelines.reference import TwoViewTransform

    mild = [f"--data.{v}.{k}=0" for v in ("view1", "view2") for k in ("jitter_p", "grayscale_p", "blur_p")]
    torch.manual_seed(0)
    lrn = learner("--data.image_size=32", "--data.view1.crop_area=[0.3,1.0]", "--data.view2.crop_area=[0.3,1.0]",
                  "--data.view2.solarize_p=0", *mild)
    blocks = np.random.default_rng(0).integers(0, 256, (16, 6, 6, 3))
    images = [Image.fromarray(np.kron(b, np.ones((8, 8, 1))).astype(np.uint8)) for b in blocks]  # 48x48
    views = TwoViewTransform(lrn.cfg.data, windows=True)

    def batch():
        pairs = [views(im) for im in images]
        return tuple(torch.stack([p[i] for p in pairs]) for i in range(4))

    def retrieval(repeats=5):
        probe = copy.deepcopy(lrn.byol)  # batch statistics as in training; the learner's own never move
        with torch.no_grad():
            return sum(pair_retrieval(out["prediction"], out["target_projection"]).item()
                       for out in (probe(*batch()) for _ in range(repeats))) / repeats

    before = retrieval()
    losses = [(lrn.step([batch()], 1.0, 0.9).item(), lrn.last["pixpro_loss"].item()) for _ in range(80)]
    after = retrieval()
    assert before < 0.15 and after > 0.15 and after > before + 0.08, (before, after)
    start, end = np.mean(losses[:5], axis=0), np.mean(losses[-5:], axis=0)
    assert end[0] < start[0] - 1 and end[1] < start[1] - 0.5, (start, end)


def test_pixpro_without_windows_is_refused():
    with pytest.raises(ValueError, match="crop window"):
        learner().byol(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32))


def test_model_init_starts_both_encoders_from_a_torchvision_state_dict(tmp_path):
    torch.manual_seed(3)
    supervised = torchvision.models.resnet18()
    path = tmp_path / "resnet18_supervised.pth"
    torch.save(supervised.state_dict(), path)
    lrn = learner(f"--model.init={path}")
    expected = {k: v for k, v in supervised.state_dict().items() if not k.startswith("fc.")}
    for tower in (lrn.byol.online, lrn.byol.target):
        got = tower.encoder.state_dict()
        assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)
    # Weights of another backbone: refused, naming what does not match.
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(CheckpointError) as e:
        learner(f"--model.init={tmp_path / 'r34.pth'}")
    assert "r34.pth" in str(e.value) and "\n" not in str(e.value)


def test_a_bad_init_file_stops_the_cli_in_one_line(tmp_path):
    images = write_noise_jpegs(tmp_path / "imgs", 16)
    (tmp_path / "not_weights.pth").write_bytes(b"not a checkpoint")
    cmd = [sys.executable, "-m", "byol_fast.train", *TINY_RUN, *PIXPRO, "--optim.batch_size=8", "--epochs=1",
           f"--data.path={images}", f"--out_dir={tmp_path / 'run'}", f"--model.init={tmp_path / 'not_weights.pth'}"]
    res = subprocess.run(cmd, env=CHILD_ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("error: ") and "not_weights.pth" in res.stderr


def test_the_pretrained_encoder_drops_into_torchvision_detection_and_segmentation():
    """The lines of docs/checkpoints.md: the online encoder's state (torchvision ResNet-50 names, no fc) loads
    into fasterrcnn_resnet50_fpn's and deeplabv3_resnet50's backbones with nothing missing."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn
    from torchvision.models.segmentation import deeplabv3_resnet50

    from byol_fast.models.byol import BYOL

    cfg = load_config(overrides=["--model.projector_hidden=32", "--model.projector_out=16",
                                 "--model.predictor_hidden=32"])
    state = {k: v for k, v in BYOL(cfg.model).online.encoder.state_dict().items()}
    detector = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    missing, unexpected = detector.backbone.body.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    segmenter = deeplabv3_resnet50(weights=None, weights_backbone=None)
    missing, unexpected = segmenter.backbone.load_state_dict(state, strict=False)
    assert not missing and not unexpected
