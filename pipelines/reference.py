"""The BYOL recipe with torchvision transforms on PIL images: the baseline loader and the test oracle.

Same knobs as the DALI graph (:mod:`pipelines.pretrain`), applied the way the PyTorch ports of BYOL
do: ``RandomResizedCrop(bicubic) -> flip -> RandomApply(ColorJitter) -> RandomGrayscale ->
RandomApply(GaussianBlur) -> RandomSolarize (uint8) -> ToTensor -> Normalize``.

Each sample's randomness is seeded from (seed, epoch, index), so a batch does not depend on the
number of workers or on which worker made it.
"""
from __future__ import annotations

import torch
import torch.utils.data
from PIL import Image
from torchvision import transforms as T

from byol_fast.config import DataConfig, ViewConfig
from pipelines.loader import steps_per_epoch

INTERP = {"cubic": T.InterpolationMode.BICUBIC, "linear": T.InterpolationMode.BILINEAR}


def view_transform(view: ViewConfig, data: DataConfig) -> T.Compose:
    """PIL RGB image -> float32 (3, image_size, image_size) tensor, one view of the recipe."""
    return T.Compose(
        [
            T.RandomResizedCrop(data.image_size, scale=view.crop_area, ratio=view.crop_aspect, interpolation=INTERP[data.interp]),
            T.RandomHorizontalFlip(view.flip_p),
            T.RandomApply([T.ColorJitter(view.brightness, view.contrast, view.saturation, view.hue)], p=view.jitter_p),
            T.RandomGrayscale(view.grayscale_p),
            T.RandomApply([T.GaussianBlur(view.blur_kernel, sigma=view.blur_sigma)], p=view.blur_p),
            # On the PIL image (uint8), as the DALI graph does; threshold on the [0, 255] scale.
            T.RandomSolarize(255.0 * view.solarize_threshold, p=view.solarize_p),
            T.ToTensor(),
            T.Normalize(data.mean, data.std),
        ]
    )


class TwoViewTransform:
    """PIL image -> (view1, view2), each float32 (3, image_size, image_size), normalised."""

    def __init__(self, data: DataConfig):
        self.view1 = view_transform(data.view1, data)
        self.view2 = view_transform(data.view2, data)

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view1(img), self.view2(img)


class _TwoViewFiles(torch.utils.data.Dataset):
    """files[i] -> (view1, view2), with torch's RNG seeded by (seed, epoch, i) for this sample only."""

    def __init__(self, files: list[str], transform: TwoViewTransform, seed: int, labels=None):
        self.files, self.transform, self.seed, self.labels = list(files), transform, seed, labels
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        with Image.open(self.files[i]) as f:
            img = f.convert("RGB")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFF_FFFF_FFFF_FFFF)
            views = self.transform(img)
        return views if self.labels is None else (*views, self.labels[i])


class TorchvisionTwoViewLoader:
    """The PIL/torchvision baseline with the DALI loader's interface: ``steps_per_epoch`` pairs per epoch.

    Sharded like DistributedSampler (a permutation per epoch seeded by seed + epoch, the same on every
    rank; rank r takes every world_size-th index), batches of batch_size per rank, view tensors
    float32 (N, 3, H, W) on the CPU (contiguous NCHW).
    """

    def __init__(self, files, data: DataConfig, batch_size: int, workers: int, rank: int, world_size: int, seed: int,
                 labels=None):
        self.steps_per_epoch = steps_per_epoch(len(files), batch_size, world_size)
        self.dataset = _TwoViewFiles(files, TwoViewTransform(data), seed, labels)
        self.sampler = torch.utils.data.DistributedSampler(
            self.dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=workers,
            drop_last=True,
            persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None,
        )
        self.epoch = 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self):
        self.sampler.set_epoch(self.epoch)
        self.dataset.epoch = self.epoch  # copied into the workers when they start, once per epoch
        # DistributedSampler(drop_last) + DataLoader(drop_last) give floor(floor(N/W)/B) = floor(N/(WB))
        # batches: exactly steps_per_epoch.
        for batch in self.loader:
            yield tuple(batch)
        self.epoch += 1
