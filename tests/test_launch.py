"""The launch plan for N GPUs: one process, one node, many nodes, SLURM."""
import os
import shlex
import shutil
import subprocess

import pytest
from conftest import ROOT

from byol_fast.launch import LaunchError, main, plan

ARGS = ["--config", "c.yaml"]


def test_single_process_without_gpus():
    assert plan(0, ARGS, "py", env={}, gpus_here=0) == ["py", "-m", "byol_fast.train", *ARGS]


def test_one_node_uses_standalone_torchrun():
    cmd = plan(8, ARGS, "py", env={}, gpus_here=8)
    assert cmd[:5] == ["env", "OMP_NUM_THREADS=1", "py", "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc_per_node=8" in cmd


def test_a_thread_count_set_by_the_user_is_kept():
    cmd = plan(8, ARGS, "py", env={"OMP_NUM_THREADS": "4"}, gpus_here=8)
    assert cmd[:3] == ["py", "-m", "torch.distributed.run"]
    assert plan(1, ARGS, "py", env={}, gpus_here=8)[0] == "py"  # one process: torchrun is not used


def test_more_gpus_than_this_node_asks_for_nodes():
    with pytest.raises(LaunchError, match="NNODES=4 NODE_RANK"):
        plan(32, ARGS, "py", env={}, gpus_here=8)
    with pytest.raises(LaunchError, match="this machine has 4 GPUs"):
        plan(6, ARGS, "py", env={"GPUS_PER_NODE": "8"}, gpus_here=4)


def test_many_nodes_with_rendezvous_variables():
    env = {"NNODES": "4", "NODE_RANK": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "1234"}
    cmd = plan(32, ARGS, "py", env=env, gpus_here=8)
    for flag in ("--nnodes=4", "--node_rank=2", "--nproc_per_node=8", "--master_addr=node0", "--master_port=1234"):
        assert flag in cmd
    with pytest.raises(LaunchError, match="NNODES=3"):
        plan(32, ARGS, "py", env={**env, "NNODES": "3"}, gpus_here=8)
    with pytest.raises(LaunchError, match="whole number of nodes"):
        plan(12, ARGS, "py", env=env, gpus_here=8)


def test_slurm_allocation_uses_srun_one_task_per_gpu():
    cmd = plan(32, ARGS, "py", env={"SLURM_JOB_ID": "7", "GPUS_PER_NODE": "8"}, gpus_here=0)
    assert cmd[0] == "srun" and "--ntasks=32" in cmd and "--ntasks-per-node=8" in cmd
    assert cmd[-4:] == ["-m", "byol_fast.train", *ARGS]


def test_max_restarts_passed_to_torchrun():
    assert "--max-restarts=3" in plan(2, ARGS, "py", env={}, gpus_here=2, max_restarts=3)


# Linear evaluation goes through the same plan: the same shapes, byol_fast.linear_eval as the module.
RDZV = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node0"}
LINEAR = ["-m", "byol_fast.linear_eval", *ARGS]


def test_linear_eval_single_process():
    assert plan(0, ARGS, "py", env={}, gpus_here=0, entry="linear_eval") == ["py", *LINEAR]
    assert plan(1, ARGS, "py", env={}, gpus_here=1, entry="linear_eval") == ["py", *LINEAR]


def test_linear_eval_one_node_uses_standalone_torchrun():
    assert plan(8, ARGS, "py", env={}, gpus_here=8, entry="linear_eval") == [
        "env", "OMP_NUM_THREADS=1", "py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8", *LINEAR]


def test_linear_eval_many_nodes_with_rendezvous_variables():
    assert plan(16, ARGS, "py", env=RDZV, gpus_here=8, entry="linear_eval") == [
        "env", "OMP_NUM_THREADS=1", "py", "-m", "torch.distributed.run", "--nnodes=2", "--node_rank=1", "--nproc_per_node=8",
        "--master_addr=node0", "--master_port=29500", *LINEAR]
    with pytest.raises(LaunchError, match="linear evaluation on GPUS=16 needs 2 nodes.*NNODES=2 NODE_RANK"):
        plan(16, ARGS, "py", env={}, gpus_here=8, entry="linear_eval")


def test_linear_eval_slurm_allocation_uses_srun_one_task_per_gpu():
    assert plan(32, ARGS, "py", env={"SLURM_JOB_ID": "7", "GPUS_PER_NODE": "8"}, gpus_here=0,
                entry="linear_eval") == ["srun", "--ntasks=32", "--ntasks-per-node=8", "--kill-on-bad-exit=1",
                                         "py", *LINEAR]


@pytest.mark.parametrize("gpus,env,gpus_here", [
    (0, {}, 0), (2, {}, 2), (16, RDZV, 8), (32, {"SLURM_JOB_ID": "7", "GPUS_PER_NODE": "8"}, 0)])
def test_linear_eval_launches_exactly_like_train(gpus, env, gpus_here):
    train = plan(gpus, ARGS, "py", env=env, gpus_here=gpus_here, max_restarts=2)
    linear = plan(gpus, ARGS, "py", env=env, gpus_here=gpus_here, max_restarts=2, entry="linear_eval")
    assert "byol_fast.train" in train
    assert linear == ["byol_fast.linear_eval" if a == "byol_fast.train" else a for a in train]


def test_unknown_entry_is_refused():
    with pytest.raises(LaunchError, match="not one of train, linear_eval"):
        plan(0, ARGS, "py", env={}, gpus_here=0, entry="benchmark")


def test_main_prints_the_entry_command(capsys, monkeypatch):
    monkeypatch.setattr("byol_fast.launch.gpus_on_this_machine", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert main(["--gpus", "2", "--python", "py", "--entry", "linear_eval", "--print", "--", *ARGS]) == 0
    assert capsys.readouterr().out.split() == [
        "env", "OMP_NUM_THREADS=1", "py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *LINEAR]
    assert main(["--gpus", "2", "--python", "py", "--print", "--", *ARGS]) == 0
    assert capsys.readouterr().out.split()[-4:] == ["-m", "byol_fast.train", *ARGS]


# `make -n TARGET ...` prints the exact launch command (byol_fast.launch --print, run by make itself).
# A bare environment, so that the caller's ARGS, SLURM_JOB_ID, MAKEFLAGS, ... do not leak in;
# GPUS_PER_NODE=8 so that the node size does not depend on this machine's GPUs.

MAKE_ENV = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
MULTI_NODE = ["GPUS=16", "NNODES=2", "NODE_RANK=1", "MASTER_ADDR=node0", "GPUS_PER_NODE=8"]


def make_n(*args):
    out = subprocess.run(["make", "-n", *args], cwd=ROOT, env=MAKE_ENV, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    launch = [line for line in out.stdout.splitlines()
              if any(f"-m byol_fast.{m} " in line for m in ("launch", "train", "linear_eval"))]
    assert len(launch) == 1, out.stdout
    return shlex.split(launch[0])


RENDEZVOUS = ["-m", "torch.distributed.run", "--nnodes=2", "--node_rank=1", "--nproc_per_node=8",
              "--master_addr=node0", "--master_port=29500"]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_n_linear_eval_prints_the_multi_node_command():
    cmd = make_n("linear-eval", *MULTI_NODE, "CHECKPOINT=x.pt", "DATA=/d")
    assert cmd[:2] == ["env", "OMP_NUM_THREADS=1"] and cmd[3:] == [*RENDEZVOUS, "-m", "byol_fast.linear_eval",
                       "--config", "config/linear_demo.yaml", "--checkpoint", "x.pt", "--data", "/d"]
    assert make_n("linear-eval", "GPUS=0")[1:] == [
        "-m", "byol_fast.linear_eval", "--config", "config/linear_demo.yaml", "--checkpoint", "runs/demo/last.pt"]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_n_pretrain_prints_the_multi_node_command():
    assert make_n("pretrain", *MULTI_NODE, "DATA=/d")[3:] == [
        *RENDEZVOUS, "-m", "byol_fast.train", "--config", "config/demo.yaml", "--data.path=/d/train"]
