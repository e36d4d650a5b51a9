"""GPU checks (skipped without CUDA): mixed precision step, channels_last, the GPU data path end to end."""
import pytest
import torch
from PIL import Image

from byol_fast import train
from byol_fast.config import load_config
from byol_fast.runtime.dist import DistInfo
from byol_fast.pretrain.learner import Learner
from byol_fast.runtime.device import resolve_precision

pytestmark = pytest.mark.gpu
TINY = ["--model.backbone=resnet18", "--model.projector_hidden=64", "--model.projector_out=32",
        "--model.predictor_hidden=64"]


def test_auto_precision_is_bf16_on_modern_gpus():
    cfg = load_config(None, [])
    expected = torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16  # Ampere and later
    assert resolve_precision(cfg.precision, torch.device("cuda")) == expected


def test_mixed_precision_step_matches_fp32_direction():
    """bf16 autocast and fp32 give nearly the same loss on the same weights and views."""
    views = [(torch.randn(8, 3, 64, 64, device="cuda"), torch.randn(8, 3, 64, 64, device="cuda"))]
    losses = {}
    for precision in ("fp32", "auto"):
        torch.manual_seed(0)
        learner = Learner(load_config(None, TINY + [f"--precision={precision}"]), torch.device("cuda"), DistInfo())
        losses[precision] = learner.step(views, lr=0.1, tau=0.99).item()
        assert learner.skipped_total == 0
    assert abs(losses["fp32"] - losses["auto"]) < 0.05 * abs(losses["fp32"]) + 1e-3


def test_channels_last_weights():
    learner = Learner(load_config(None, TINY), torch.device("cuda"), DistInfo())
    conv = learner.byol.online.encoder.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)


def test_pretrain_with_gpu_pipeline(tmp_path, capsys):
    root = tmp_path / "imgs"
    g = torch.Generator().manual_seed(0)
    for i in range(32):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        pixels = (torch.rand(80, 96, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"c{i % 2}" / f"{i}.jpg", quality=90)
    args = TINY + [f"--data.path={root}", f"--out_dir={tmp_path / 'run'}", "--optim.batch_size=16",
                   "--data.image_size=64", "--reader.decode=gpu", "--max_steps=4", "--log_every=2", "--epochs=2"]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "cuda" in out and "step 4/" in out


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_steps_between_log_points_never_sync(precision):
    """Steps (finite, skipped, accumulated) queue on the GPU without the host waiting for any of them:
    CUDA's sync debug mode turns every synchronising call into an error."""
    torch.manual_seed(0)
    learner = Learner(load_config(None, TINY + [f"--precision={precision}"]), torch.device("cuda"), DistInfo())
    views = (torch.randn(8, 3, 64, 64, device="cuda"), torch.randn(8, 3, 64, 64, device="cuda"))
    bad = (torch.full_like(views[0], float("nan")), views[1])
    learner.step([views], lr=0.1, tau=0.99)  # warm-up: buffers, cuDNN plans
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batches in ([views], [bad], [views, views]):
            learner.step(batches, lr=0.05, tau=0.995)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert learner.read_skips() == (0, 1, 1)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_compiled_step_in_mixed_precision_never_recompiles(precision):
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    learner = Learner(load_config(None, TINY + [f"--precision={precision}", "--compile=true"]),
                      torch.device("cuda"), DistInfo())
    views = (torch.randn(8, 3, 64, 64, device="cuda"), torch.randn(8, 3, 64, 64, device="cuda"))
    losses = [learner.step([views], lr=0.1, tau=0.99)]  # compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        for lr, tau in ((0.05, 0.995), (0.02, 0.999)):
            losses.append(learner.step([views, views], lr=lr, tau=tau))
    assert all(torch.isfinite(loss).item() for loss in losses)
    if precision == "bf16":  # fp16 may skip its first steps while the GradScaler finds its scale
        assert learner.read_skips()[1] == 0
