"""The loader contract (pipelines/contract.py), checked on every loader alike, in the manner of timm's
optimizer tests: one parametrised suite, every implementation through it.

Files are 16 uniform grey PNGs whose grey level says which file a sample came from, and each file's
label is its index, so a batch tells which files it holds twice over (pixels and labels); every
augmentation is the identity or keeps a uniform image uniform. Ranks are loaders built with another
Shard in one process (no process group is needed to decide which files a rank reads). The "-shards"
kinds read the same files packed into tar shards (several per tar, byol_fast.datasets.shard_pack) through DALI's
webdataset reader: there a sample's label is still its file's index.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from byol_fast.evaluation.classifier import FeatureLoader
from byol_fast.config import DataConfig, LinearDataConfig
from byol_fast.datasets.samples import Index
from byol_fast.datasets.shard_set import open_shard_set
from byol_fast.datasets.shard_pack import pack
from conftest import IDENTITY, READER, save, smooth_texture
from pipelines.contract import Shard, rank_files, shard_order, steps_per_epoch
from pipelines.loader import DaliEvalLoader, DaliTwoViewLoader
from pipelines.reference import TorchvisionEvalLoader, TorchvisionTwoViewLoader

S, BATCH, SEED = 32, 2, 5
CPU = torch.device("cpu")
TWO_VIEW = DataConfig(image_size=S, view1=IDENTITY, view2=IDENTITY)
CROPS = LinearDataConfig(image_size=S, resize=S)
LOADERS = ["dali-two-view", "torchvision-two-view", "dali-eval", "torchvision-eval", "cached-features",
           "dali-two-view-shards", "dali-eval-shards"]
_PACKED = {}


def packed(files):
    """The files packed into tar shards of one 10 KiB tar record (4 grey PNGs, 2 photos), label = file index."""
    key = tuple(files)
    if key not in _PACKED:
        root = Path(files[0]).parent
        kinds = ["PNG:RGB" if f.endswith(".png") else "JPEG:RGB" for f in files]
        index = Index(str(root), list(files), list(range(len(files))), [str(i) for i in range(len(files))], kinds=kinds)
        out = root / f"shards{len(_PACKED)}"
        pack(index, out, shard_bytes=10240, seed=1, progress=False)
        _PACKED[key] = open_shard_set(str(out))
    return _PACKED[key]


def expected_ids(kind: str, files, shard: Shard, epoch: int, train: bool = True) -> list[int]:
    """The file indices rank ``shard`` reads in ``epoch``, from the contract's functions."""
    if kind.endswith("-shards"):
        shards = packed(files)
        return [shards.labels[i] for i in shard_order(shards.samples.tar_of, BATCH, shard, epoch, SEED, train)]
    return rank_files(len(files), BATCH, shard, epoch, SEED, train)


