"""Settings derived from a config and the machine: device, precision, where DALI decodes, the batch
each process takes, and moving a batch onto the device. None of them is written back into the config."""
from __future__ import annotations

import torch

from byol_fast.config import ReaderConfig
from byol_fast.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``device`` of a config (auto | cuda | cpu) -> the device type this run uses."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but no CUDA GPU is visible (use --device=cpu or auto)")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``precision`` of a config -> the autocast dtype: bf16 where the GPU supports it, else fp16
    (with a GradScaler); fp32 on the CPU."""
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return torch.float32
    if precision in ("bf16", "fp16") and device.type == "cpu":
        raise ConfigError(f"precision: {precision!r} mixed precision needs a CUDA GPU (use fp32 or auto on the CPU)")
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def decode_device(reader: ReaderConfig, device: torch.device) -> str:
    """Where DALI decodes and augments: ``reader.decode``, with auto = gpu on a CUDA device, else cpu."""
    where = ("gpu" if device.type == "cuda" else "cpu") if reader.decode == "auto" else reader.decode
    if where == "gpu" and device.type != "cuda":
        raise ConfigError("reader.decode: 'gpu' needs a run on a CUDA GPU")
    return where


def per_process_batch(batch_size: int, world_size: int, accumulate: int = 1, key: str = "batch_size") -> int:
    """Images of one forward pass in one process: batch / (world size x accumulation steps)."""
    parts = world_size * accumulate
    if accumulate < 1 or batch_size % parts:
        raise ConfigError(f"{key}: {batch_size} does not divide into {world_size} processes "
                          f"x {accumulate} accumulation steps")
    return batch_size // parts


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A batch of images (N, 3, H, W) on the training device in its memory format (a no-op for
    DALI's GPU output, which is already there and channels_last)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(device, non_blocking=True, memory_format=fmt)
