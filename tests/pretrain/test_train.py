"""End to end on CPU: a tiny network pretrains a few steps, checkpoints, and resumes at the next step."""
import subprocess
import sys

import pytest
import torch
from conftest import CHILD_ENV, ROOT, TINY_RUN, write_noise_jpegs
from PIL import Image

from byol_fast import train

TINY = TINY_RUN + ["--epochs=4"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """16 small JPEGs in two class folders."""
    return write_noise_jpegs(tmp_path_factory.mktemp("imgs"), 16, seed=0)


def run(args):
    return train.main(args)


def test_pretrain_checkpoint_and_resume(images, tmp_path, capsys):
    out = tmp_path / "run"
    args = TINY + [f"--data.path={images}", f"--out_dir={out}", "--optim.batch_size=8"]
    assert run(args + ["--max_steps=3"]) == 0
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 3
    assert (out / "config.yaml").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in out.iterdir())
    printed = capsys.readouterr().out
    assert "resolved config" in printed and "img/s" in printed and "tau" in printed

    assert run(args + ["--max_steps=5"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "at step 3" in printed
    assert "step 4/" in printed and "step 3/" not in printed.split("resumed from")[1]
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 5


def test_errors_are_one_line_and_name_the_problem(images, tmp_path, capsys):
    assert run(TINY + [f"--data.path={images}", "--optim.batch_size=7", "--optim.accumulate=2",
                       f"--out_dir={tmp_path}"]) == 2
    assert "optim.batch_size" in capsys.readouterr().err
    assert run(TINY + ["--data.path=/no/such/folder", f"--out_dir={tmp_path}"]) == 2
    assert "/no/such/folder" in capsys.readouterr().err
    assert run(["--optim.lrr=3"]) == 2
    assert "optim.lrr" in capsys.readouterr().err


def test_checkpoint_from_other_architecture_is_refused(images, tmp_path, capsys):
    out = tmp_path / "run"
    args = [f"--data.path={images}", f"--out_dir={out}", "--optim.batch_size=8", "--max_steps=1"]
    assert run(TINY + args) == 0
    capsys.readouterr()
    assert run(TINY + args + ["--model.projector_out=8"]) == 2
    assert "different model" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_gloo_run(images, tmp_path):
    """torchrun with 2 CPU processes: both take the same steps and rank 0 saves."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "byol_fast.train", *TINY, f"--data.path={images}", f"--out_dir={out}",
           "--optim.batch_size=8", "--max_steps=2"]
    res = subprocess.run(cmd, cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "2 process(es)" in res.stdout
    assert "4/process x 2" in res.stdout
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2


def test_knn_monitor_runs_at_epoch_ends_and_needs_a_val_split(tmp_path, capsys):
    g = torch.Generator().manual_seed(2)
    for split, n in (("train", 8), ("val", 4)):
        for label in range(2):
            folder = tmp_path / "data" / split / f"c{label}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = (80 + 120 * label + 30 * torch.randn(40, 48, 3, generator=g)).clamp(0, 255)
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"{i}.jpg", quality=90)
    args = TINY + [f"--data.path={tmp_path / 'data' / 'train'}", f"--out_dir={tmp_path / 'run'}",
                   "--optim.batch_size=8", "--max_steps=4", "--monitor.knn_every=1", "--monitor.knn_k=3"]
    assert run(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("knn")]
    assert len(lines) == 2, lines  # steps/epoch = 2: after epochs 1 and 2
    top1 = float(lines[-1].split("top1 ")[1].split()[0])
    assert (top1 * 8 / 100) == pytest.approx(round(top1 * 8 / 100), abs=1e-3)  # hits among exactly the 8 val images
    assert run(args + [f"--monitor.val_path={tmp_path / 'nowhere'}"]) == 2
    assert "monitor.val_path" in capsys.readouterr().err


@pytest.mark.parametrize("loader", ["dali", "torchvision"])
def test_online_probe_trains_on_labels_and_resumes(images, tmp_path, capsys, loader):
    out = tmp_path / "run"
    args = TINY + [f"--data.path={images}", f"--out_dir={out}", "--optim.batch_size=8", "--monitor.probe=true",
                   f"--reader.loader={loader}", "--reader.num_threads=0" if loader == "torchvision" else "--log_every=1"]
    assert run(args + ["--max_steps=2"]) == 0
    printed = capsys.readouterr().out
    top1 = [float(line.split("probe_top1 ")[1].split()[0]) for line in printed.splitlines() if "probe_top1" in line]
    # log_every=1: each figure is one step of 8 images, so a whole number of eighths
    assert len(top1) == 2 and all(t * 8 / 100 == pytest.approx(round(t * 8 / 100), abs=1e-3) for t in top1)
    probe = torch.load(out / "last.pt", weights_only=True)["probe"]
    assert probe["head"]["weight"].shape == (2, 512)  # two classes, ResNet-18 features
    assert run(args + ["--max_steps=3"]) == 0
    assert "at step 2" in capsys.readouterr().out
    moved = torch.load(out / "last.pt", weights_only=True)["probe"]["head"]["weight"]
    assert not torch.equal(moved, probe["head"]["weight"])


def test_online_probe_needs_class_folders(tmp_path, capsys):
    flat = tmp_path / "flat"
    for i, path in enumerate(write_noise_jpegs(tmp_path / "src", 8).rglob("*.jpg")):
        flat.mkdir(exist_ok=True)
        path.rename(flat / f"{i}.jpg")
    assert run(TINY + [f"--data.path={flat}", f"--out_dir={tmp_path / 'o'}", "--optim.batch_size=4",
                       "--monitor.probe=true"]) == 2
    assert "monitor.probe" in capsys.readouterr().err


@pytest.mark.slow
def test_diverged_run_stops_at_a_check_and_its_checkpoints_hold_the_weights_from_before(images, tmp_path, capsys,
                                                                                       monkeypatch):
    """NaN inputs make every step non-finite: each is skipped (counted on the device, weights untouched),
    and the first check (log point or save) after max_nonfinite_steps in a row ends the run with a
    one-line error. 2 steps per epoch here: checks at steps 4 (2 in a row) and 6 (4 in a row)."""
    out = tmp_path / "run"
    args = TINY + [f"--data.path={images}", f"--out_dir={out}", "--optim.batch_size=8"]
    assert run(args + ["--max_steps=2"]) == 0
    saved = torch.load(out / "last.pt", weights_only=True)
    capsys.readouterr()

    original = train.Learner.step
    monkeypatch.setattr(train.Learner, "step", lambda self, micro, lr, tau: original(
        self, [(v1 * float("nan"), v2) for v1, v2 in micro], lr, tau))
    assert run(args + ["--max_steps=8", "--max_nonfinite_steps=3", "--log_every=10"]) == 2
    captured = capsys.readouterr()
    assert "step 4: 2 step(s) with non-finite loss or gradients skipped" in captured.out
    assert "training diverged" in captured.err and "4 non-finite steps in a row before step 6" in captured.err
    after = torch.load(out / "last.pt", weights_only=True)
    assert after["step"] == 4  # saved at the end of epoch 1, when 2 in a row were still allowed
    for part in ("online", "target", "predictor"):
        for k, v in saved[part].items():
            assert torch.equal(after[part][k], v), (part, k)
