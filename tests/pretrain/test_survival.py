"""Survival on CPU: kill -9 and resume ends bit for bit where an uninterrupted run ends (across a
resolution ramp's change of size), torchrun's elastic restart resumes by itself, N processes compute
what one process with N accumulation steps computes, and each user mistake stops with one line naming it."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CHILD_ENV, ROOT, TINY_RUN, ddp_env, pack_folder, write_noise_jpegs

from byol_fast import train

# 16 images, global batch 8: 2 steps per epoch, 4 epochs = 8 steps, a checkpoint at every epoch end.
RUN = TINY_RUN + ["--optim.batch_size=8", "--epochs=4", "--optim.warmup_epochs=1"]
# A resolution ramp: 16 px views in epochs 0-1, 32 px from epoch 2, so a run killed in epoch 2 resumes
# from the checkpoint of the last 16 px step into the first 32 px epoch.
RAMP = ["--data.start_image_size=16", "--data.ramp_start_epoch=1", "--data.ramp_end_epoch=2"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """16 small JPEGs in two class folders, and the same packed into tar shards beside them
    (``<images>-shards``, 3-4 images a shard)."""
    root = write_noise_jpegs(tmp_path_factory.mktemp("imgs"), 16, seed=1)
    pack_folder(root, shards_of(root), 20480)
    return root


PIXPRO = ["--model.loss=instance+pixpro", "--model.pixel_hidden=32", "--model.pixel_out=16"]


def shards_of(images: Path) -> Path:
    return Path(f"{images}-shards")


def train_cmd(images, out, launcher=(), loader="dali"):
    """loader: dali (the image folder), torchvision (the folder, PIL), shards (DALI, the tar shards), or
    pixpro (DALI, the folder, model.loss=instance+pixpro: the views' crop windows travel too)."""
    reader = ["--reader.loader=torchvision", "--reader.num_threads=0"] if loader == "torchvision" else []
    reader = (PIXPRO if loader == "pixpro" else reader) + RAMP
    data = shards_of(images) if loader == "shards" else images
    return [sys.executable, *launcher, *(["-m", "byol_fast.train"]), *RUN, *reader, f"--data.path={data}",
            f"--out_dir={out}"]


@pytest.fixture(scope="module")
def uninterrupted(images, tmp_path_factory):
    """weights(loader): the final weights of an uninterrupted run with that loader (run once each)."""
    done = {}

    def get(loader: str) -> dict[str, torch.Tensor]:
        if loader not in done:
            out = tmp_path_factory.mktemp(f"straight_{loader}")
            res = subprocess.run(train_cmd(images, out, loader=loader), env=CHILD_ENV, cwd=ROOT, capture_output=True,
                                 text=True, timeout=300)
            assert res.returncode == 0, res.stderr[-3000:]
            done[loader] = weights(out / "last.pt")
        return done[loader]

    return get


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def kill_when(proc: subprocess.Popen, marker: str | tuple[str, ...], pid_of=lambda line: None,
              sig=signal.SIGKILL) -> str:
    """Read the run's output until ``marker`` (every one of several) has appeared, then send ``sig``
    (kill -9) to the training process."""
    seen, pid, waiting = [], proc.pid, {marker} if isinstance(marker, str) else set(marker)
    for line in proc.stdout:
        seen.append(line)
        pid = pid_of(line) or pid
        waiting = {m for m in waiting if m not in line}
        if not waiting:
            os.kill(pid, sig)
            break
    else:
        raise AssertionError(f"{waiting} never appeared:\n{''.join(seen)[-3000:]}")
    return "".join(seen)


def weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)
    out = {f"{part}.{k}": v for part in ("online", "target", "predictor") for k, v in state[part].items()}
    for i, s in state["optimizer"]["state"].items():
        out.update({f"optimizer.{i}.{k}": v for k, v in s.items() if torch.is_tensor(v)})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["dali", "torchvision", "shards", "pixpro"])