@pytest.fixture(scope="module")
def greys(tmp_path_factory):
    root = tmp_path_factory.mktemp("greys")
    return [save(root / f"grey{i:02d}.png", np.full((S, S, 3), 8 + 15 * i, np.uint8)) for i in range(16)]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Textured JPEGs: random crops, flips and colour changes all show in their pixels."""
    root, rng = tmp_path_factory.mktemp("photos"), np.random.default_rng(0)
    return [save(root / f"photo{i:02d}.jpg", smooth_texture(rng, 40, 48)) for i in range(16)]


def make(kind: str, files, shard: Shard, train: bool = True, views: DataConfig = TWO_VIEW, reader=READER):
    labels = list(range(len(files)))
    if kind.endswith("-shards"):
        shards = packed(files)
        files, labels = shards.samples, shards.labels
        kind = kind[:-len("-shards")]
    if kind == "dali-two-view":
        return DaliTwoViewLoader(files, views, reader, BATCH, "cpu", shard, SEED, CPU, labels=labels)
    if kind == "torchvision-two-view":
        return TorchvisionTwoViewLoader(files, views, BATCH, 0, shard, SEED, labels=labels)
    if kind == "dali-eval":
        return DaliEvalLoader(files, labels, train, CROPS, reader, BATCH, "cpu", shard, SEED, CPU)
    if kind == "torchvision-eval":
        return TorchvisionEvalLoader(files, labels, train, CROPS, BATCH, 0, shard, SEED)
    features = torch.arange(len(files), dtype=torch.float32).view(-1, 1)  # row i "is" file i
    return FeatureLoader(features, torch.tensor(labels), BATCH, shard, SEED)


def grey_ids(images: torch.Tensor) -> list[int]:
    """Which grey file (8 + 15 i) each normalised image (N, 3, S, S) is."""
    if images.shape[1:] == (1,):  # cached features: the row is the file index
        return images[:, 0].round().long().tolist()
    mean, std = torch.tensor(TWO_VIEW.mean).view(1, 3, 1, 1), torch.tensor(TWO_VIEW.std).view(1, 3, 1, 1)
    grey = ((images * std + mean) * 255.0).mean(dim=(1, 2, 3))
    return [int(round((g.item() - 8) / 15)) for g in grey]


def files_read(batch) -> list[int]:
    """The files of a batch by their labels, after checking that every image agrees with its label."""
    labels = batch[-1].tolist()
    assert batch[-1].dtype == torch.int64
    for images in batch[:-1]:
        assert grey_ids(images) == labels  # labels travel with their files
    return labels


def one_epoch(loader) -> list[list[int]]:
    batches = []
    for b in loader:
        assert all(len(t) == len(b[-1]) for t in b)  # images and labels of the same samples
        assert all(t.shape[1:] in ((3, S, S), (1,)) for t in b[:-1])  # even a short or empty batch
        batches.append(files_read(b))
    assert len(batches) == loader.steps_per_epoch
    return batches


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_each_epoch_partitions_the_kept_files_in_equal_steps_and_reshuffles(greys, kind, world):
    loaders = [make(kind, greys, Shard(r, world)) for r in range(world)]
    steps = 16 // (BATCH * world)
    assert [loader.steps_per_epoch for loader in loaders] == [steps] * world == [len(x) for x in loaders]
    epochs = []
    for epoch in range(3):
        assert all(loader.epoch == epoch for loader in loaders)
        batches = [one_epoch(loader) for loader in loaders]
        assert all(len(b) == BATCH for rank in batches for b in rank)  # whole batches, every step
        per_rank = [[i for b in rank for i in b] for rank in batches]
        everything = [i for ids in per_rank for i in ids]
        assert len(set(everything)) == len(everything) == steps * BATCH * world  # no file twice
        assert 16 - len(everything) < BATCH * world  # fewer than one global batch left out
        for r, ids in enumerate(per_rank):  # the one function that says which files rank r reads
            assert ids == expected_ids(kind, greys, Shard(r, world), epoch)
        epochs.append(everything)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]  # reshuffled between epochs


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("world, rank", [(1, 0), (2, 1), (3, 2)])
def test_a_mid_epoch_state_gives_the_same_next_batches_bit_for_bit(greys, kind, world, rank):
    loader = make(kind, greys, Shard(rank, world))
    steps = loader.steps_per_epoch
    stream = iter(loader)
    next(stream)  # one batch of epoch 0 taken
    state = loader.state_dict()
    following = [tuple(t.clone() for t in b) for b in stream]  # the rest of epoch 0
    following += [tuple(t.clone() for t in b) for b in loader][:2]  # and into epoch 1
    resumed = make(kind, greys, Shard(rank, world))
    resumed.load_state_dict(state)
    again = list(resumed) + list(resumed)[:2]
    assert len(again) == len(following) == steps - 1 + min(2, steps)
    for a, b in zip(following, again):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert resumed.epoch == loader.epoch


def batches_of(loader) -> list[tuple]:
    return [tuple(t.clone() for t in b) for b in loader]


@pytest.mark.parametrize("kind", ["dali-two-view", "torchvision-two-view", "dali-eval", "torchvision-eval",
                                  "dali-two-view-shards", "dali-eval-shards"])
def test_the_random_draws_resume_too(photos, kind):
    """The paper's views (two-view loaders) or random crops and flips (evaluation's training crops) on
    textured images: a state taken mid-epoch gives back the same pixels, not only the same files."""
    recipe = DataConfig(image_size=S)
    loader = make(kind, photos, Shard(1, 2), views=recipe)
    stream = iter(loader)
    first = tuple(t.clone() for t in next(stream))
    state = loader.state_dict()
    following = [tuple(t.clone() for t in b) for b in stream] + batches_of(loader)
    resumed = make(kind, photos, Shard(1, 2), views=recipe)
    resumed.load_state_dict(state)
    again = batches_of(resumed) + batches_of(resumed)
    assert len(again) == len(following) == 2 * loader.steps_per_epoch - 1
    assert all(torch.equal(x, y) for a, b in zip(following, again) for x, y in zip(a, b))
    assert not any(torch.equal(first[0], b[0]) for b in following)  # the draws differ from batch to batch
    assert torch.equal(next(iter(make(kind, photos, Shard(1, 2), views=recipe)))[0], first[0])  # and are seeded


@pytest.mark.parametrize("kind", ["dali-two-view", "dali-eval", "dali-two-view-shards"])
@pytest.mark.parametrize("ahead", [True, False])
def test_an_epoch_started_early_is_the_epoch_a_fresh_start_gives(photos, kind, ahead):
    """The DALI loaders build the next epoch's pipeline while the last batches of an epoch are still
    being taken (unless reader.build_ahead is off), and use it: its batches are, pixel for pixel, those
    of a loader that starts at that epoch. No pipeline computes a batch past its epoch's end, nor is
    built deeper than the batches it has."""
    recipe = DataConfig(image_size=S)
    reader = dataclasses.replace(READER, build_ahead=ahead, prefetch=8)  # deeper than an epoch's 4 batches
    straight = make(kind, photos, Shard(0, 2), views=recipe, reader=reader)
    assert straight.steps_per_epoch == 4
    batches_of(straight)
    early = straight._ahead[1] if straight._ahead else None
    assert (early is not None and straight._ahead[0] == 1) == ahead  # epoch 1 built early, or not
    epoch1, runs = [], []
    for b in straight:
        epoch1.append(tuple(t.clone() for t in b))
        runs.append(straight._pipe)
        assert straight._pipe.pipe.prefetch_queue_depth == 4  # min(prefetch, batches of the epoch)
        assert straight._pipe.scheduled <= straight.steps_per_epoch
    assert all(r is runs[0] for r in runs) and (runs[0] is early) == ahead  # the early pipeline read epoch 1
    assert runs[0].pipe._batches_to_consume == 0  # DALI's count of batches run and not yet taken
    fresh = make(kind, photos, Shard(0, 2), views=recipe, reader=reader)
    fresh.load_state_dict({"epoch": 1, "step": 0})
    again = batches_of(fresh)
    assert len(epoch1) == len(again) == straight.steps_per_epoch
    assert all(torch.equal(x, y) for a, b in zip(epoch1, again) for x, y in zip(a, b))


def test_a_tar_deleted_mid_epoch_is_reported_when_the_next_epoch_starts(photos, tmp_path):
    """DALI lets a new pipeline share the mapping of a tar a live pipeline still has open: a pipeline
    built ahead must not keep reading a tar deleted since (it is built after the old one is freed)."""
    import shutil

    from byol_fast.datasets.shard_set import open_shard_set
    from byol_fast.errors import ReadError

    src = Path(packed(photos).samples.tars[0]).parent
    shutil.copytree(src, tmp_path / "set")
    shards = open_shard_set(str(tmp_path / "set"))
    loader = DaliTwoViewLoader(shards.samples, DataConfig(image_size=S), READER, BATCH, "cpu", Shard(0, 1), SEED, CPU)
    stream = iter(loader)
    next(stream)
    victim = shards.samples.tars[1]
    Path(victim).unlink()
    list(stream)  # epoch 0 reads on from the tars it opened
    with pytest.raises(ReadError) as e:
        next(iter(loader))
    assert str(e.value).startswith(victim) and "could not be read" in str(e.value)


@pytest.mark.parametrize("kind", LOADERS)
def test_a_position_without_a_pipeline_checkpoint_reads_the_rest_of_the_epoch(greys, kind):
    """{epoch, step} alone (what a run resumed by another number of processes has): the files that
    follow are those an uninterrupted loader reads next."""
    straight = make(kind, greys, Shard(0, 2))
    one_epoch(straight)
    expected = one_epoch(straight)[2:] + one_epoch(straight)  # epoch 1 from step 2, then epoch 2
    resumed = make(kind, greys, Shard(0, 2))
    resumed.load_state_dict({"epoch": 1, "step": 2})
    assert resumed.epoch == 1
    assert one_epoch_from(resumed, 2) + one_epoch(resumed) == expected


def one_epoch_from(loader, step: int) -> list[list[int]]:
    batches = [files_read(b) for b in loader]
    assert len(batches) == loader.steps_per_epoch - step
    return batches


@pytest.mark.parametrize("kind", ["dali-eval", "torchvision-eval", "dali-eval-shards"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_evaluation_reads_every_file_once_over_the_ranks_in_equal_steps(greys, kind, world):
    files = greys[:5]  # 5 files, batch 2: shards of 1 or 2 files at 4 ranks, some last batches short or empty
    loaders = [make(kind, files, Shard(r, world), train=False) for r in range(world)]
    steps = steps_per_epoch(5, BATCH, world, train=False)
    assert all(loader.steps_per_epoch == steps for loader in loaders)
    for _ in range(2):  # the same files in the next epoch
        per_rank = [[i for b in one_epoch(loader) for i in b] for loader in loaders]
        assert sorted(i for ids in per_rank for i in ids) == list(range(5))
        in_order = [i for r in range(world) for i in expected_ids(kind, files, Shard(r, world), 0, train=False)]
        assert [i for ids in per_rank for i in ids] == in_order  # in stored order, rank after rank
