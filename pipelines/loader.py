"""The DALI graphs as loaders of torch tensors, under the loader contract (``pipelines.contract``).

Each training epoch builds the rank's pipeline afresh over the files
:func:`pipelines.contract.rank_files` gives it, seeded by (seed, rank, epoch) (a build is cheap next
to an epoch), so a new epoch needs no saved state and a position inside an epoch is the DALI
checkpoint of that pipeline (reader position and every random generator).

Epoch boundaries cost nothing they need not (:class:`_Scheduled`): a pipeline is run ahead by its
prefetch depth but never past the batches its epoch has (``Pipeline.run`` would compute one more,
thrown away, and deleting the pipeline waits for it), and once the last batches of an epoch are
scheduled, the next epoch's pipeline is built and starts on its first batches while the consumer
still takes the last ones (``reader.build_ahead``). It is the very pipeline the next epoch would
otherwise build (same files, same seed), so batches do not depend on it; after a run's last epoch it
is built for nothing (a build and the first batches, once per run).

DALI's outputs reach torch without a copy (DLPack; DALI's dynamic executor keeps an output's memory
alive while a torch tensor refers to it) and as ``(N, 3, H, W)`` views of NHWC memory, i.e. torch's
channels_last format.

A loader reads image files (a list of paths) or the samples of a shard set (a
:class:`pipelines.shards.ShardSamples`); with shards, training walks
:func:`pipelines.contract.shard_order` and each pipeline gets index files written for its order into
a private temporary folder, removed once DALI has read them. Labels are attached here, from the
samples each batch holds.
"""
from __future__ import annotations

import dataclasses
import io
import os
import re
import shutil
import tempfile
import weakref

import numpy as np
import torch

from byol_fast.config import DataConfig, LinearDataConfig, ReaderConfig
from byol_fast.errors import ReadError
from pipelines.contract import EpochLoader, Shard, pipeline_seed, shard_order
from pipelines.shards import IMAGE_EXTS, ShardSamples

# DALI operators whose failure means an image's bytes could not be decoded: the decoders, and the
# header check in front of them (pipelines.decode.headers_parsed).
_DECODING_OPERATORS = ("decoders", "peek_image_shape")


def to_torch(batch) -> torch.Tensor:
    """DALI TensorList of HWC samples -> torch ``(N, C, H, W)`` with channels_last strides, no copy."""
    from nvidia.dali.tensors import TensorGPU

    tensor = batch.as_tensor()
    if isinstance(tensor, TensorGPU):
        # from_dlpack hands DALI torch's current stream, so the consumer's work is ordered after DALI's.
        with torch.cuda.device(tensor.device_id()):
            nhwc = torch.from_dlpack(tensor)
    else:
        nhwc = torch.from_dlpack(tensor)
    return nhwc.permute(0, 3, 1, 2)


_TMP_PREFIX = "byol_fast-shards-"  # + the owner's pid: the reader index files of one loader


def _remove_orphans() -> None:
    """Remove the index-file folders of processes that are gone (killed before they could clean up)."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        pid = name[len(_TMP_PREFIX):].partition("-")[0]
        if name.startswith(_TMP_PREFIX) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


class _Scheduled:
    """A built pipeline driven by ``schedule_run``/``outputs``: at most its prefetch depth of batches
    ahead of the consumer, and never more than ``total`` batches in all (None: no end, for the
    evaluation pipeline that serves every epoch). Build it with a depth of at most ``total``."""

    def __init__(self, pipe, total: int | None):
        self.pipe, self.total, self.scheduled = pipe, total, 0

    def start(self) -> None:
        """Start computing the first batches (DALI schedules the whole prefetch depth at once)."""
        if self.scheduled == 0:
            self.pipe.schedule_run()
            self.scheduled = self.pipe.prefetch_queue_depth

    @property
    def all_scheduled(self) -> bool:
        return self.total is not None and self.scheduled >= self.total

    def next(self):
        """The next batch's outputs (as ``Pipeline.run`` returns them), scheduling one more if any is left."""
        if self.scheduled == 0:
            self.start()
        elif not self.all_scheduled:
            self.pipe.schedule_run()
            self.scheduled += 1
        return self.pipe.outputs()


