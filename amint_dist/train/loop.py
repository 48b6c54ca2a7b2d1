"""The aMINT training loop: members (task + MINT positives), probe (task only), external (MINT negatives)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from omegaconf import OmegaConf
from tqdm import tqdm

from amint_dist.data.pipeline import ShardedSplitStream, SplitShards, make_loader
from amint_dist.data.transforms import data_config_for, make_transform
from amint_dist.config_checks import check_dataset_fit, check_train_config, read_batches
from amint_dist.dist import main_process_holds, make_accelerator, reduce_sum, shared_run_dir
from amint_dist.io import atomic_write_text, sha256_file
from amint_dist.models import build_auditable_model
from amint_dist.run_dir import claim_run_dir
from amint_dist.provenance import write_provenance
from amint_dist.tb import Monitor
from amint_dist.train.artifacts import ensure_dataset, save_final_model
from amint_dist.train.batches import CyclingBatches, combine, skipped_entries
from amint_dist.train.exposure_trace import ExposureTrace
from amint_dist.records.signing import Signer
from amint_dist.records.trail import AuditTrail
from amint_dist.train.checkpoint import (clean_partials, latest_checkpoint, load_checkpoint, load_rank_state,
                                         save_checkpoint)
from amint_dist.records.ledger import ExposureLedger
from amint_dist.train.negatives import shifted_batch
from amint_dist.train.optim import make_optimizer
from amint_dist.train.losses import LossCombiner, LossParts, mint_loss, task_loss
from amint_dist.train.schedule import lr_at
from amint_dist.train.skips import SkipBudget
from amint_dist.train.state import TrainState
from amint_dist.train.stats import StepStats

log = logging.getLogger(__name__)
MODEL_MINT_KEYS = ("mode", "taps", "head")


def train(cfg: Mapping[str, Any]) -> Path:
    """Train the audited model and its MINT head; return the run directory.

    A config error (a value, the dataset's fit, a model that does not build or compute) is refused before the
    run dir is touched; from then to the run's end rank 0 holds the run dir's lock (``amint_dist.run_dir``).
    """
    with ExitStack() as held:
        return _train(cfg, held)


def _train(cfg: Mapping[str, Any], held: ExitStack) -> Path:
    """``train``, the run dir's lock going on ``held``."""
    tcfg, mcfg = cfg["train"], cfg["mint"]
    check_train_config(cfg)  # one line naming the key, before any process group, file or model
    _refuse_sample_mixing(tcfg)
    accelerator = make_accelerator(tcfg, cfg["optim"])
    _refuse_compile_under_zero3(tcfg, accelerator)
    set_seed(int(tcfg["seed"]))
    run_dir = shared_run_dir(accelerator, cfg["run"]["dir"])
    manifest = ensure_dataset(cfg["data"], accelerator)
    check_dataset_fit(cfg, manifest, accelerator.num_processes)
    model_cfg = {**cfg["model"], "num_classes": cfg["model"].get("num_classes") or manifest["num_classes"]}
    model = build_auditable_model(model_cfg, {k: mcfg[k] for k in MODEL_MINT_KEYS if k in mcfg})
    data_config = data_config_for(model.backbone, int(model_cfg["img_size"]), cfg["data"].get("transform"))
    model.check_forward(data_config["input_size"])  # a model that builds but cannot compute: one line, now
    memory_format = model.memory_format(tcfg["channels_last"], accelerator.device)
    model = model.to(memory_format=memory_format)  # before prepare: ZeRO-3 partitions what it is given
    if tcfg["compile"]:
        model.compile()  # in place (nn.Module.compile): parameter names, checkpoints and weights stay as they are
    streams = _make_streams(cfg, manifest, data_config, accelerator)
    held.enter_context(main_process_holds(accelerator, lambda: claim_run_dir(run_dir, cfg.get("resume"))))
    optimizer = make_optimizer(model.param_groups(float(cfg["optim"]["weight_decay"])), cfg["optim"])
    model, optimizer = accelerator.prepare(model, optimizer)
    sizes = {s: int(n) for s, n in manifest["counts"].items()}
    trail = AuditTrail(run_dir, sha256_file(Path(str(cfg["data"]["root"])) / "splits.json"), Signer.from_env())
    state, ledger, resumed = _start(cfg, accelerator, run_dir, sizes, trail)
    if accelerator.is_main_process:
        if not (run_dir / "config.yaml").exists():
            atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(dict(cfg))))
        write_provenance(run_dir, None if resumed is None else state.step)  # command, versions, git, host, time
        if resumed is None:
            trail.start(run_dir / "config.yaml", accelerator.num_processes)
        else:
            trail.append("resume", checkpoint=resumed.name, step=state.step, world_size=accelerator.num_processes)
    monitor = Monitor(run_dir, accelerator.is_main_process, resume_at=(state.step, state.epoch) if resumed else None)
    loop = _Loop(cfg, accelerator, model, optimizer, streams, state, ledger, monitor)
    if tcfg.get("exposure_log"):
        loop.exposure_log = ExposureTrace(run_dir, accelerator.process_index, state.step)
    loop.skip_budget = SkipBudget.for_dataset(float(cfg["data"].get("max_skip_fraction", 0.01)), manifest)
    loop.trail = trail
    loop.memory_format = memory_format
    if resumed is not None:
        loop.resumed_from(resumed)
    loop.run(run_dir)
    save_final_model(accelerator, model, run_dir, model_cfg, mcfg, data_config, cfg["data"]["root"], manifest)
    summed = loop.ledger.summed(lambda t: reduce_sum(accelerator, t))  # a collective: every rank
    if accelerator.is_main_process:
        summed.save(run_dir / "ledger.npz")
        trail.append("final", checkpoint=loop.last_checkpoint, step=loop.state.step, ledger_sha256=summed.digest(),
                     weights_sha256=sha256_file(run_dir / "model.safetensors"),
                     model_config_sha256=sha256_file(run_dir / "model_config.json"))
    accelerator.wait_for_everyone()
    loop.monitor.close()
    return run_dir


