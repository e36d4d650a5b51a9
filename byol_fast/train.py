"""BYOL pretraining driver: ``python -m byol_fast.train --config config/demo.yaml [--key=value ...]``.

Reads top to bottom: configuration, distributed setup, data, model, optimizer, resume, loop.
The run folder (``out_dir``) holds ``config.yaml``, ``last.pt`` and TensorBoard event files; a
second run with the same folder resumes from ``last.pt`` by itself. SIGTERM or SIGUSR1
(preemption) finishes the current step, writes a checkpoint and exits with status 75 so a
scheduler can requeue the job.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as tdist

from . import checkpoint as ckpt
from . import dist
from .config import Config, ConfigError, load_config, to_dict, to_yaml
from .data import DatasetError, checked_index
from .metrics import Throughput, Writer, collapse_stats, pair_retrieval
from .learner import Learner
from .schedules import lr_at, scaled_lr, tau_at

class DivergedError(RuntimeError):
    """Too many non-finite steps in a row."""


PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on a signal after saving; run the same command again


# ---------------------------------------------------------------------------- derived settings


def resolve_device(cfg: Config) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but no CUDA GPU is visible (use --device=cpu or auto)")
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def micro_batch_size(cfg: Config, world_size: int) -> int:
    """Per-GPU batch of one forward pass: global batch / (world size x accumulation steps)."""
    parts = world_size * cfg.optim.accumulate
    if cfg.optim.accumulate < 1 or cfg.optim.batch_size % parts:
        raise ConfigError(f"optim.batch_size: {cfg.optim.batch_size} does not divide into {world_size} processes "
                          f"x {cfg.optim.accumulate} accumulation steps")
    return cfg.optim.batch_size // parts


def decode_device(data, device: torch.device) -> str:
    """Where DALI decodes for the data section ``data`` (pretraining's or linear evaluation's):
    ``data.decode``, with auto = gpu on a CUDA device, else cpu."""
    return ("gpu" if device.type == "cuda" else "cpu") if data.decode == "auto" else data.decode


def stop_on_signals(run, then: str) -> None:
    """SIGTERM and SIGUSR1 (preemption) set ``run.stop_requested`` and log ``received signal N: <then>``;
    the loop reads the flag where the ranks agree, stops and returns PREEMPTED_EXIT."""

    def on_signal(signum, frame) -> None:
        run.log(f"received signal {signum}: {then}")
        run.stop_requested = True

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, on_signal)


# ---------------------------------------------------------------------------- data


def build_knn_monitor(cfg: Config, bank, info: dist.DistInfo, device: torch.device):
    """The kNN monitor (monitor.knn_every > 0): bank = center crops of the training split (its index
    ``bank``), queries = the validation split, read by linear evaluation's loaders at the pretraining
    resolution."""
    if cfg.monitor.knn_every <= 0:
        return None
    from .linear_eval import LinearDataConfig, eval_loader
    from .monitors import KnnMonitor

    val_path = Path(cfg.monitor.val_path or Path(cfg.data.path).parent / "val")
    if not val_path.is_dir():
        raise ConfigError(f"monitor.val_path: {val_path} is not a folder; the kNN monitor needs a labelled "
                          "validation split (or --monitor.knn_every=0 to turn it off)")
    query = checked_index(val_path, info, cfg.data.workers)
    if not (bank.labelled and query.labelled) or bank.classes != query.classes:
        raise ConfigError(f"monitor.knn_every: the kNN monitor needs class folders, the same in {cfg.data.path} "
                          f"and {val_path} (or --monitor.knn_every=0)")
    size = cfg.data.image_size
    data = LinearDataConfig(image_size=size, resize=round(size * 256 / 224), mean=cfg.data.mean, std=cfg.data.std,
                            loader=cfg.data.loader, decode=cfg.data.decode, num_threads=cfg.data.num_threads)
    batch = micro_batch_size(cfg, info.world_size)
    return KnnMonitor(eval_loader(bank, False, data, batch, info, device, cfg.seed),
                      eval_loader(query, False, data, batch, info, device, cfg.seed),
                      bank.num_classes, cfg.monitor.knn_k, cfg.monitor.knn_temperature, cfg.monitor.knn_bank_limit)


def build_loader(cfg: Config, index, info: dist.DistInfo, device: torch.device, batch: int):
    """The two-view loader of this rank over the training ``index``: DALI (default) or the
    torchvision/PIL reference; with ``monitor.probe`` it also yields each image's class label."""
    files, labels = index.files, None
    if cfg.monitor.probe:
        if not index.labelled:
            raise ConfigError(f"monitor.probe: {cfg.data.path} has no class folders, and the online probe needs "
                              "labels (or --monitor.probe=false)")
        labels = index.labels
    if cfg.data.loader == "torchvision":
        from pipelines.reference import TorchvisionTwoViewLoader

        return TorchvisionTwoViewLoader(files, cfg.data, batch, cfg.data.num_threads, info.rank,
                                        info.world_size, cfg.seed, labels)
    from pipelines.loader import DaliTwoViewLoader

    where = decode_device(cfg.data, device)
    if where == "gpu" and device.type != "cuda":
        raise ConfigError("data.decode: 'gpu' needs training on a CUDA GPU")
    return DaliTwoViewLoader(files, cfg.data, batch, where, info.rank, info.world_size, info.local_rank,
                             cfg.seed, device, labels)


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(device, non_blocking=True, memory_format=fmt)