class _DaliLoader(EpochLoader):
    """One pipeline per epoch; subclasses say how to build it (``_build``) and read it (``_convert``).

    A pipeline walks the epoch's samples from ``offset`` batches in: 0, except when a position inside an
    epoch is restored without a DALI checkpoint (a run resumed by another number of processes), where
    the rest of the epoch's samples are read with fresh random draws.
    """

    def __init__(self, files, labels, batch_size: int, device: str, shard: Shard, seed: int,
                 torch_device: torch.device, train: bool):
        super().__init__(len(files), batch_size, shard, seed, train)
        self.files = files if isinstance(files, ShardSamples) else list(files)
        self.labels = None if labels is None else torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.device, self.torch_device = device, torch.device(torch_device)
        self._pipe, self._pipe_epoch, self._offset = None, None, 0  # _pipe: a _Scheduled
        self._order = torch.zeros(0, dtype=torch.int64)
        self._ahead = None  # (epoch, _Scheduled, order): the next epoch's pipeline, built early
        self._tars_seen = None  # _tar_identities() when the current pipeline was built (shards)
        self._saved = None  # (epoch, DALI checkpoint, offset) from load_state_dict, used at the next build
        self._tmp = None  # the folder of this loader's reader index files (shards only)

    def files_of(self, epoch: int) -> list[int]:
        if isinstance(self.files, ShardSamples):
            return shard_order(self.files.tar_of, self.batch_size, self.shard, epoch, self.seed, self.train)
        return super().files_of(epoch)

    def _source(self, order: list[int]):
        """What the reader walks for ``order``: file paths, or samples of shards via index files."""
        if not isinstance(self.files, ShardSamples):
            return [self.files[i] for i in order]
        if self._tmp is None:
            _remove_orphans()
            self._tmp = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.getpid()}-")
            weakref.finalize(self, shutil.rmtree, self._tmp, ignore_errors=True)
        for name in os.listdir(self._tmp):  # the last pipeline's lists: DALI read them when it was built
            os.remove(os.path.join(self._tmp, name))
        return self.files.reader_list(order, self._tmp, f"rank{self.shard.rank}")

    def _pipeline(self, epoch: int, step: int) -> _Scheduled:
        if self._pipe_epoch == epoch:
            return self._pipe
        if not self.train and self._pipe is not None and step == 0 and self._offset == 0:
            self._pipe_epoch = epoch  # evaluation: the same files every epoch, one reader epoch each
            return self._pipe
        ahead, self._ahead = self._ahead, None
        self._pipe = None  # free the last epoch's pipeline before building (or adopting) the next
        if ahead is not None and ahead[0] == epoch and ahead[1] is not None and step == 0:
            _, self._pipe, order = ahead
            offset = 0
        else:
            del ahead  # an early pipeline this epoch cannot use: freed before another is built
            saved = self._saved if self._saved and self._saved[0] == epoch and step > 0 else None
            checkpoint, offset = (saved[1], saved[2]) if saved and saved[1] is not None else (None, step)
            order = self.files_of(epoch)[offset * self.batch_size:]
            self._tars_seen = self._tar_identities()
            self._pipe = self._scheduled(order, epoch, checkpoint, self.steps_per_epoch - offset,
                                         self.steps_per_epoch - step)
        self._pipe_epoch, self._offset, self._saved = epoch, offset, None
        self._order = torch.as_tensor(order, dtype=torch.int64)  # the pipeline's samples: labels, errors
        return self._pipe

    def _scheduled(self, order: list[int], epoch: int, checkpoint, steps: int, left: int) -> _Scheduled:
        """The pipeline of ``order`` for ``epoch`` (``steps`` batches, ``left`` of them still to read,
        fewer when resumed from a DALI checkpoint), run ahead by at most its prefetch depth: training's
        never past its epoch, evaluation's (one pipeline for every epoch) without an end."""
        if self.train:
            total, depth = left, max(1, min(self.reader.prefetch, left))
        else:
            total, depth = None, max(1, self.reader.prefetch)
        pipe = self._build(order, epoch, pipeline_seed(self.seed, self.shard.rank, epoch), checkpoint, steps, depth)
        return _Scheduled(pipe, total)

    def _tar_identities(self) -> dict | None:
        """(device, inode, size, mtime) of every local tar of a shard set (None: files, or a tar that
        cannot be stat'ed). DALI lets a new pipeline share the mapping of a tar that a live pipeline has
        open, so a pipeline built ahead would go on reading a tar deleted or replaced since, where a
        pipeline built after the last one is freed opens it afresh and reports it."""
        if not isinstance(self.files, ShardSamples):
            return None
        identities = {}
        for tar in self.files.tars:
            if "://" in tar:  # object storage: nothing mapped
                continue
            try:
                st = os.stat(tar)
            except OSError:
                return None
            identities[tar] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        return identities

    def _build_ahead(self, epoch: int) -> None:
        """Build the pipeline of ``epoch`` (from its start) and start its first batches, once per epoch.
        Skipped when a local tar changed since the current pipeline was built; a failure is left for
        that epoch to meet: the pipeline is built again then, after this one is freed, and the error
        raised there."""
        self._ahead = (epoch, None, None)  # tried: not again this epoch
        if self._tar_identities() != self._tars_seen:  # files: None both
            return
        order = self.files_of(epoch)
        try:
            run = self._scheduled(order, epoch, None, self.steps_per_epoch, self.steps_per_epoch)
            run.start()
        except (RuntimeError, OSError):
            return
        self._ahead = (epoch, run, order)

    def _batches(self, epoch: int, step: int):
        try:
            run = self._pipeline(epoch, step)  # a build opens every tar (or file) of the epoch
        except RuntimeError as e:
            raise self._read_error(e) from None
        for k in range(step, self.steps_per_epoch):
            try:
                out = run.next()
            except RuntimeError as e:
                error = self._read_error(e, k)
                self._stop(run)
                raise error from None
            if self.train and self.reader.build_ahead and run.all_scheduled and self._ahead is None:
                self._build_ahead(epoch + 1)
            yield self._convert(out, k)
        if self.train:  # the epoch is read: free its pipeline now, not when the next epoch starts
            self._pipe, self._pipe_epoch = None, None

    def _stop(self, failed: _Scheduled) -> None:
        """Shut down this loader's pipelines after a failed batch. A shutdown waits for the batches a
        pipeline was still computing, so whatever their decoders print (libjpeg's warnings on a
        damaged image) is printed before the error that ends the run, which stays the last line.
        (Dropping the references is not enough: a pipeline's graph keeps it alive until the garbage
        collector runs; ``_shutdown`` is what DALI's own exit handler calls.)"""
        ahead = self._ahead[1] if self._ahead else None
        self._pipe, self._pipe_epoch, self._ahead = None, None, None
        for run in (failed, ahead):
            if run is not None:
                run.pipe._shutdown()

    def _source_of(self, i: int) -> str:
        """The file (or tar) sample ``i`` is read from."""
        return self.files.tars[int(self.files.tar_of[i])] if isinstance(self.files, ShardSamples) else self.files[i]

    def _read_error(self, e: RuntimeError, k: int | None = None) -> ReadError:
        """One line for a DALI failure: the file or tar it names, else those batch ``k`` (and the ones
        prefetched after it) came from; whether an image failed to decode or a file to be read; DALI's
        reason (its first line)."""
        text = str(e)
        reason = text.rpartition("encountered:")[2].strip().splitlines()[0] if "encountered:" in text else text
        shards = isinstance(self.files, ShardSamples)
        kind = "shards" if shards else "files"
        everything = self.files.tars if shards else self.files
        named = next((p for p in everything if p in text), None)
        if named:
            where = named
        elif k is None:  # a pipeline that could not be built, naming nothing
            where = f"one of the {len(everything)} {kind}"
        else:
            start = (k - self._offset) * self.batch_size
            batches = self._order[start:start + (1 + max(1, self.reader.prefetch)) * self.batch_size]
            names = list(dict.fromkeys(self._source_of(i) for i in batches.tolist()))
            where = names[0] + (f" (or one of {len(names) - 1} more read with it)" if len(names) > 1 else "")
        operator = re.search(r"operator `([^`]+)`", text)
        if operator and any(op in operator.group(1) for op in _DECODING_OPERATORS):
            culprit = None if named or k is None else self._undecodable(batches.tolist())
            if culprit is not None:
                where = culprit
            if "peek_image_shape" in operator.group(1):
                reason = f"its header is not an image's: {reason}"
            hint = "; python -m byol_fast.data verify finds damaged shards" if shards else ""
            return ReadError(f"{where}: an image could not be decoded ({reason}){hint}")
        return ReadError(f"{where}: could not be read ({reason})")

    def _undecodable(self, samples: list[int]) -> str | None:
        """The first of ``samples`` (in reading order) whose bytes PIL cannot decode, as its file or
        "<tar> (member <name>)"; None when every one decodes, or cannot be read here (object storage).
        Only called once a batch has failed, to name the image among the few batches it could be:
        DALI's header check reports that a header failed to parse, not whose."""
        from PIL import Image  # only on this error path

        for i in samples:
            try:
                if isinstance(self.files, ShardSamples):
                    tar = self.files.tars[int(self.files.tar_of[i])]
                    with open(tar, "rb") as f:
                        f.seek(int(self.files.offset[i]))
                        data = f.read(int(self.files.size[i]))
                    where = f"{tar} (member {int(self.files.key[i]):09d}.{IMAGE_EXTS[int(self.files.ext[i])]})"
                else:
                    where = self.files[i]
                    with open(where, "rb") as f:
                        data = f.read()
            except (OSError, ValueError):  # an object-storage URL, or a file gone since
                return None
            try:
                with Image.open(io.BytesIO(data)) as image:
                    image.load()
            except Exception:  # PIL raises many types for bytes that are no image; any means this one
                return where
        return None

    def _position(self, epoch: int, step: int) -> dict:
        if step > 0 and self._pipe_epoch == epoch:
            return {"pipeline": self._pipe.pipe.checkpoint(), "offset": self._offset}
        if step > 0 and self._saved and self._saved[0] == epoch:
            return {"pipeline": self._saved[1], "offset": self._saved[2]}
        return {"pipeline": None, "offset": 0}

    def _restore(self, state: dict) -> None:
        self._pipe, self._pipe_epoch, self._offset, self._ahead = None, None, 0, None  # rebuilt lazily from the checkpoint
        self._saved = (self._epoch, state.get("pipeline"), int(state.get("offset", 0)))

    def _tensor(self, batch) -> torch.Tensor:
        out = to_torch(batch)
        return out if out.device == self.torch_device else out.to(self.torch_device, non_blocking=True)

    def _labels(self, k: int, count: int) -> torch.Tensor:
        """Labels of the first ``count`` samples of the epoch's batch ``k``."""
        start = (k - self._offset) * self.batch_size
        return self.labels[self._order[start:start + count]].to(self.torch_device, non_blocking=True)


