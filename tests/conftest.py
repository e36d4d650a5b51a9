import collections
import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    # make test runs the files in two processes, each file whole in one of them: the files with the
    # most tests marked slow start first, so that the last minutes do not wait on one long file (a
    # stable sort: each file's tests keep their order).
    slow = collections.Counter(item.path for item in items if "slow" in item.keywords)
    items.sort(key=lambda item: -slow[item.path])
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def write_noise_jpegs(root: Path, count: int = 16, seed: int = 0) -> Path:
    """``count`` small random-noise JPEGs (40x48) alternating between class folders c0 and c1."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        folder = root / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def pack_folder(images: Path, out: Path, shard_bytes: int) -> Path:
    """An image folder packed into tar shards at ``out`` (byol_fast.datasets.shard_pack, seed 0); returns ``out``."""
    from byol_fast.datasets.index import build_index
    from byol_fast.datasets.shard_pack import pack

    pack(build_index(images, workers=1, cache=False, progress=False), out, shard_bytes=shard_bytes, seed=0,
         progress=False)
    return out


from byol_fast.config import ModelConfig, ReaderConfig, ViewConfig  # noqa: E402

# The small network of the CPU tests, as a ModelConfig and as command-line overrides.
SMALL = ModelConfig(backbone="resnet18", projector_hidden=32, projector_out=16, predictor_hidden=32)
TINY_MODEL = [f"--model.{k}={v}" for k, v in dataclasses.asdict(SMALL).items()]
# A pretraining run of it that takes seconds on the CPU: 32-pixel views, small blur windows, every step logged.
TINY_RUN = TINY_MODEL + ["--data.image_size=32", "--reader.num_threads=1", "--data.view1.blur_kernel=3",
                         "--data.view2.blur_kernel=3", "--log_every=1"]
# Environment of a byol_fast child process (python -m byol_fast.train, torchrun): one thread, this checkout.
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def ddp_env(rank: int, world: int, port: int) -> None:
    """The variables torchrun sets, for a worker started by torch.multiprocessing.spawn on this host
    (gloo on the CPU): call it first thing in the worker, before byol_fast.runtime.dist.setup."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


# Shared by the pipeline and augmentation-statistics tests.

READER = ReaderConfig(num_threads=2)  # two DALI threads: the CI machine's cores
IDENTITY = ViewConfig(crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
                      blur_p=0.0, solarize_p=0.0)  # a view that returns the (normalised) image unchanged


def save(path, array) -> str:
    """Write a uint8 HWC array as an image file (format from the suffix); return the path as str."""
    from PIL import Image

    Image.fromarray(array).save(path)
    return str(path)


def smooth_texture(rng, h, w):
    """A colourful uint8 (h, w, 3) image, smooth like a photo (upsampled noise), covering most of [0, 255]."""
    import numpy as np
    from PIL import Image

    small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))