def _refuse_compile_under_zero3(tcfg: Mapping, accelerator: Accelerator) -> None:
    """torch.compile traces ZeRO-3's partitioned (empty) parameters and fails deep inside Dynamo: say so first."""
    plugin = accelerator.state.deepspeed_plugin
    if tcfg["compile"] and plugin is not None and plugin.zero_stage == 3:
        raise ValueError("train.compile=true is not supported under DeepSpeed ZeRO-3 (partitioned parameters); "
                         "use ZeRO-2 or DDP, or train.compile=false")


def _refuse_sample_mixing(tcfg: Mapping) -> None:
    """Refuse mixup/cutmix: a blended member is no sample the ledger or the audit can name."""
    mixing = {k: float(tcfg.get(k) or 0.0) for k in ("mixup", "cutmix")}
    if any(mixing.values()):
        raise ValueError(f"train.mixup={mixing['mixup']}, train.cutmix={mixing['cutmix']}: batch mixing is refused, "
                         "members must stay identifiable (see docs/distributed.md, 'Mixup and CutMix'); set both to 0")


def _start(cfg: Mapping, accelerator: Accelerator, run_dir: Path, sizes: dict[str, int],
           trail: AuditTrail) -> tuple[TrainState, ExposureLedger, Path | None]:
    """Fresh state for a new run dir, or (verified against the audit trail) the latest checkpoint's with
    ``resume=latest``; the third value is the checkpoint resumed from."""
    resume = cfg.get("resume")
    if resume:
        path = latest_checkpoint(run_dir) if resume == "latest" else Path(resume)
        if path is None:
            raise FileNotFoundError(f"resume={resume}: no checkpoint under {run_dir / 'checkpoints'}")
        accelerator.print(f"resuming from {path}")
        state, ledger = load_checkpoint(accelerator, path, sizes, trail)
        accelerator.wait_for_everyone()  # every rank has loaded before rank 0 clears what the killed run left
        if accelerator.is_main_process:
            for stale in clean_partials(run_dir):
                log.info("removed %s (half written by an interrupted run)", stale)
        return state, ledger, path
    return TrainState(world_size=accelerator.num_processes), ExposureLedger(sizes), None


