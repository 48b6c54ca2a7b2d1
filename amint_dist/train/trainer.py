"""The aMINT Trainer: members (task + MINT positives), probe (task only), external (MINT negatives).

``Trainer.step(parts)`` is one micro-batch (forward, backward and, every ``train.grad_accum`` micro-batches,
an optimizer step through ``accelerator.accumulate``); ``Trainer.fit()`` runs the epochs around it: it
fetches the batches, steps, logs, checkpoints and ends the run's last epoch.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from timm.utils.model_ema import ModelEmaV3
from tqdm import tqdm

from amint_dist.data.device_transform import DeviceTransform
from amint_dist.data.pipeline import ShardedSplitStream, make_loader
from amint_dist.dist import mean_over_ranks, reduce_sum, reshard, tensors_sha256
from amint_dist.records.trail import AuditTrail
from amint_dist.train.balancer import Famo
from amint_dist.train.batches import SHIFTED, CyclingBatches, combine
from amint_dist.train.checkpoint import load_rank_state, save_checkpoint
from amint_dist.train.config import JobConfig
from amint_dist.train.ema import EMA_CHECKPOINT_FILE, ema_file_bytes, load_ema
from amint_dist.train.exposure import ExposureRecorder
from amint_dist.train.losses import LossCombiner, LossParts, mint_loss, task_loss
from amint_dist.train.negatives import negatives_generator, shifted_batch
from amint_dist.train.preemption import StopSignals
from amint_dist.train.reporting import Reporter
from amint_dist.train.resources import resource_scalars
from amint_dist.train.schedule import lr_at
from amint_dist.train.state import TrainState
from amint_dist.train.streams import positive_splits, reader_layout


@dataclass
class StepOutput:
    """One micro-step: its losses (detached, on the device: reading them syncs) and whether it completed an
    optimizer step."""

    task_loss: torch.Tensor
    mint_loss: torch.Tensor | None
    stepped: bool


class Trainer:
    """One training run's parts, built whole: config, engine (accelerator, prepared model and optimizer), data
    (this rank's split streams), position (state), exposure, reporting, run dir and audit trail."""

    def __init__(self, config: JobConfig, accelerator: Accelerator, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, streams: Mapping[str, ShardedSplitStream], state: TrainState,
                 exposure: ExposureRecorder, reporter: Reporter, run_dir: Path, *,
                 memory_format: torch.memory_format = torch.contiguous_format, trail: AuditTrail | None = None,
                 resumed_from: Path | None = None, stop: StopSignals | None = None, ema: ModelEmaV3 | None = None,
                 device_transform: DeviceTransform | None = None):
        """``resumed_from``: the checkpoint ``state`` was loaded from (its position counts as saved; this rank's
        running statistics and EMA weights continue from it). ``stop``: checked at every optimizer step; once the
        ranks agree, the step is checkpointed and :meth:`fit` returns early with ``stopped`` set. ``ema``: updated
        after every optimizer step (``train.ema``). ``device_transform`` (``data.device_transform``): the streams
        ship uint8 images; every split's batch is augmented and normalised on the device first."""
        self.config, self.accelerator, self.model, self.optimizer = config, accelerator, model, optimizer
        self.ema, self._unwrapped = ema, accelerator.unwrap_model(model)
        self.device_transform = device_transform
        self.streams, self.state, self.exposure, self.reporter = streams, state, exposure, reporter
        self.run_dir, self.memory_format, self.trail, self.stop = run_dir, memory_format, trail, stop
        self.stopped = False
        self.positives = positive_splits(config)  # task + MINT-positive splits: members, or a reference run's pool
        self.grad_norm: torch.Tensor | float | None = None  # the last optimizer step's (under DeepSpeed: a float)
        tcfg = config.train
        self.total_steps = tcfg.epochs * self._trained_batches() // tcfg.grad_accum  # the LR schedule's length
        # where the run stops: train.max_steps stops it early and leaves the schedule alone (a resume may move it)
        self.end_step = min(self.total_steps, tcfg.max_steps) if tcfg.max_steps > 0 else self.total_steps
        state.layout = reader_layout(streams)  # saved with every checkpoint (``train.elastic``)
        if state.schedule_shift is None:  # resumed at another world size: schedule as if always at this one
            state.schedule_shift = state.epoch * self._trained_batches() // tcfg.grad_accum - state.step
        steps_per_epoch = max(1, len(streams["members"]) // tcfg.grad_accum)
        self.warmup = round(config.optim.warmup_epochs * steps_per_epoch)
        mcfg = config.mint
        self.famo = Famo(mcfg.task_weight, mcfg.weight, mcfg.famo_lr, mcfg.famo_weight_decay,
                         partial(mean_over_ranks, accelerator), accelerator.device) if mcfg.famo else None
        self.losses = self.famo or LossCombiner(mcfg.task_weight, mcfg.weight, mcfg.normalize)
        if state.loss_norms and self.famo is None:
            self.losses.set_norms(*state.loss_norms)
        self._cycling = {s: CyclingBatches(st, *state.cursors.get(s, [0, 0]))
                         for s, st in streams.items() if s != "members"}
        self.ckpt_due = False  # a step checkpoint is due (deferred past the epoch's end when the step ends it)
        self.saved_at: tuple[int, int, int] | None = None  # position of the last checkpoint written or loaded
        self.last_checkpoint: str | None = None
        if resumed_from is not None:
            self.saved_at, self.last_checkpoint = self._position(), resumed_from.name
            reporter.load_rank_state(load_rank_state(resumed_from, accelerator.process_index))
            if ema is not None:
                load_ema(ema, resumed_from)
            if self.famo is not None:
                if state.balancer is None:
                    raise ValueError(f"{resumed_from.name} holds no FAMO state: it was saved with mint.balancer=fixed; "
                                     "resume with mint.balancer=fixed, or start a new run")
                self.famo.load_state_dict(state.balancer)

    # ---- one micro-step ----

    def fetch(self, member_batches: Iterator[dict]) -> dict[str, dict]:
        """The next member batch and the probe and external batches that go with it."""
        return {"members": next(member_batches), **{split: c.next() for split, c in self._cycling.items()}}

    def on_device(self, parts: Mapping[str, dict]) -> dict[str, dict]:
        """``parts`` with their uint8 images (``data.decode=device``: encoded bytes, decoded and cropped first)
        augmented and normalised on the device (``data.device_transform``), seeded by the run's seed, the
        position, the rank and the split: a resumed run draws the same."""
        if self.device_transform is None:
            return dict(parts)
        seed = f"amint-device:{self.config.train.seed}:{self.state.epoch}:{self.state.batch_in_epoch}:" \
               f"{self.accelerator.process_index}"
        return {split: self.device_transform.apply(b, f"{seed}:{split}") for split, b in parts.items()}

    def with_negatives(self, parts: Mapping[str, dict]) -> dict[str, dict]:
        """``parts`` plus shifted and perturbed copies (``mint.member_shift`` / ``external_shift`` /
        ``member_perturb``), seeded by the position."""
        mcfg = self.config.mint
        shifts = mcfg.shifts(self.positives)
        if not shifts:
            return dict(parts)
        gen = negatives_generator(self.config.train.seed, self.state.step, self.state.batch_in_epoch,
                                  self.accelerator.process_index)
        return {**parts, **{f"{split}{SHIFTED}": shifted_batch(parts[split], shift, gen,
                                                               mcfg.member_perturb if split in self.positives else None)
                            for split, shift in shifts.items()}}

    def step(self, parts: Mapping[str, dict], data_wait: float = 0.0) -> StepOutput:
        """One micro-batch of ``parts`` (split -> reader batch): negatives, forward/backward/optimizer, exposure
        and statistics; ``data_wait`` (seconds spent fetching ``parts``) goes to the statistics."""
        started = time.perf_counter()
        parts = self.with_negatives(self.on_device(parts))  # negatives: shifted copies of the augmented images
        batch = combine(parts, self.accelerator.device, self.memory_format, self.positives)
        logits, mint_logit, losses = self._forward_backward(batch)
        self.exposure.record(self.state.step, parts)
        self.reporter.note_skips(parts)
        self.reporter.add(batch, logits.detach(), None if mint_logit is None else mint_logit.detach(), losses,
                          data_wait=data_wait, step_time=data_wait + time.perf_counter() - started)
        stepped = self.accelerator.sync_gradients
        if stepped:
            self.state.step += 1
            self.state.cursors = self._cursors()
            if self.ema is not None:  # timm's step-based decay: the first step copies the weights
                self.ema.update(self._unwrapped, step=self.state.step)
        return StepOutput(losses.task.detach(), None if losses.mint is None else losses.mint.detach(), stepped)

    def _forward_backward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None, LossParts]:
        """Forward, the weighted loss's backward, clipping and the optimizer, through ``accelerator.accumulate``."""
        clip = self.config.optim.clip_grad
        with self.accelerator.accumulate(self.model):
            for group in self.optimizer.param_groups:  # before backward: DeepSpeed steps inside accelerator.backward
                group["lr"] = self.lr()
            logits, mint_logit = self.model(batch["image"])
            losses = self._losses(batch, logits, mint_logit)
            if self.losses.norms is None:
                self._set_norms(losses)
            self.accelerator.backward(self.losses(losses))
            if self.accelerator.sync_gradients:  # clip=0: max_norm inf, the norm alone (grads times 1.0)
                self.grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), clip or math.inf)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.famo is not None and self.accelerator.sync_gradients:
            self.famo.update(self._remeasured(batch))
        return logits, mint_logit, losses

    @torch.no_grad()
    def _remeasured(self, batch: dict) -> LossParts:
        """The losses of ``batch`` with the updated model (FAMO's delta), in training mode like the losses they are
        compared with; the model's buffers (BatchNorm statistics) are put back and FSDP2's gathered parameters
        freed: the measurement leaves no trace."""
        buffers = [b.clone() for b in self._unwrapped.buffers()]
        losses = self._losses(batch, *self.model(batch["image"]))
        for buffer, saved in zip(self._unwrapped.buffers(), buffers):
            buffer.copy_(saved)
        reshard(self.model)
        return losses

    def _losses(self, batch: dict, logits: torch.Tensor, mint_logit: torch.Tensor | None) -> LossParts:
        tcfg, mcfg = self.config.train, self.config.mint
        return LossParts(
            task_loss(logits, batch["label"], batch["task_mask"], tcfg.label_smoothing),
            mint_loss(mint_logit, batch["is_member"], batch["mint_mask"], mcfg.member_weight, mcfg.focal_gamma,
                      mcfg.hard_negatives.fraction, mcfg.hard_negatives.weight) if mcfg.on else None,
        )

    def lr(self) -> float:
        """The learning rate of the next optimizer step."""
        ocfg = self.config.optim
        return lr_at(self.schedule_step(), self.total_steps, ocfg.lr, self.warmup, ocfg.min_lr)

    def _set_norms(self, parts: LossParts) -> None:
        values = torch.tensor([parts.task.item(), parts.mint.item() if parts.mint is not None else 1.0], dtype=torch.float64)
        mean = reduce_sum(self.accelerator, values) / self.accelerator.num_processes
        self.losses.set_norms(*mean.tolist())
        self.state.loss_norms = list(self.losses.norms)

    def _cursors(self) -> dict[str, list[int]]:
        return {s: c.cursor() for s, c in self._cycling.items()}

    # ---- the epochs ----

    def fit(self) -> None:
        """Train to ``train.epochs`` (or ``train.max_steps``), checkpoint the end and close the exposure trace."""
        with tqdm(total=self.end_step, initial=self.schedule_step(), disable=not self.accelerator.is_main_process,
                  desc="train", dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0) as bar:
            self._epochs(bar)  # the bar ends its line even when training raises
        self.checkpoint()
        self.exposure.close()

    def _epochs(self, bar: tqdm) -> None:
        members = self.streams["members"]
        members.set_epoch(self.state.epoch, self.state.batch_in_epoch)  # then epoch after epoch, read ahead
        batches = iter(make_loader(members, pin_memory=torch.cuda.is_available(), endless=True))
        while self.state.epoch < self.config.train.epochs and not self.done():
            for _ in range(self._trained_batches() - self.state.batch_in_epoch):
                if self.done():
                    break
                waited = time.perf_counter()
                parts = self.fetch(batches)
                out = self.step(parts, data_wait=time.perf_counter() - waited)
                self.state.batch_in_epoch += 1
                if out.stepped:
                    self._after_optimizer_step(bar)
            if self._epoch_over():
                for _ in range(len(members) - self._trained_batches()):
                    next(batches)  # the epoch's last batches, short of a whole grad_accum group: not trained on
                self._end_epoch()

    def _after_optimizer_step(self, bar: tqdm) -> None:
        """Progress, TensorBoard every ``train.log_every`` steps, checkpoints every ``train.ckpt_every_steps`` and
        when a stop signal is agreed on."""
        tcfg = self.config.train
        bar.update(1)
        if self.state.step % tcfg.log_every == 0:
            local = resource_scalars(self.accelerator.device, self.grad_norm) | (self.famo.scalars() if self.famo else {})
            summary = self.reporter.log_window(self.state, self.exposure.ledger, self.lr(), local)
            bar.set_postfix({k.split("/")[1]: f"{summary[k]:.4f}" for k in ("train/task_loss", "train/mint_loss")
                             if k in summary}, refresh=False)
        if tcfg.ckpt_every_steps and self.state.step % tcfg.ckpt_every_steps == 0:
            self.ckpt_due = True
        if self.stop is not None and not self.done() and self.stop.agreed():  # the same answer on every rank
            self.stopped = self.ckpt_due = True
        if self.ckpt_due and not self._epoch_over():  # else after the epoch's end: no step is split
            self.checkpoint()

    def done(self) -> bool:
        return self.stopped or self.schedule_step() >= self.end_step

    def schedule_step(self) -> int:
        """The step of an uninterrupted run at this world size (``TrainState.schedule_shift``)."""
        return self.state.step + self.state.schedule_shift

    def _position(self) -> tuple[int, int, int]:
        return self.state.step, self.state.epoch, self.state.batch_in_epoch

    def _epoch_over(self) -> bool:
        return self.state.batch_in_epoch >= self._trained_batches()

    def _trained_batches(self) -> int:
        """Member batches of an epoch trained on: whole ``grad_accum`` groups."""
        return len(self.streams["members"]) // self.config.train.grad_accum * self.config.train.grad_accum

    def _end_epoch(self) -> None:
        self.reporter.end_epoch(self.state, self.exposure.ledger, self.lr())
        self.state.epoch += 1
        self.state.batch_in_epoch = 0
        self.state.epoch_skipped = []
        every = self.config.train.ckpt_every_epochs
        if (every and self.state.epoch % every == 0 or self.ckpt_due) and self.state.epoch < self.config.train.epochs:
            self.checkpoint()

    # ---- checkpoints ----

    def checkpoint(self) -> None:
        """Save the position (unless saved already): every rank's share, recorded in the audit trail."""
        self.ckpt_due = False
        if self._position() == self.saved_at:
            return  # this very position is saved already (a run that ended on a checkpoint step, or a no-op resume)
        self.reporter.merge_skips(self.state, self.exposure.ledger)
        self.exposure.sync()  # first: every step a checkpoint covers is in the trace
        self.state.cursors = self._cursors()
        self.state.balancer = self.famo.state_dict() if self.famo else None
        path = save_checkpoint(self.accelerator, self.run_dir, self.state, self.exposure.ledger,
                               self.config.train.keep_checkpoints, model=self.model, trail=self.trail,
                               rank_state=self.reporter.rank_state(), agree=self._agree(),
                               files={EMA_CHECKPOINT_FILE: partial(ema_file_bytes, self.ema)} if self.ema else None)
        self.saved_at, self.last_checkpoint = self._position(), path.name

    def _agree(self) -> dict:
        """State beyond the parameters that every rank must hold alike (checked with each checkpoint). Buffers
        (BatchNorm statistics) differ between DDP ranks, the model's as the EMA's: rank 0's are saved."""
        agree = {"ema_param_sha256": tensors_sha256(self.ema.module.named_parameters())[0]} if self.ema else {}
        return {**agree, **({"famo_logits": self.state.balancer["logits"]} if self.famo else {})}