def test_kill_9_then_resume_ends_bit_for_bit_like_an_uninterrupted_run(images, tmp_path, uninterrupted, loader):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(images, killed, loader=loader), env=CHILD_ENV, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    # Mid-epoch 3, once the checkpoint of step 4 (written in the background) is on disk.
    printed = kill_when(proc, ("last.pt at step 4", "step 5/8"))
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert torch.load(killed / "last.pt", weights_only=True)["step"] == 4, printed[-2000:]
    # A write cut short by the kill leaves only a temporary file, which resume ignores and removes.
    torn = killed / ".last.pt.99999.tmp"
    torn.write_bytes(b"PK\x03\x04 half a checkpoint")

    res = subprocess.run(train_cmd(images, killed, loader=loader), env=CHILD_ENV, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "at step 4" in res.stdout and not torn.exists()
    # Killed in the ramp's first 32 px epoch, after 16 px ones.
    assert "epoch 0: views of 16 px" in printed and "epoch 2: views of 32 px" in printed + res.stdout
    if loader == "pixpro":  # the progress line watches the pixel head's collapse too
        assert "pixel_std*sqrt(d) " in res.stdout and "pixpro -" in res.stdout
    assert_same_weights(uninterrupted(loader), weights(killed / "last.pt"))


# A training run whose second checkpoint write (the end of epoch 2, step 4) is cut short by kill -9
# once part of the file is on disk: the background writer's thread dies with the process mid-write.
KILLED_MID_WRITE = """
import os, signal, sys
from byol_fast import train
from byol_fast.weights import checkpoint
writes, real = [], checkpoint._write_file
def cut_short(obj, f):
    writes.append(1)
    if len(writes) == 2:
        f.write(b"PK\\x03\\x04 the first bytes of a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real(obj, f)
checkpoint._write_file = cut_short
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_during_a_background_checkpoint_write_keeps_the_previous_one(images, tmp_path, uninterrupted):
    out = tmp_path / "killed_mid_write"
    cmd = train_cmd(images, out)
    res = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, *cmd[3:]], env=CHILD_ENV, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stdout[-3000:] + res.stderr[-3000:]
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2  # the write of step 4 never landed
    assert [p.name for p in out.glob(".last.pt.*.tmp")], "the torn write left no temporary file"
    res = subprocess.run(cmd, env=CHILD_ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "at step 2" in res.stdout and not list(out.glob(".last.pt.*.tmp"))
    assert_same_weights(uninterrupted("dali"), weights(out / "last.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("sig, loader", [(signal.SIGTERM, "dali"), (signal.SIGUSR1, "torchvision"),
                                         (signal.SIGTERM, "shards"), (signal.SIGTERM, "pixpro")])
def test_preemption_signal_saves_exits_75_and_the_rerun_resumes(images, tmp_path, uninterrupted, sig, loader):
    out = tmp_path / "preempted"
    proc = subprocess.Popen(train_cmd(images, out, loader=loader), env=CHILD_ENV, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    printed = kill_when(proc, "step 3/8", sig=sig)  # mid-epoch: no checkpoint due at this step
    printed += proc.stdout.read()
    assert proc.wait(timeout=120) == 75, printed[-3000:]
    stopped = torch.load(out / "last.pt", weights_only=True)["step"]
    assert stopped >= 3 and f"stopped at step {stopped}" in printed
    res = subprocess.run(train_cmd(images, out, loader=loader), env=CHILD_ENV, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and f"at step {stopped}" in res.stdout, res.stdout[-3000:]
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 8
    # Saved where the signal stopped it (mid-epoch when the step is odd), resumed bit for bit.
    assert_same_weights(uninterrupted(loader), weights(out / "last.pt"))


@pytest.mark.slow
def test_torchrun_elastic_restart_resumes_from_the_checkpoint(images, tmp_path):
    out = tmp_path / "elastic"
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "--max-restarts=1"]
    proc = subprocess.Popen(train_cmd(images, out, launcher), env=CHILD_ENV, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

    def pid_of(line):
        return int(line.split("pid ")[1].split()[0]) if "rank 0 pid" in line else None

    # The worker dies in epoch 1, once the checkpoint of step 2 (written in the background) is on disk;
    # torchrun starts it again.
    printed = kill_when(proc, ("last.pt at step 2", "step 3/8"), pid_of)
    rest = proc.stdout.read()
    assert proc.wait(timeout=300) == 0, (printed + rest)[-3000:]
    assert "resumed from" in rest and "at step 2" in rest, rest[-3000:]
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 8


# ---------------------------------------------------------------------------- N processes = accumulation


def _config(accumulate: int):
    from byol_fast.config import load_config

    return load_config(None, TINY_RUN + [f"--optim.batch_size={GLOBAL}", f"--optim.accumulate={accumulate}",
                                         "--device=cpu"])


LR = 1.0  # LARS moves each weight by ~lr * eta = 1e-3 of its norm: well above float32 rounding
GLOBAL = 16  # images per step; 4 or more per micro-batch (batch norm over 2 values is ill-conditioned)


def _batches(steps: int = 1):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(GLOBAL, 3, 32, 32, generator=g), torch.randn(GLOBAL, 3, 32, 32, generator=g))
            for _ in range(steps)]


def _learner_state(learner) -> dict[str, torch.Tensor]:
    state = learner.state_dict()
    return {f"{part}.{k}": v.clone() for part in ("online", "target", "predictor") for k, v in state[part].items()
            if v.is_floating_point() and "running_" not in k}  # batch-norm statistics: per process


def _worker(rank: int, world: int, port: int, out: str):
    ddp_env(rank, world, port)
    torch.set_num_threads(1)
    from byol_fast.runtime import dist
    from byol_fast.pretrain.learner import Learner

    info = dist.setup(torch.device("cpu"))
    torch.manual_seed(0)
    learner = Learner(_config(1), torch.device("cpu"), info)
    part = GLOBAL // world
    for view1, view2 in _batches():  # each rank its slice of the global batch
        learner.step([(view1[rank * part:(rank + 1) * part], view2[rank * part:(rank + 1) * part])], LR, 0.99)
    if rank == 0:
        torch.save(_learner_state(learner), out)
    dist.teardown()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_n_processes_equal_one_process_with_n_accumulation_steps(world, tmp_path):
    """Batch-norm statistics are per micro-batch in both (per process in DDP without SyncBN), so the
    math is the same: averaged gradients, one LARS step, one EMA update. Running statistics differ
    (rank 0 only sees its own micro-batches) and are left out. The updates (not the weights, which a
    small step barely changes) are compared, over one step: several steps of BYOL amplify float
    rounding, as any chaotic system does."""
    import torch.multiprocessing as mp
    from byol_fast.runtime.dist import DistInfo
    from byol_fast.pretrain.learner import Learner

    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(world, 29500 + (os.getpid() + world) % 400, str(out)), nprocs=world)
    torch.manual_seed(0)
    learner = Learner(_config(world), torch.device("cpu"), DistInfo())
    init = _learner_state(learner)  # the workers start from the same seed (and DDP copies rank 0's)
    part = GLOBAL // world
    for view1, view2 in _batches():
        learner.step([(view1[i * part:(i + 1) * part], view2[i * part:(i + 1) * part]) for i in range(world)],
                     LR, 0.99)
    single, ddp = _learner_state(learner), torch.load(out)
    assert single.keys() == ddp.keys() == init.keys()
    # A Linear bias followed by batch norm has no gradient (the normalisation removes it): only
    # rounding noise moves it, in both runs alike.
    no_gradient = {k for k in single if k.endswith(("projector.0.bias", "predictor.0.bias"))}
    assert len(no_gradient) == 3  # online and target projector, predictor
    for k in single:
        step_single, step_ddp = single[k] - init[k], ddp[k] - init[k]
        if k in no_gradient:
            bound = 1e-5 * init[k].abs().max().item()
            assert step_single.abs().max() < bound and step_ddp.abs().max() < bound, k
            continue
        assert step_single.abs().max() > 1e-6 * init[k].abs().max(), k  # a real step (the target: 1% of one)
        # fp32 sums in another order, through batch norm over 4 images: within 1% of the step
        torch.testing.assert_close(step_ddp, step_single, rtol=1e-2, atol=1e-2 * step_single.abs().max().item())


# ---------------------------------------------------------------------------- user mistakes


def test_each_mistake_stops_with_one_line_naming_it(images, tmp_path, capsys):
    def error(*args) -> str:
        assert train.main(TINY_RUN + list(args)) == 2
        err = capsys.readouterr().err.strip()
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and err.endswith(errors[0]), err  # one line, the last (progress may precede it)
        return errors[0]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in error(f"--data.path={empty}", f"--out_dir={tmp_path / 'a'}")
    assert "/missing/folder" in error("--data.path=/missing/folder", f"--out_dir={tmp_path / 'a'}")

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "last.pt").write_bytes(b"not a checkpoint")
    assert str(bad / "last.pt") in error(f"--data.path={images}", f"--out_dir={bad}", "--optim.batch_size=8")

    assert "optim.batch_size" in error(f"--data.path={images}", "--optim.batch_size=6", "--optim.accumulate=4")
    assert "data.view1.blur_p" in error("--data.view1.blur_p=often")
    assert "precision" in error("--precision=fp8")
    if not torch.cuda.is_available():
        assert "cuda" in error(f"--data.path={images}", "--device=cuda")
