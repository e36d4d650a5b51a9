"""The launch plan for N GPUs: one process, one node, many nodes, SLURM."""
import pytest

from byol_fast.launch import LaunchError, plan

ARGS = ["--config", "c.yaml"]


def test_single_process_without_gpus():
    assert plan(0, ARGS, "py", env={}, gpus_here=0) == ["py", "-m", "byol_fast.train", *ARGS]


def test_one_node_uses_standalone_torchrun():
    cmd = plan(8, ARGS, "py", env={}, gpus_here=8)
    assert cmd[:3] == ["py", "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc_per_node=8" in cmd


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