class DaliTwoViewLoader(_DaliLoader):
    """BYOL's two views (``pipelines.pretrain``): batches (view1, view2), each float32 (N, 3, H, W),
    then, with ``windows``, each view's crop window and flip, float32 (N, 5) (x0, y0, x1, y1 in the
    decoded image's pixels, flip 0/1: what PixPro pairs pixels by), then labels int64 (N,) when
    ``labels`` are given (the online probe).

    batch_size is per rank. device: "cpu" (DALI on the CPU, no GPU needed) or "gpu" (nvJPEG + GPU ops
    on cuda:local_rank). Tensors land on ``torch_device`` (moved only when DALI made them elsewhere).
    """

    def __init__(self, files, data: DataConfig, reader: ReaderConfig, batch_size: int, device: str, shard: Shard,
                 seed: int, torch_device: torch.device, labels=None, windows: bool = False):
        super().__init__(files, labels, batch_size, device, shard, seed, torch_device, train=True)
        self.data, self.reader, self.windows = data, reader, windows

    def _build(self, order, epoch, seed, checkpoint, steps, depth):
        # Deferred for start-up time: this module is imported by every command, DALI only by a run
        # that builds a pipeline.
        from pipelines.pretrain import build_pretrain_pipeline

        reader = dataclasses.replace(self.reader, prefetch=depth)
        data = dataclasses.replace(self.data, image_size=self.data.size_at(epoch))  # the resolution ramp's side
        return build_pretrain_pipeline(self._source(order), data, reader, self.batch_size, self.device,
                                       self.shard.local_rank if self.device == "gpu" else None, seed, checkpoint,
                                       self.windows)

    def _convert(self, out, k):
        views = (self._tensor(out[0]), self._tensor(out[1]))
        if self.windows:
            views += tuple(torch.from_dlpack(w.as_tensor()).to(self.torch_device, non_blocking=True) for w in out[2:4])
        return views if self.labels is None else (*views, self._labels(k, self.batch_size))


