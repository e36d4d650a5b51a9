"""Every command's quick path runs without a warning a user would have to learn to ignore.

Each command runs in its own process with the warnings the code can control turned into errors
(``PYTHONWARNINGS``, so that torchrun's worker processes get the same filters as the command line
would), and must exit 0 with no "warning" anywhere in its output: a deprecated argument, a
library's FutureWarning or a warning printed by native code (DALI, ONNX Runtime) fails here. One
tiny pretraining run (a few noise JPEGs, 32-px views, 2 steps) is shared by the commands that read
a checkpoint. Nothing is filtered here: a third-party warning the project cannot control is
filtered in the command itself, narrowly and with its reason (as ``byol_fast.export`` does for
TorchScript's deprecation), so that users do not see it either.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchvision
from conftest import CHILD_ENV, ROOT, TINY_RUN, write_noise_jpegs

# Each test starts a command as its own process (seconds each): the quick lane leaves them out.
pytestmark = pytest.mark.slow

WARNINGS_AS_ERRORS = "error::DeprecationWarning,error::FutureWarning,error::UserWarning"
# CHILD_ENV sets OMP_NUM_THREADS=1: without it torchrun logs a WARNING that it set it to 1 for each
# worker, a launcher notice rather than something the commands do.
ENV = {**CHILD_ENV, "PYTHONWARNINGS": WARNINGS_AS_ERRORS}
# Linear evaluation and fine-tuning on 32-px crops of the same images, one logged step per batch.
EVAL_FAST = ["--data.image_size=32", "--data.resize=36", "--batch_size=8", "--log_every=1"]


def command(*args) -> subprocess.CompletedProcess:
    """``python ARGS`` in this checkout, the warnings the code controls as errors."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)


def assert_clean(res: subprocess.CompletedProcess) -> None:
    """Exit 0 and no warning of any kind in what the command printed."""
    output = res.stdout + res.stderr
    assert res.returncode == 0, output[-3000:]
    assert "warning" not in output.lower(), output[-3000:]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train/ (16) and val/ (8) noise JPEGs in two class folders."""
    root = tmp_path_factory.mktemp("warn_data")
    write_noise_jpegs(root / "train", 16, seed=0)
    write_noise_jpegs(root / "val", 8, seed=1)
    return root


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    """One 2-step pretraining run (DALI loader): its output and its folder."""
    out = tmp_path_factory.mktemp("warn_run")
    res = command("-m", "byol_fast.train", *TINY_RUN, f"--data.path={data / 'train'}", f"--out_dir={out}",
                  "--optim.batch_size=8", "--max_steps=2")
    return res, out


@pytest.fixture(scope="module")
def linear(data, pretrained, tmp_path_factory):
    """One epoch of linear evaluation (DALI loader) of the pretraining run: its output and folder."""
    out = tmp_path_factory.mktemp("warn_linear")
    res = command("-m", "byol_fast.linear_eval", "--checkpoint", pretrained[1] / "last.pt", "--data", data,
                  f"--out_dir={out}", *EVAL_FAST, "--reader.num_threads=1", "--epochs=1", "--device=cpu")
    return res, out


def test_train(pretrained):
    res, out = pretrained
    assert_clean(res)
    assert (out / "last.pt").is_file()


def test_train_two_processes(data, tmp_path):
    """DDP's warnings only show with more than one process: torchrun, 2 gloo workers on the CPU."""
    res = command("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "byol_fast.train",
                  *TINY_RUN, f"--data.path={data / 'train'}", f"--out_dir={tmp_path}", "--optim.batch_size=8",
                  "--max_steps=2", "--device=cpu")
    assert_clean(res)
    assert "2 process(es)" in res.stdout


def test_launch_print():
    assert_clean(command("-m", "byol_fast.launch", "--gpus", "0", "--print", "--", "--config", "config/demo.yaml"))


def test_linear_eval(linear):
    res, out = linear
    assert_clean(res)
    assert (out / "results.json").is_file()


def test_predict(linear, data):
    images = sorted((data / "val").rglob("*.jpg"))[:2]
    res = command("-m", "byol_fast.predict", "--checkpoint", linear[1] / "last.pt", *images, "--topk", "2",
                  "--device", "cpu")
    assert_clean(res)
    assert len(res.stdout.splitlines()) == 2


def test_finetune(data, pretrained, tmp_path):
    res = command("-m", "byol_fast.finetune", "--checkpoint", pretrained[1] / "last.pt", "--data", data,
                  f"--out_dir={tmp_path}", *EVAL_FAST, "--reader.loader=torchvision", "--reader.num_threads=0",
                  "--label_fraction=0.5", "--batch_size=4", "--epochs=1", "--device=cpu")
    assert_clean(res)


def test_export(pretrained, tmp_path):
    """The state_dict, safetensors and TorchScript (deprecated in torch: the command keeps that one
    warning to itself, since TorchScript is an option asked for by name)."""
    res = command("-m", "byol_fast.export", "--checkpoint", pretrained[1] / "last.pt", "--out",
                  tmp_path / "encoder.pt", "--safetensors", "--torchscript")
    assert_clean(res)
    assert (tmp_path / "encoder.torchscript.pt").is_file()


def test_export_onnx_and_torch_export(pretrained, tmp_path):
    res = command("-m", "byol_fast.export", "--checkpoint", pretrained[1] / "last.pt", "--out",
                  tmp_path / "encoder.pt", "--onnx", "--torch-export")
    assert_clean(res)
    assert (tmp_path / "encoder.onnx").is_file() and (tmp_path / "encoder.pt2").is_file()


def test_convert(tmp_path):
    """A file in yaox12/BYOL-PyTorch's released layout (DDP's ``module.`` prefix on a torchvision ResNet)."""
    backbone = {f"module.{k}": v for k, v in torchvision.models.resnet18().state_dict().items()
                if not k.startswith("fc.")}
    src = tmp_path / "resnet18_byol_imagenet2012.pth.tar"
    torch.save({"online_backbone": backbone, "target_backbone": backbone}, src)
    assert_clean(command("-m", "byol_fast.convert", src, "--out", tmp_path / "encoder.pt"))


def test_dense_probe(pretrained, tmp_path):
    seg = tmp_path / "seg"
    assert_clean(command("-m", "byol_fast.data", "demo-seg", seg, "--train-images", "6", "--val-images", "3",
                         "--size", "48"))
    assert_clean(command("-m", "byol_fast.dense_probe", "--checkpoint", pretrained[1] / "last.pt", "--data", seg,
                         "--epochs", "2", "--image-size", "32"))


def test_data_index_and_demo(data, tmp_path):
    assert_clean(command("-m", "byol_fast.data", "index", data / "val", "--workers", "2", "--no-cache"))
    assert_clean(command("-m", "byol_fast.data", "demo", tmp_path / "demo", "--num-classes", "2",
                         "--train-per-class", "2", "--val-per-class", "1"))
