"""BYOL pretraining driver: ``python -m byol_fast.train --config config/demo.yaml [--key=value ...]``.

Reads top to bottom: configuration, distributed setup, data, model, optimizer, resume, loop.
The run folder (``out_dir``) holds ``config.yaml``, ``last.pt`` and TensorBoard event files; a
second run with the same folder resumes from ``last.pt`` by itself. SIGTERM or SIGUSR1
(preemption) finishes the current step, writes a checkpoint and exits with status 75 so a
scheduler can requeue the job.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as tdist

from byol_fast.config import Config, LinearDataConfig, load_config, to_dict, to_yaml
from byol_fast.datasets import object_store as store
from byol_fast.datasets.loaders import eval_loader, two_view_loader
from byol_fast.datasets.open_dataset import checked_dataset
from byol_fast.errors import ConfigError, DivergedError
from byol_fast.optim.schedules import lr_at, scaled_lr, tau_at
from byol_fast.pretrain.health import collapse_stats, pair_retrieval
from byol_fast.pretrain.learner import Learner
from byol_fast.pretrain.monitors import KnnMonitor, OnlineProbe
from byol_fast.runtime import dist, out_dir
from byol_fast.runtime.cli import run_cli
from byol_fast.runtime.device import per_process_batch, to_device
from byol_fast.runtime.process import PREEMPTED_EXIT, Process, SaveSchedule, git_revision
from byol_fast.runtime.progress import Window, format_duration
from byol_fast.runtime.tensorboard import Writer
from byol_fast.weights import checkpoint as ckpt
from byol_fast.weights.checkpoint_writer import BackgroundWriter
from byol_fast.weights.checkpoint_schema import require


def knn_monitor(cfg: Config, bank, info, device: torch.device, batch: int) -> KnnMonitor | None:
    """The kNN monitor (monitor.knn_every > 0): bank = center crops of the training split (its index
    ``bank``), queries = the validation split, at the pretraining resolution and normalisation."""
    if cfg.monitor.knn_every <= 0:
        return None
    val_path = cfg.monitor.val_path or store.join(store.parent(cfg.data.path), "val")
    if not (store.is_s3(val_path) or Path(val_path).is_dir()):
        raise ConfigError(f"monitor.val_path: {val_path} is not a folder; the kNN monitor needs a labelled "
                          "validation split (or --monitor.knn_every=0 to turn it off)")
    query = checked_dataset(val_path, info, cfg.reader.index_workers)
    if not (bank.labelled and query.labelled) or bank.classes != query.classes:
        raise ConfigError(f"monitor.knn_every: the kNN monitor needs class folders, the same in {cfg.data.path} "
                          f"and {val_path} (or --monitor.knn_every=0)")
    size = cfg.data.image_size
    crops = LinearDataConfig(image_size=size, resize=round(size * 256 / 224), interp=cfg.data.interp,
                             mean=cfg.data.mean, std=cfg.data.std)
    bank = bank.sample(cfg.monitor.knn_bank_limit * info.world_size, cfg.seed)  # a random subset, every class in it
    loaders = [eval_loader(split, False, crops, cfg.reader, batch, info, device, cfg.seed) for split in (bank, query)]
    return KnnMonitor(*loaders, bank.num_classes, cfg.monitor.knn_k, cfg.monitor.knn_temperature)


# ---------------------------------------------------------------------------- the run


class Run:
    """Everything one pretraining process holds; :meth:`fit` is the loop."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.proc = Process(cfg.device)
        self.info, self.device, self.log = self.proc.info, self.proc.device, self.proc.log
        self.out = Path(cfg.out_dir)
        torch.manual_seed(cfg.seed + self.info.rank)
        self.log(self.proc.banner("pretraining"))
        self.log("resolved config:\n" + to_yaml(cfg))
        if self.info.is_main:
            out_dir.prepare(self.out)
            (self.out / "config.yaml").write_text(to_yaml(cfg))

        # ------------------------------------------------------------------ data
        self.batch = per_process_batch(cfg.optim.batch_size, self.info.world_size, cfg.optim.accumulate,
                                       "optim.batch_size")
        self.index = checked_dataset(cfg.data.path, self.info, cfg.reader.index_workers)  # read once, used thrice
        if cfg.monitor.probe and not self.index.labelled:
            raise ConfigError(f"monitor.probe: {cfg.data.path} has no class folders, and the online probe needs "
                              "labels (or --monitor.probe=false)")
        pixels = "pixpro" in cfg.model.loss  # PixPro pairs pixels by each view's crop window
        self.inputs = 4 if pixels else 2  # what a micro-batch hands the model: the views [, their windows]
        self.loader = two_view_loader(self.index, cfg.data, cfg.reader, self.batch, self.info, self.device,
                                      cfg.seed, labels=cfg.monitor.probe, windows=pixels)
        self.steps_per_epoch = self.loader.steps_per_epoch // cfg.optim.accumulate
        if self.steps_per_epoch < 1:
            raise ConfigError(f"optim.accumulate: {cfg.optim.accumulate} micro-batches exceed the "
                              f"{self.loader.steps_per_epoch} per epoch")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        self.peak_lr = scaled_lr(cfg.optim.lr, cfg.optim.batch_size)

        # ------------------------------------------------------------------ model and monitors
        self.learner = Learner(cfg, self.device, self.info)
        self.knn = knn_monitor(cfg, self.index, self.info, self.device, self.batch)
        self.probe = None
        if cfg.monitor.probe:
            self.probe = OnlineProbe(self.learner.byol.online.width, self.index.num_classes, self.device,
                                     cfg.monitor.probe_lr)
        self.step = 0
        self._side = None  # the views' side of the last epoch started (the resolution ramp)
        if self.info.is_main:
            out_dir.check_room(self.out, out_dir.state_bytes(self.learner.state_dict()))
        self.writer = Writer(str(self.out), self.info.is_main)
        self.schedule = SaveSchedule(cfg.checkpoint_minutes, self.log)
        self.saver = BackgroundWriter()  # checkpoints written off the loop's critical path
        self.resume()

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        state = {"step": self.step, **self.learner.state_dict(), "rng": ckpt.rng_state(),
                 "loader": self._loader_states(), "config": to_dict(self.cfg), "git": git_revision(),
                 "world_size": self.info.world_size}
        if self.probe:
            state["probe"] = self.probe.state_dict()
        return state

    def _loader_states(self) -> list:
        """Every rank's loader position, gathered for rank 0 to save."""
        state = self.loader.state_dict()
        if tdist.is_initialized():
            states = [None] * self.info.world_size
            tdist.all_gather_object(states, state)
            return states
        return [state]

    def save(self) -> None:
        """Snapshot the state (every rank takes part in gathering loader states) and, on rank 0, write
        it in the background: the loop pauses only for the copy to host memory."""
        state = self.state()
        if self.info.is_main:
            path, step = self.out / ckpt.LAST, self.step
            paused = self.saver.save(state, path, ckpt.PRETRAIN,
                                     on_done=lambda: self.log(f"saved {path} at step {step}"))
            self.writer.scalars({"train/checkpoint_pause_s": paused}, step)
        self.schedule.saved()

    def resume(self) -> None:
        path = self.out / ckpt.LAST
        if self.info.is_main:  # half-written checkpoints of a process killed mid-save: never read, so drop them
            for torn in self.out.glob(f".{ckpt.LAST}.*.tmp"):
                self.log(f"removing {torn}, an unfinished checkpoint write")
                torn.unlink(missing_ok=True)
        if not path.exists():
            return
        state = ckpt.load(path, ckpt.PRETRAIN)  # each field's type and shape checked there
        require(state, path, ("step", "online", "predictor", "target", "optimizer", "scaler", "rng"),
                "pretraining checkpoint")
        saved = state.get("config", {}).get("model")
        if saved and saved != to_dict(self.cfg)["model"]:
            raise ckpt.CheckpointError(f"{path} holds a different model ({saved}) from this config's "
                                       f"({to_dict(self.cfg)['model']}): use another out_dir")
        try:
            self.learner.load_state_dict(state)
            if self.probe and "probe" in state:  # a run that turns the probe on later starts it fresh
                self.probe.load_state_dict(state["probe"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise ckpt.CheckpointError(f"{path} does not fit this model: {' '.join(str(e).split())[:300]}") from None
        ckpt.set_rng_state(state["rng"])
        self.step = state["step"]
        self._resume_loader(state.get("loader") or [])
        self.log(f"resumed from {path} at step {self.step}")

    def _resume_loader(self, states: list) -> None:
        """This rank's saved position, or, saved by another number of processes, the same point of
        the same epoch in this world's data order."""
        mine = states[self.info.rank] if len(states) == self.info.world_size else None
        if isinstance(mine, dict) and "epoch" in mine and "step" in mine:  # (types checked when the file was read)
            self.loader.load_state_dict(mine)
            return
        epoch, done = divmod(self.step, self.steps_per_epoch)
        self.log(f"no loader position of this run's kind for {self.info.world_size} process(es) in the checkpoint "
                 f"(saved by {len(states)}, or by an older version): epoch {epoch} continues in this run's data order")
        self.loader.load_state_dict({"epoch": epoch, "step": done * self.cfg.optim.accumulate})

    # ------------------------------------------------------------------ the loop

    def fit(self) -> int:
        cfg = self.cfg
        self.schedule.on_signals("finishing the step, then saving")
        last_step = self.total_steps if not cfg.max_steps else min(self.total_steps, cfg.max_steps)
        self.log(f"{self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs = {self.total_steps} steps; "
                 f"global batch {cfg.optim.batch_size} ({self.batch}/process x {self.info.world_size} "
                 f"x {cfg.optim.accumulate} accumulation); peak lr {self.peak_lr:g}; precision {self.learner.amp_dtype}")
        self.learner.model.train()
        window = Window(self.device)
        stream = self._batches()
        while self.step < last_step:
            if self.step % self.steps_per_epoch == 0:
                self._announce_side(self.step // self.steps_per_epoch)
            lr = lr_at(self.step, self.total_steps, self.warmup_steps, self.peak_lr)
            tau = tau_at(self.step, self.total_steps, cfg.ema.tau_base)
            with window.waiting():
                micro = [next(stream) for _ in range(cfg.optim.accumulate)]
            loss = self.learner.step([m[:self.inputs] for m in micro], lr, tau)
            self.step += 1
            ok = self.learner.ok  # decided on the device: nothing here waits for the step
            if self.probe:  # features of the last micro-batch, detached: the probe never shapes them
                self.probe.step(self.learner.last["representation"], micro[-1][-1], ok)
            window.add(loss, ok, cfg.optim.batch_size)
            epoch_end, last = self.step % self.steps_per_epoch == 0, self.step == last_step
            if self.knn and ((epoch_end and (self.step // self.steps_per_epoch) % cfg.monitor.knn_every == 0) or last):
                self._knn()
            if window.steps == cfg.log_every or epoch_end or last:
                self._check_skips()
                self._report(window, last_step)  # host sync: reads the loss
            save, stop = self.schedule.poll(epoch_end, last)
            if save:
                self._check_skips()  # never save the state of a run that has diverged
                self.save()
            if stop:
                self.schedule.close()
                self.saver.close()  # the checkpoint is on disk before the exit status says so
                self.log(f"stopped at step {self.step}; run the same command to resume")
                return PREEMPTED_EXIT
        self.schedule.close()
        self.saver.close()
        self.writer.close()
        self.log(f"done: {self.step} steps")
        return 0

    def _announce_side(self, epoch: int) -> None:
        """With a resolution ramp, a line whenever an epoch's views change size (and at the first)."""
        side = self.cfg.data.size_at(epoch)
        if self.cfg.data.start_image_size and side != self._side:
            self.log(f"epoch {epoch}: views of {side} px (resolution ramp {self.cfg.data.start_image_size} -> "
                     f"{self.cfg.data.image_size} px over epochs {self.cfg.data.ramp_start_epoch}-"
                     f"{self.cfg.data.ramp_end_epoch})")
        self._side = side

    def _steps_left(self, last_step: int) -> float:
        """Steps to ``last_step``, in units of the steps the progress window just timed: under a
        resolution ramp a step costs about its pixels, so a step of a later, larger epoch counts
        (its side / the timed side)^2. Called after a step (``self.step`` >= 1)."""
        data = self.cfg.data
        if not data.start_image_size:
            return float(last_step - self.step)
        timed = data.size_at((self.step - 1) // self.steps_per_epoch)  # the epoch of the last step taken
        left, step = 0.0, self.step
        while step < last_step:
            epoch = step // self.steps_per_epoch
            upto = min(last_step, (epoch + 1) * self.steps_per_epoch)
            left += (upto - step) * (data.size_at(epoch) / timed) ** 2
            step = upto
        return left

    def _knn(self) -> None:
        """kNN accuracy of the target encoder (the paper's evaluated network is the online one; the
        target is its slow average and what the monitor of DeepMind's reference reads). All ranks."""
        start = time.perf_counter()
        acc = self.knn.run(self.learner.byol.target.encoder, self.device, self.learner.amp_dtype)
        self.log(f"knn (k={self.cfg.monitor.knn_k}) at step {self.step}: top1 {acc['knn/top1']:.2f} "
                 f"top5 {acc['knn/top5']:.2f} ({time.perf_counter() - start:.1f} s)")
        self.writer.scalars(acc, self.step)

    def _check_skips(self) -> None:
        """Skipped (non-finite) steps since the last check, read from the device counters (a host sync:
        log points and saves only). A skipped step still counts (schedules stay on time); too many in
        a row end the run, at the first check after they happen (they changed nothing meanwhile)."""
        in_row, new, longest = self.learner.read_skips()
        if not new:
            return
        total = self.learner.skipped_total
        self.log(f"step {self.step}: {new} step(s) with non-finite loss or gradients skipped since the last report "
                 f"(longest run {longest} in a row, {in_row} in a row now, {total} in all)")
        self.writer.scalars({"train/skipped_steps": total}, self.step)
        if longest >= self.cfg.max_nonfinite_steps:
            raise DivergedError(
                f"{longest} non-finite steps in a row before step {self.step}: training diverged. Likely causes: a "
                f"learning rate too high for this batch (optim.lr={self.cfg.optim.lr}), fp16 overflow (try "
                f"--precision=bf16 or fp32), or bad input data. The last checkpoint ({self.out / ckpt.LAST}) is from before.")

    def _batches(self):
        """An endless stream of (view1, view2[, window1, window2][, labels]) micro-batches on the training device.

        A training epoch is ``steps_per_epoch x accumulate`` micro-batches; a loader epoch whose steps
        do not divide by ``accumulate`` has its last few read and dropped, so that training epochs and
        loader epochs stay one and the same (epoch-end saves and monitors fall on epoch boundaries)."""
        channels_last, keep = self.cfg.channels_last, self.steps_per_epoch * self.cfg.optim.accumulate
        while True:
            for view1, view2, *labels in self.loader:
                if self.loader.step > keep:
                    continue
                yield (to_device(view1, self.device, channels_last), to_device(view2, self.device, channels_last),
                       *(y.to(self.device, non_blocking=True) for y in labels))

    def _report(self, window: Window, last_step: int) -> None:
        """The progress line and its TensorBoard scalars; closes the window."""
        epoch = (self.step - 1) // self.steps_per_epoch
        lr = self.learner.optimizer.param_groups[0]["lr"]
        tau = tau_at(self.step - 1, self.total_steps, self.cfg.ema.tau_base)
        device_stats = {"train/loss": dist.all_reduce_mean(window.loss()),
                        **collapse_stats(self.learner.last["projection"]),
                        "train/pair_top1": 100.0 * pair_retrieval(self.learner.last["prediction"],
                                                                  self.learner.last["target_projection"])}
        for key in ("pixpro_loss", "positive_pairs"):  # PixPro's share of the loss, pixel pairs per image
            if key in self.learner.last:
                device_stats[f"train/{key}"] = self.learner.last[key].float()
        if "pixel_projection" in self.learner.last:  # the pixel head's collapse: every pixel of every image alike
            t = self.learner.last["pixel_projection"]
            device_stats["collapse/pixel_std_x_sqrt_d"] = collapse_stats(
                t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]))["collapse/std_x_sqrt_d"]
        # One host sync for all of them (read every log_every steps, never per step).
        stats = dict(zip(device_stats, torch.stack(list(device_stats.values())).tolist()))
        loss = stats.pop("train/loss")
        w = window.read()  # after the sync: the window's time is the GPU's
        eta_s = self._steps_left(last_step) * w["seconds_per_step"]
        extra = ""
        if "train/pixpro_loss" in stats:
            extra += (f" pixpro {stats['train/pixpro_loss']:.4f} pairs {stats['train/positive_pairs']:.1f}"
                      f" pixel_std*sqrt(d) {stats['collapse/pixel_std_x_sqrt_d']:.3f}")
        if self.probe:
            stats.update(self.probe.read())
            extra += f" probe_top1 {stats['probe/train_top1']:.1f}"
        if self.device.type == "cuda":  # reads a counter, no device sync
            stats["train/peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            extra += f" peak_mem {stats['train/peak_mem_gib']:.1f}GiB"
        self.log(f"epoch {epoch} step {self.step}/{self.total_steps} loss {loss:.4f} lr {lr:.4g} tau {tau:.5f} "
                 f"img/s {w['images_per_s']:.1f} data_wait {100 * w['data_wait']:.1f}% "
                 f"proj_std*sqrt(d) {stats['collapse/std_x_sqrt_d']:.3f} "
                 f"pair_top1 {stats['train/pair_top1']:.1f}{extra} eta {format_duration(eta_s)}")
        self.writer.scalars({"train/loss": loss, "train/lr": lr, "train/tau": tau,
                             "train/image_size": self.cfg.data.size_at(epoch),
                             "train/img_per_s": w["images_per_s"], "train/data_wait": w["data_wait"],
                             "train/eta_s": eta_s, **stats}, self.step)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m byol_fast.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (config/*.yaml); defaults are the paper's 1000-epoch run")
    args, overrides = parser.parse_known_args(argv)
    return run_cli(lambda: Run(load_config(args.config, overrides)).fit())


if __name__ == "__main__":
    sys.exit(main())