def _make_streams(cfg: Mapping, manifest: Mapping, data_config: dict, accelerator: Accelerator) -> dict[str, ShardedSplitStream]:
    """Member, probe and external streams for this rank; probe batch sized to keep pace with members."""
    dcfg, tcfg = cfg["data"], cfg["train"]
    counts = manifest["counts"]
    mint_on = cfg["mint"]["mode"] != "off"
    sizes = read_batches(cfg, counts)
    needed = ["members"] + (["external"] if mint_on else [])
    empty = [split for split in needed if not counts[split]]
    if empty:
        raise ValueError(f"split {empty[0]!r} of {dcfg['root']} is empty: training needs members"
                         + (" and external MINT negatives" if mint_on else ""))
    image_shape = tuple(data_config["input_size"])
    transform = make_transform(data_config, dcfg.get("augment"))
    return {
        split: ShardedSplitStream(
            SplitShards.from_root(dcfg["root"], split), transform, image_shape, n,
            rank=accelerator.process_index, world=accelerator.num_processes, workers=int(dcfg["workers"]),
            seed=int(tcfg["seed"]), shuffle=True, shuffle_buffer=int(dcfg["shuffle_buffer"]),
            num_classes=int(manifest["num_classes"]), max_pixels=int(dcfg["max_pixels"]),
        )
        for split, n in sizes.items()
        if n > 0 and counts[split] > 0
    }