# ---------------------------------------------------------------------------- the run


class Run:
    """Everything one pretraining process holds; :meth:`fit` is the loop."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        device = resolve_device(cfg)
        self.info = dist.setup(device)
        self.device = dist.local_device(device, self.info)
        self.out = Path(cfg.out_dir)
        torch.manual_seed(cfg.seed + self.info.rank)
        self.log(f"byol_fast {ckpt.git_revision()} | {self.info.world_size} process(es) on {self.device} "
                 f"| rank 0 pid {os.getpid()}")
        self.log("resolved config:\n" + to_yaml(cfg))
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(to_yaml(cfg))

        self.batch = micro_batch_size(cfg, self.info.world_size)
        self.index = checked_index(cfg.data.path, self.info, cfg.data.workers)  # read once: loader, kNN bank, probe classes
        self.loader = build_loader(cfg, self.index, self.info, self.device, self.batch)
        self.steps_per_epoch = self.loader.steps_per_epoch // cfg.optim.accumulate
        if self.steps_per_epoch < 1:
            raise ConfigError(f"optim.accumulate: {cfg.optim.accumulate} micro-batches exceed the "
                              f"{self.loader.steps_per_epoch} per epoch")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        self.peak_lr = scaled_lr(cfg.optim.lr, cfg.optim.batch_size)

        self.learner = Learner(cfg, self.device, self.info)
        self.knn = build_knn_monitor(cfg, self.index, self.info, self.device)
        self.probe = None
        if cfg.monitor.probe:
            from .monitors import OnlineProbe

            self.probe = OnlineProbe(self.learner.byol.online.width, self.index.num_classes, self.device,
                                     cfg.monitor.probe_lr)
        self.step = 0
        self.writer = Writer(str(self.out), self.info.is_main)
        self.stop_requested = False
        self.resume()

    def log(self, msg: str) -> None:
        if self.info.is_main:
            print(msg, flush=True)

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        state = {"step": self.step, **self.learner.state_dict(), "rng": ckpt.rng_state(),
                 "loader": self._loader_states(), "config": to_dict(self.cfg), "git": ckpt.git_revision(),
                 "world_size": self.info.world_size}
        if self.probe:
            state["probe"] = self.probe.state_dict()
        return state

    def _loader_states(self) -> list | None:
        """Every rank's loader position (DALI checkpoint), gathered for rank 0 to save."""
        state = self.loader.state_dict() if hasattr(self.loader, "state_dict") else None
        if tdist.is_initialized():
            states = [None] * self.info.world_size
            tdist.all_gather_object(states, state)
            return states
        return [state]

    def save(self) -> None:
        state = self.state()  # every rank takes part in gathering loader states
        if self.info.is_main:
            ckpt.atomic_save(state, self.out / ckpt.LAST)
            self.log(f"saved {self.out / ckpt.LAST} at step {self.step}")
        self.last_save = time.monotonic()

    def resume(self) -> None:
        self.last_save = time.monotonic()
        path = self.out / ckpt.LAST
        if self.info.is_main:  # half-written checkpoints of a process killed mid-save: never read, so drop them
            for torn in self.out.glob(f".{ckpt.LAST}.*.tmp"):
                self.log(f"removing {torn}, an unfinished checkpoint write")
                torn.unlink(missing_ok=True)
        if not path.exists():
            return
        state = ckpt.load(path)
        saved = state.get("config", {}).get("model")
        if saved and saved != to_dict(self.cfg)["model"]:
            raise ckpt.CheckpointError(f"{path} holds a different model ({saved}) from this config's "
                                       f"({to_dict(self.cfg)['model']}): use another out_dir")
        try:
            self.learner.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError) as e:
            raise ckpt.CheckpointError(f"{path} does not fit this model: {e}") from None
        ckpt.set_rng_state(state["rng"])
        loaders = state.get("loader") or []
        if (hasattr(self.loader, "load_state_dict") and len(loaders) == self.info.world_size
                and loaders[self.info.rank] is not None):
            self.loader.load_state_dict(loaders[self.info.rank])
        if self.probe and "probe" in state:  # a run that turns the probe on later starts it fresh
            self.probe.load_state_dict(state["probe"])
        self.step = state["step"]
        self.log(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ the loop

    def _agree(self, want_save: bool) -> tuple[bool, bool]:
        """All ranks agree on (stop, save) at the same step, or collectives would deadlock."""
        flags = torch.tensor([float(self.stop_requested), float(want_save)], device=self.device)
        if tdist.is_initialized():
            tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
        stop, save = flags.tolist()
        return bool(stop), bool(save)

    def fit(self) -> int:
        cfg = self.cfg
        stop_on_signals(self, "finishing the step, then saving")
        last_step = self.total_steps if not cfg.max_steps else min(self.total_steps, cfg.max_steps)
        self.log(f"{self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs = {self.total_steps} steps; "
                 f"global batch {cfg.optim.batch_size} ({self.batch}/process x {self.info.world_size} "
                 f"x {cfg.optim.accumulate} accumulation); peak lr {self.peak_lr:g}; precision {self.learner.amp_dtype}")
        self.learner.model.train()
        meter, loss_sum, counted, since_log = Throughput(), torch.zeros((), device=self.device), 0, 0
        images_per_step = cfg.optim.batch_size
        stream = self._batches()
        while self.step < last_step:
            lr = lr_at(self.step, self.total_steps, self.warmup_steps, self.peak_lr)
            tau = tau_at(self.step, self.total_steps, cfg.ema.tau_base)
            micro = [next(stream) for _ in range(cfg.optim.accumulate)]
            loss = self.learner.step([m[:2] for m in micro], lr, tau)
            self.step += 1
            if self.learner.skipped_in_row:
                self._on_nonfinite()
            else:
                if self.probe:  # features of the last micro-batch, detached: the probe never shapes them
                    self.probe.step(self.learner.last["representation"], micro[-1][2])
                loss_sum += loss
                counted += 1
            since_log += 1
            meter.add(images_per_step)
            epoch_end = self.step % self.steps_per_epoch == 0
            if self.knn and ((epoch_end and (self.step // self.steps_per_epoch) % cfg.monitor.knn_every == 0)
                             or self.step == last_step):
                self._knn()
            if since_log == cfg.log_every or epoch_end or self.step == last_step:
                self._report(loss_sum / max(counted, 1), meter.read())  # host sync: reads the loss
                loss_sum.zero_()
                counted = since_log = 0
                due = time.monotonic() - self.last_save > 60 * cfg.checkpoint_minutes
                stop, save = self._agree(due or epoch_end)
                if save or stop or self.step == last_step:
                    self.save()
                if stop:
                    self.log(f"stopped at step {self.step}; run the same command to resume")
                    return PREEMPTED_EXIT
        self.writer.close()
        self.log(f"done: {self.step} steps")
        return 0

    def _knn(self) -> None:
        """kNN accuracy of the target encoder (the paper's evaluated network is the online one; the
        target is its slow average and what the monitor of DeepMind's reference reads). All ranks."""
        start = time.perf_counter()
        acc = self.knn.run(self.learner.byol.target.encoder, self.device, self.learner.amp_dtype)
        self.log(f"knn (k={self.cfg.monitor.knn_k}) at step {self.step}: top1 {acc['knn/top1']:.2f} "
                 f"top5 {acc['knn/top5']:.2f} ({time.perf_counter() - start:.1f} s)")
        self.writer.scalars(acc, self.step)

    def _on_nonfinite(self) -> None:
        """A skipped step still counts (schedules stay on time); too many in a row end the run."""
        n = self.learner.skipped_in_row
        self.log(f"step {self.step}: non-finite loss or gradients, step skipped ({n} in a row, "
                 f"{self.learner.skipped_total} in all)")
        self.writer.scalars({"train/skipped_steps": self.learner.skipped_total}, self.step)
        if n >= self.cfg.max_nonfinite_steps:
            raise DivergedError(
                f"{n} non-finite steps in a row at step {self.step}: training diverged. Likely causes: a learning "
                f"rate too high for this batch (optim.lr={self.cfg.optim.lr}), fp16 overflow (try --precision=bf16 "
                f"or fp32), or bad input data. The last checkpoint ({self.out / ckpt.LAST}) is from before.")

    def _batches(self):
        """An endless stream of (view1, view2[, labels]) micro-batches on the training device."""
        while True:
            for view1, view2, *labels in self.loader:
                yield (to_device(view1, self.device, self.cfg.channels_last),
                       to_device(view2, self.device, self.cfg.channels_last),
                       *(y.to(self.device, non_blocking=True) for y in labels))

    def _report(self, loss: torch.Tensor, images_per_s: float) -> None:
        epoch = (self.step - 1) // self.steps_per_epoch
        lr = self.learner.optimizer.param_groups[0]["lr"]
        tau = tau_at(self.step - 1, self.total_steps, self.cfg.ema.tau_base)
        device_stats = {"train/loss": dist.all_reduce_mean(loss),
                        **collapse_stats(self.learner.last["projection"]),
                        "train/pair_top1": 100.0 * pair_retrieval(self.learner.last["prediction"],
                                                                  self.learner.last["target_projection"])}
        # One host sync for all of them (read every log_every steps, never per step).
        stats = dict(zip(device_stats, torch.stack(list(device_stats.values())).tolist()))
        loss = stats.pop("train/loss")
        extra = ""
        if self.probe:
            stats.update(self.probe.read())
            extra += f" probe_top1 {stats['probe/train_top1']:.1f}"
        if self.device.type == "cuda":  # reads a counter, no device sync
            stats["train/peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            extra += f" peak_mem {stats['train/peak_mem_gib']:.1f}GiB"
        self.log(f"epoch {epoch} step {self.step}/{self.total_steps} loss {loss:.4f} lr {lr:.4g} tau {tau:.5f} "
                 f"img/s {images_per_s:.1f} proj_std*sqrt(d) {stats['collapse/std_x_sqrt_d']:.3f} "
                 f"pair_top1 {stats['train/pair_top1']:.1f}{extra}")
        self.writer.scalars({"train/loss": loss, "train/lr": lr, "train/tau": tau,
                             "train/img_per_s": images_per_s, **stats}, self.step)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m byol_fast.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (config/*.yaml); defaults are the paper's 1000-epoch run")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        run = Run(cfg)
        code = run.fit()
    except (ConfigError, DatasetError, ckpt.CheckpointError, DivergedError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.teardown()
    return code


if __name__ == "__main__":
    sys.exit(main())
