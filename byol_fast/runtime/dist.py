"""Process-group setup and model wrapping.

Rank, world size and local rank come from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or, when
started by ``srun`` without torchrun, from SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID).
A single process is a world of one through the same code. NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import datetime
import inspect
import os
import subprocess
from dataclasses import dataclass

import torch
# Imported before any process group is made, on purpose. Imported after one exists (torch.optim's
# first step imports it), dynamo keeps the default group alive past destroy_process_group; gloo's
# worker threads then free the last collective's tensors while the interpreter shuts down, and the
# process dies of SIGABRT at exit ("terminate called without an active exception").
import torch._dynamo  # noqa: F401
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info(env=os.environ) -> DistInfo:
    """Read the launcher's variables; torchrun's win over SLURM's."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistInfo()


def _slurm_master(env=os.environ) -> None:
    """Under a bare ``srun``, point MASTER_ADDR at the allocation's first node."""
    if "MASTER_ADDR" not in env and "SLURM_JOB_NODELIST" in env:
        try:
            hosts = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]],
                                   capture_output=True, text=True, check=True).stdout.split()
            env["MASTER_ADDR"] = hosts[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            env["MASTER_ADDR"] = "127.0.0.1"
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")


def setup(device: torch.device) -> DistInfo:
    """Join the process group (if the world has more than one process) and pick the GPU."""
    info = env_info()
    if device.type == "cuda":
        torch.cuda.set_device(info.local_rank)
    if info.world_size > 1 and not dist.is_initialized():
        _slurm_master()
        os.environ.setdefault("RANK", str(info.rank))
        os.environ.setdefault("WORLD_SIZE", str(info.world_size))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                device_id=torch.device("cuda", info.local_rank) if device.type == "cuda" else None)
    return info


def local_device(device: torch.device, info: DistInfo) -> torch.device:
    """This process's GPU (its local rank) or the CPU."""
    return torch.device("cuda", info.local_rank) if device.type == "cuda" else device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# The DDP argument that turns off syncing buffers at every forward.
_BUFFER_SYNC_FLAG = ("forward_sync_buffers"
                     if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                     else "broadcast_buffers")


def wrap(model: nn.Module, device: torch.device, info: DistInfo, sync_bn: bool, channels_last: bool) -> nn.Module:
    """SyncBatchNorm (CUDA only) -> device and memory format -> DDP (mixed precision is autocast in the step).

    The order matters (yaox12/BYOL-PyTorch does the same): SyncBN conversion must see the plain BatchNorm modules, and
    DDP must wrap the final module on its device.
    """
    if sync_bn and device.type == "cuda" and info.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if info.world_size > 1:
        ids = [info.local_rank] if device.type == "cuda" else None
        # With synchronised BN every rank's running statistics are already equal: no buffer sync per
        # forward. (torch renamed the flag; the old name still works on older releases and warns on newer.)
        sync = {_BUFFER_SYNC_FLAG: not sync_bn}
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True, **sync)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP and torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def main_first(main, others, errors: tuple[type[Exception], ...] = (ValueError,)):
    """``main()`` on rank 0, then ``others()`` on every other rank once rank 0 is done (work that rank 0
    does once for all, such as checking a dataset, which the others then read). An error of ``errors``
    on rank 0 is raised on every rank, so that no rank waits at a collective for one that stopped."""
    if not dist.is_initialized():
        return main()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = main()
        except errors as e:
            error = e
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise box[0]
    return result if dist.get_rank() == 0 else others()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def gather_rows(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's rows of x (Q_r, D) and y (Q_r,), concatenated in rank order on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x, y
    xs, ys, valid = gather_padded(x, y)
    return xs[valid], ys[valid]


def gather_padded(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All ranks' rows of x (Q_r, D) and y (Q_r,), each padded to the largest Q_r: (X, Y, valid mask)."""
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]  # host sync: once per call
    m = max(sizes)
    xs = [torch.empty(m, x.shape[1], dtype=x.dtype, device=x.device) for _ in range(world)]
    ys = [torch.empty(m, dtype=y.dtype, device=y.device) for _ in range(world)]
    dist.all_gather(xs, torch.cat([x, x.new_zeros(m - x.shape[0], x.shape[1])]))
    dist.all_gather(ys, torch.cat([y, y.new_zeros(m - y.shape[0])]))
    valid = torch.cat([torch.arange(m, device=x.device) < s for s in sizes])
    return torch.cat(xs), torch.cat(ys), valid