class _Loop:
    """One training run's mutable parts, stepped epoch by epoch."""

    def __init__(self, cfg, accelerator, model, optimizer, streams, state, ledger, monitor):
        self.cfg, self.accelerator, self.model, self.optimizer = cfg, accelerator, model, optimizer
        self.streams, self.state, self.ledger, self.monitor = streams, state, ledger, monitor
        tcfg, ocfg, mcfg = cfg["train"], cfg["optim"], cfg["mint"]
        self.accum = int(tcfg["grad_accum"])
        self.epochs = int(tcfg["epochs"])
        self.total_steps = sum(len(self._members_epoch(e)) for e in range(self.epochs)) // self.accum
        if int(tcfg.get("max_steps") or 0) > 0:
            self.total_steps = min(self.total_steps, int(tcfg["max_steps"]))
        steps_per_epoch = max(1, len(streams["members"]) // self.accum)
        self.warmup = round(float(ocfg["warmup_epochs"]) * steps_per_epoch)
        self.mint_on = cfg["mint"]["mode"] != "off"
        self.shifts = {"members": int(mcfg.get("member_shift", 0)), "external": int(mcfg.get("external_shift", 0))}
        self.losses = LossCombiner(float(mcfg["task_weight"]), float(mcfg["weight"]), bool(mcfg["normalize"]))
        if state.loss_norms:
            self.losses.set_norms(*state.loss_norms)
        self.cycling = {s: CyclingBatches(st, *state.cursors.get(s, [0, 0])) for s, st in streams.items() if s != "members"}
        self.window, self.epoch_stats = StepStats(), StepStats()
        self.pending_skips: list[tuple[str, str]] = []  # this rank's skipped samples not yet merged
        self.exposure_log: ExposureTrace | None = None  # train() opens it with train.exposure_log
        self.skip_budget = SkipBudget(1.0)  # train() sets data.max_skip_fraction's
        self.memory_format = torch.contiguous_format  # train() sets train.channels_last's
        self.trail: AuditTrail | None = None
        self.ckpt_due = False  # a step checkpoint is due (deferred past the epoch's end when the step ends it)
        self.saved_at: tuple[int, int, int] | None = None  # position of the last checkpoint written or loaded
        self.last_checkpoint: str | None = None

    def resumed_from(self, path: Path) -> None:
        """Continue from checkpoint ``path``: its position and this rank's running statistics."""
        self.saved_at, self.last_checkpoint = self._position(), path.name
        saved = load_rank_state(path, self.accelerator.process_index)
        if saved.get("world_size") == self.accelerator.num_processes:
            self.window.load_sums(saved["window"])
            self.epoch_stats.load_sums(saved["epoch"])

    def _position(self) -> tuple[int, int, int]:
        return self.state.step, self.state.epoch, self.state.batch_in_epoch

    def _epoch_over(self) -> bool:
        return self.state.batch_in_epoch >= len(self._members_epoch(self.state.epoch))

    def _members_epoch(self, epoch: int) -> range:
        stream = self.streams["members"]
        return range(stream.batches_per_reader(epoch) * stream.readers // self.accum * self.accum)

    def run(self, run_dir: Path) -> None:
        with tqdm(total=self.total_steps, initial=self.state.step, disable=not self.accelerator.is_main_process,
                  desc="train", dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0) as bar:
            self._train_epochs(run_dir, bar)  # the bar ends its line even when training raises
        self._checkpoint(run_dir)
        if self.exposure_log:
            self.exposure_log.close()

    def _train_epochs(self, run_dir: Path, bar: tqdm) -> None:
        tcfg = self.cfg["train"]
        members = self.streams["members"]
        members.set_epoch(self.state.epoch, self.state.batch_in_epoch)  # then epoch after epoch, read ahead
        batches = iter(make_loader(members, pin_memory=torch.cuda.is_available(), endless=True))
        while self.state.epoch < self.epochs and not self._done():
            for _ in range(len(self._members_epoch(self.state.epoch)) - self.state.batch_in_epoch):
                if self._done():
                    break
                stepped = self._micro_step(batches)
                self.state.batch_in_epoch += 1
                if not stepped:
                    continue
                bar.update(1)
                if self.state.step % int(tcfg["log_every"]) == 0:
                    self._log_window()
                if int(tcfg["ckpt_every_steps"]) and self.state.step % int(tcfg["ckpt_every_steps"]) == 0:
                    self.ckpt_due = True
                if self.ckpt_due and not self._epoch_over():  # else after the epoch's end: no step is split
                    self._checkpoint(run_dir)
            if self._epoch_over():
                whole = members.batches_per_reader(self.state.epoch) * members.readers
                for _ in range(whole - len(self._members_epoch(self.state.epoch))):
                    next(batches)  # the epoch's last batches, short of a whole grad_accum group: not trained on
                self._end_epoch(run_dir)

    def _done(self) -> bool:
        return self.state.step >= self.total_steps

    def _micro_step(self, member_batches) -> bool:
        """One member micro-batch (+ probe + external); True when it completed an optimizer step."""
        waited = time.perf_counter()
        parts = {"members": next(member_batches)}
        parts.update({split: c.next() for split, c in self.cycling.items()})
        started = time.perf_counter()
        if self.mint_on and any(self.shifts.values()):
            gen = torch.Generator().manual_seed(hash((int(self.cfg["train"]["seed"]), self.state.step,
                                                      self.state.batch_in_epoch, self.accelerator.process_index)))
            parts.update({f"{split}_shifted": shifted_batch(parts[split], shift, gen)
                          for split, shift in self.shifts.items() if shift})
        batch = combine(parts, self.accelerator.device, self.memory_format)
        with self.accelerator.accumulate(self.model):
            for group in self.optimizer.param_groups:  # before backward: DeepSpeed steps inside accelerator.backward
                group["lr"] = self._lr()
            logits, mint_logit = self.model(batch["image"])
            loss_parts = LossParts(
                task_loss(logits, batch["label"], batch["task_mask"], float(self.cfg["train"]["label_smoothing"])),
                mint_loss(mint_logit, batch["is_member"], batch["mint_mask"], float(self.cfg["mint"]["member_weight"]))
                if self.mint_on else None,
            )
            if self.losses.norms is None:
                self._set_norms(loss_parts)
            self.accelerator.backward(self.losses(loss_parts))
            if self.accelerator.sync_gradients and float(self.cfg["optim"]["clip_grad"]) > 0:
                self.accelerator.clip_grad_norm_(self.model.parameters(), float(self.cfg["optim"]["clip_grad"]))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        for split, b in parts.items():
            if split not in self.ledger.counts:
                continue
            self.ledger.record(split, b["index"], b["valid"])
            if self.exposure_log:
                self.exposure_log.record(self.state.step, split, b)
        self.pending_skips.extend(skipped_entries(parts))
        for stats in (self.window, self.epoch_stats):
            stats.add(batch, logits.detach(), None if mint_logit is None else mint_logit.detach(), loss_parts,
                      data_wait=started - waited, step_time=time.perf_counter() - waited)
        if not self.accelerator.sync_gradients:
            return False
        self.state.step += 1
        self.state.cursors = {s: c.cursor() for s, c in self.cycling.items()}
        return True

    def _lr(self) -> float:
        ocfg = self.cfg["optim"]
        return lr_at(self.state.step, self.total_steps, float(ocfg["lr"]), self.warmup, float(ocfg["min_lr"]))

    def _set_norms(self, parts: LossParts) -> None:
        values = torch.tensor([parts.task.item(), parts.mint.item() if parts.mint is not None else 1.0], dtype=torch.float64)
        mean = reduce_sum(self.accelerator, values) / self.accelerator.num_processes
        self.losses.set_norms(*mean.tolist())
        self.state.loss_norms = list(self.losses.norms)

    def _log_window(self) -> None:
        self._merge_skips()
        summary = self.window.reduce(lambda t: reduce_sum(self.accelerator, t))
        summary["train/lr"] = self._lr()
        self.monitor.scalars(summary, self.state.step)
        members, external = self.window.mint_scores()
        self.monitor.histogram("train/mint_score_members", members, self.state.step)
        self.monitor.histogram("train/mint_score_external", external, self.state.step)
        self.window = StepStats()

    def _end_epoch(self, run_dir: Path) -> None:
        summary = self.epoch_stats.reduce(lambda t: reduce_sum(self.accelerator, t))
        self._merge_skips(epoch_end=True)
        self.monitor.epoch_line({"epoch": self.state.epoch, "step": self.state.step, "lr": self._lr(),
                                 **{k.split("/", 1)[1]: round(v, 6) for k, v in summary.items()},
                                 "skipped": dict(self.state.skipped), "skipped_keys": self.state.epoch_skipped,
                                 "exposures_this_rank": self.ledger.total()})
        self.epoch_stats = StepStats()
        self.state.epoch += 1
        self.state.batch_in_epoch = 0
        self.state.epoch_skipped = []
        every = int(self.cfg["train"]["ckpt_every_epochs"])
        if (every and self.state.epoch % every == 0 or self.ckpt_due) and self.state.epoch < self.epochs:
            self._checkpoint(run_dir)

    def _merge_skips(self, epoch_end: bool = False) -> None:
        """Gather every rank's new skips (a collective) into the shared state (counts, this epoch's keys) and
        TensorBoard; every rank stops together when ``data.max_skip_fraction`` is exceeded."""
        mine = (self.pending_skips, sum(self.ledger.total().values()))
        gathered = gather_object([mine]) if self.accelerator.num_processes > 1 else [mine]
        self.pending_skips = []
        entries = [(str(what), str(reason)) for skips, _ in gathered for what, reason in skips]
        self.state.add_skips(entries)
        skipped = sum(self.state.skipped.values())
        read = skipped + sum(consumed for _, consumed in gathered)
        if entries:
            self.monitor.scalars({**{f"data/skipped/{r}": n for r, n in self.state.skipped.items()},
                                  "data/skipped_fraction": skipped / max(read, 1)}, self.state.step)
        self.skip_budget.check(self.state.skipped, read, epoch_end, self.state.epoch_skipped)

    def _checkpoint(self, run_dir: Path) -> None:
        self.ckpt_due = False
        if self._position() == self.saved_at:
            return  # this very position is saved already (a run that ended on a checkpoint step, or a no-op resume)
        self._merge_skips()
        if self.exposure_log:
            self.exposure_log.sync()  # first: every step a checkpoint covers is in the trace
        self.state.cursors = {s: c.cursor() for s, c in self.cycling.items()}
        rank_state = {"world_size": self.accelerator.num_processes, "window": self.window.sums_dict(),
                      "epoch": self.epoch_stats.sums_dict()}
        path = save_checkpoint(self.accelerator, run_dir, self.state, self.ledger,
                               int(self.cfg["train"]["keep_checkpoints"]), model=self.model, trail=self.trail,
                               rank_state=rank_state)
        self.saved_at, self.last_checkpoint = self._position(), path.name
