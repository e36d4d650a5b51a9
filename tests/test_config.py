"""Configuration: layering, recipes, and errors that name the key."""
import pytest

from byol_fast.errors import ConfigError
from byol_fast.config import load_config
from conftest import ROOT


def test_defaults_are_the_paper_recipe():
    cfg = load_config()
    v1, v2 = cfg.data.view1, cfg.data.view2
    assert (v1.blur_p, v1.solarize_p, v2.blur_p, v2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert (v1.brightness, v1.contrast, v1.saturation, v1.hue) == (0.4, 0.4, 0.2, 0.1)
    assert (v1.jitter_p, v1.grayscale_p, v1.blur_kernel, v1.crop_area) == (0.8, 0.2, 23, (0.08, 1.0))
    assert cfg.optim.batch_size == 4096 and cfg.optim.momentum == 0.9 and cfg.optim.eta == 1e-3


@pytest.mark.parametrize("name, epochs, lr, wd, tau", [
    ("byol_r50_in1k_1000ep", 1000, 0.2, 1.5e-6, 0.996),
    ("byol_r50_in1k_300ep", 300, 0.3, 1e-6, 0.99),
    ("byol_r50_in1k_100ep", 100, 0.45, 1e-6, 0.99),
    ("byol_r50_in1k_40ep", 40, 0.45, 1e-6, 0.97),
])
def test_recipes_match_deepmind_presets(name, epochs, lr, wd, tau):
    cfg = load_config(ROOT / "config" / f"{name}.yaml")
    assert (cfg.epochs, cfg.optim.lr, cfg.optim.weight_decay, cfg.ema.tau_base) == (epochs, lr, wd, tau)
    assert cfg.model.backbone == "resnet50" and cfg.optim.batch_size == 4096 and cfg.optim.warmup_epochs == 10


@pytest.mark.parametrize("epochs", [100, 400])
def test_pixpro_recipes_match_the_authors_scripts(epochs):
    """tools/pixpro_base_r50_{100,400}ep.sh of the PixPro release: LARS base lr 1.0 at batch 1024
    (128 x 8 GPUs), weight decay 1e-5, 5 warm-up epochs, momentum 0.99, p 2, positive ratio 0.7,
    pixel loss only; their MLP2d projector is 2048 -> 4096 -> 256."""
    cfg = load_config(ROOT / "config" / f"pixpro_r50_in1k_{epochs}ep.yaml")
    assert (cfg.epochs, cfg.optim.lr, cfg.optim.batch_size, cfg.optim.weight_decay, cfg.optim.warmup_epochs,
            cfg.ema.tau_base) == (epochs, 1.0, 1024, 1e-5, 5, 0.99)
    m = cfg.model
    assert (m.backbone, m.loss, m.pixel_hidden, m.pixel_out, m.pixpro_gamma, m.pixpro_threshold) == \
        ("resnet50", "pixpro", 4096, 256, 2.0, 0.7)
    assert load_config(ROOT / "config" / "pixpro_demo.yaml").model.loss == "instance+pixpro"


def test_model_init_takes_a_path_and_the_loss_a_choice():
    assert load_config(overrides=["--model.init=/weights/r50.pth"]).model.init == "/weights/r50.pth"
    with pytest.raises(ConfigError, match="model.loss"):
        load_config(overrides=["--model.loss=dense"])


def test_overrides_win_and_are_typed(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim: {lr: 0.5}\nepochs: 3\n")
    cfg = load_config(f, ["--optim.lr=0.3", "--data.view2.blur_p", "0.5", "--compile=true", "--optim.weight_decay=1"])
    assert cfg.optim.lr == 0.3 and cfg.epochs == 3 and cfg.compile is True
    assert cfg.optim.weight_decay == 1.0 and isinstance(cfg.optim.weight_decay, float)
    # a partial view2 section keeps view2's own defaults (solarize 0.2), not view1's
    assert cfg.data.view2.blur_p == 0.5 and cfg.data.view2.solarize_p == 0.2


def test_exponents_without_a_dot_are_floats(tmp_path):
    # PyYAML reads 5e-4 as a string (YAML 1.1 wants 5.0e-4); users type it either way.
    f = tmp_path / "c.yaml"
    f.write_text("optim: {weight_decay: 1.5e-6}\n")
    cfg = load_config(f, ["--optim.lr=2E1", "--ema.tau_base=+9.9e-1"])
    assert (cfg.optim.weight_decay, cfg.optim.lr, cfg.ema.tau_base) == (1.5 / 10**6, 20.0, 0.99)
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        load_config(None, ["--optim.lr=e5"])


@pytest.mark.parametrize("overrides, key", [
    (["--optim.learning_rate=1"], "optim.learning_rate"),
    (["--nonsense=1"], "nonsense"),
    (["--optim.batch_size=abc"], "optim.batch_size"),
    (["--optim.batch_size=1.5"], "optim.batch_size"),
    (["--compile=3"], "compile"),
    (["--data.view1.crop_area=[0.1]"], "data.view1.crop_area"),
    (["--precision=fp8"], "precision"),
    (["--model.backbone=resnet51"], "model.backbone"),
    (["--reader.loader=pil"], "reader.loader"),
    (["--data.loader=dali"], "reader.loader"),  # moved: the message says where to
    (["--optim=1"], "optim"),
    (["--data.view1.blur_kernel=22"], "data.view1.blur_kernel"),  # torchvision's blur needs an odd window
    (["--data.view2.blur_sigma=[0, 2]"], "data.view2.blur_sigma"),  # sigma 0 is no Gaussian
    (["--data.view2.blur_sigma=[2.0, 1.0]"], "data.view2.blur_sigma"),
])
def test_bad_keys_and_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        load_config(None, overrides)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*optim\.lrr"):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(broken)
