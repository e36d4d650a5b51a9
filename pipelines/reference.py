"""The recipes with torchvision transforms on PIL images: the baseline loaders and the tests' oracle.

Same knobs as the DALI graphs, applied the way the PyTorch ports of BYOL do:

- two views (``pipelines.pretrain``'s recipe): ``RandomResizedCrop(bicubic) -> flip ->
  RandomApply(ColorJitter) -> RandomGrayscale -> RandomApply(GaussianBlur) -> RandomSolarize (uint8)
  -> ToTensor -> Normalize``;
- evaluation (``pipelines.evaluation``'s): random resized crop + flip for training, resize + center
  crop for validation.

Both loaders follow the loader contract (``pipelines.contract``). Each sample's randomness is seeded
from (seed, epoch, file index), so a batch depends only on which files it holds: not on the number
of workers, not on which worker made it, and a resumed epoch gives the same batches.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.utils.data
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from byol_fast.config import DataConfig, LinearDataConfig, ViewConfig
from pipelines.contract import EpochLoader, Shard

INTERP = {"cubic": T.InterpolationMode.BICUBIC, "linear": T.InterpolationMode.BILINEAR}


def view_transform(view: ViewConfig, data: DataConfig) -> T.Compose:
    """PIL RGB image -> float32 (3, image_size, image_size) tensor, one view of the recipe (its first
    two steps, the random resized crop and the flip, are what :class:`WindowedView` reports)."""
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


class WindowedView:
    """One view of the recipe that also says where its crop came from: PIL image -> (view, window),
    window float32 (5,) = x0, y0, x1, y1 in the image's pixels and the flip (0/1), as the DALI graph
    reports it. The crop and the flip draw from torch's generator exactly as RandomResizedCrop and
    RandomHorizontalFlip do, so the view is the one ``view_transform`` gives for the same seed."""

    def __init__(self, view: ViewConfig, data: DataConfig):
        whole = view_transform(view, data)
        self.crop, self.flip_p, self.rest = whole.transforms[0], view.flip_p, T.Compose(whole.transforms[2:])

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.crop
        top, left, h, w = c.get_params(img, c.scale, c.ratio)
        img = TF.resized_crop(img, top, left, h, w, c.size, c.interpolation, antialias=c.antialias)
        flip = bool(torch.rand(1) < self.flip_p)
        if flip:
            img = TF.hflip(img)
        return self.rest(img), torch.tensor([left, top, left + w, top + h, float(flip)], dtype=torch.float32)


class TwoViewTransform:
    """PIL image -> (view1, view2), each float32 (3, image_size, image_size), normalised; with
    ``windows``, (view1, view2, window1, window2) (:class:`WindowedView`)."""

    def __init__(self, data: DataConfig, windows: bool = False):
        self.windows = windows
        self.view1, self.view2 = WindowedView(data.view1, data), WindowedView(data.view2, data)

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, ...]:
        (v1, w1), (v2, w2) = self.view1(img), self.view2(img)
        return (v1, v2, w1, w2) if self.windows else (v1, v2)


def eval_transform(data: LinearDataConfig, train: bool) -> T.Compose:
    """PIL image -> normalised float32 (3, S, S): the linear-evaluation protocol's crops."""
    if train:
        geometry = [T.RandomResizedCrop(data.image_size, scale=data.crop_area, interpolation=INTERP[data.interp]),
                    T.RandomHorizontalFlip()]
    else:
        geometry = [T.Resize(data.resize, interpolation=INTERP[data.interp]), T.CenterCrop(data.image_size)]
    return T.Compose(geometry + [T.ToTensor(), T.Normalize(data.mean, data.std)])


class _Samples(torch.utils.data.Dataset):
    """files[order[j]] -> the transform's tensors (and its label), with torch's RNG seeded by
    (seed, epoch, file index) for this sample only."""

    def __init__(self, files, labels, order, transform, seed: int, epoch: int):
        self.files, self.labels, self.order, self.transform = files, labels, order, transform
        self.seed, self.epoch = seed, epoch

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, j: int):
        i = self.order[j]
        with Image.open(self.files[i]) as f:
            img = f.convert("RGB")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFF_FFFF_FFFF_FFFF)
            out = self.transform(img)
        out = out if isinstance(out, tuple) else (out,)
        return out if self.labels is None else (*out, self.labels[i])


class _PilLoader(EpochLoader):
    """A DataLoader over the rank's files of each epoch (``rank_files``), ``workers`` processes."""

    def __init__(self, files, labels, transform, batch_size: int, shard: Shard, seed: int, train: bool,
                 workers: int, image_size: int):
        super().__init__(len(files), batch_size, shard, seed, train)
        self.files, self.labels, self.transform = list(files), None if labels is None else list(labels), transform
        self.workers, self.image_size = workers, image_size

    def transform_of(self, epoch: int):
        """The transform of ``epoch``'s samples."""
        return self.transform

    def _batches(self, epoch: int, step: int):
        order = self.files_of(epoch)[step * self.batch_size:]
        dataset = _Samples(self.files, self.labels, order, self.transform_of(epoch), self.seed, epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, shuffle=False, drop_last=False,
                                             num_workers=self.workers, persistent_workers=False,
                                             prefetch_factor=4 if self.workers > 0 else None)
        done = step
        for batch in loader:
            done += 1
            yield tuple(batch)
        for _ in range(done, self.steps_per_epoch):  # evaluation: a rank whose block ran out
            yield torch.zeros(0, 3, self.image_size, self.image_size), torch.zeros(0, dtype=torch.int64)


class TorchvisionTwoViewLoader(_PilLoader):
    """The PIL/torchvision baseline of ``pipelines.loader.DaliTwoViewLoader``: batches (view1, view2
    [, window1, window2][, labels]) of float32 (N, 3, H, W) (windows (N, 5)) on the CPU (contiguous
    NCHW), ``workers`` DataLoader processes."""

    def __init__(self, files, data: DataConfig, batch_size: int, workers: int, shard: Shard, seed: int, labels=None,
                 windows: bool = False):
        super().__init__(files, labels, TwoViewTransform(data, windows), batch_size, shard, seed, True, workers,
                         data.image_size)
        self.data, self.windows = data, windows

    def transform_of(self, epoch: int):
        """The two views at the epoch's side (``DataConfig.size_at``: the resolution ramp)."""
        size = self.data.size_at(epoch)
        if size == self.data.image_size:
            return self.transform
        return TwoViewTransform(dataclasses.replace(self.data, image_size=size), self.windows)


class TorchvisionEvalLoader(_PilLoader):
    """The PIL/torchvision baseline of ``pipelines.loader.DaliEvalLoader``: batches (images float32
    (N, 3, S, S), labels int64 (N,)) on the CPU."""

    def __init__(self, files, labels, train: bool, data: LinearDataConfig, batch_size: int, workers: int,
                 shard: Shard, seed: int):
        super().__init__(files, labels, eval_transform(data, train), batch_size, shard, seed, train, workers,
                         data.image_size)