class DaliEvalLoader(_DaliLoader):
    """Linear evaluation's and the kNN monitor's images (``pipelines.evaluation``): batches
    (images float32 (N, 3, S, S) channels_last, labels int64 (N,)).

    train=True: random resized crop + flip, a new partition of the files every epoch. train=False:
    resize + center crop, every file of the rank's block once per epoch in order; the list is padded
    to whole batches with repeats of its last file, the padding is cut off here, and one pipeline
    serves every epoch.
    """

    def __init__(self, files, labels, train: bool, data: LinearDataConfig, reader: ReaderConfig, batch_size: int,
                 device: str, shard: Shard, seed: int, torch_device: torch.device):
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        super().__init__(files, labels, batch_size, device, shard, seed, torch_device, train)
        self.data, self.reader = data, reader
        self._real = len(self.files_of(0))  # files of this rank before padding (evaluation)

    def _build(self, order, epoch, seed, checkpoint, steps, depth):
        # Deferred for start-up time: this module is imported by every command, DALI only by a run
        # that builds a pipeline.
        from pipelines.evaluation import build_eval_pipeline

        order = order + [order[-1] if order else 0] * (steps * self.batch_size - len(order))
        reader = dataclasses.replace(self.reader, prefetch=depth)
        return build_eval_pipeline(self._source(order), self.data, reader, self.train, self.batch_size,
                                   self.device, self.shard.local_rank if self.device == "gpu" else None, seed,
                                   checkpoint)

    def _convert(self, out, k):
        images, keep = self._tensor(out[0]), self.batch_size
        if not self.train:  # cut the padding
            keep = max(0, min(self.batch_size, self._real - k * self.batch_size))
            images = images[:keep]
        return images, self._labels(k, keep)
