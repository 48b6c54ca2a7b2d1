"""``train(cfg)``: build a Trainer from the composed config, fit it, write the final model and ledger."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import OmegaConf

from amint_dist.data.device_decode import DeviceDecode
from amint_dist.data.device_transform import DeviceTransform
from amint_dist.data.transforms import data_config_for
from amint_dist.dist import main_process_holds, reduce_sum, reshard, shared_run_dir, sharded_engine
from amint_dist.io import atomic_write_text, sha256_file
from amint_dist.models import AuditableModel, ModelConfig, build_auditable_model
from amint_dist.models.init_weights import init_record
from amint_dist.records.artifacts import EMA_WEIGHTS
from amint_dist.records.ledger import ExposureLedger
from amint_dist.records.signing import Signer
from amint_dist.records.trail import AuditTrail
from amint_dist.provenance import write_provenance
from amint_dist.run_dir import claim_run_dir
from amint_dist.tb import Monitor
from amint_dist.train.accelerator import make_accelerator, resolve_precision
from amint_dist.train.artifacts import ensure_dataset, save_final_model
from amint_dist.train.checkpoint import clean_partials, latest_checkpoint, load_checkpoint, verify_checkpoint
from amint_dist.train.config import JobConfig
from amint_dist.train.elastic import layout_text, resume_point
from amint_dist.train.ema import make_ema, refuse_sharded_ema
from amint_dist.train.exposure import ExposureRecorder
from amint_dist.train.exposure_trace import ExposureTrace
from amint_dist.train.optim import make_optimizer
from amint_dist.train.precision import check_compute_dtype, compute_dtype
from amint_dist.train.preemption import StopSignals, Stopped
from amint_dist.train.resume_config import config_changes
from amint_dist.train.reporting import Reporter
from amint_dist.train.skips import SkipBudget
from amint_dist.train.state import TrainState
from amint_dist.train.streams import check_dataset_fit, make_streams, reader_layout
from amint_dist.train.trackers import start_trackers
from amint_dist.train.trainer import Trainer

log = logging.getLogger(__name__)


def train(cfg: Mapping[str, Any]) -> Path:
    """Train the audited model and its MINT head on the composed config ``cfg``; return the run directory.

    A config error (a value, the dataset's fit, a model that does not build or compute) is refused before the
    run dir is touched; from then to the run's end rank 0 holds the run dir's lock (``amint_dist.run_dir``).
    """
    config = JobConfig.from_dict(cfg)  # one line naming the key, before any process group, file or model
    with ExitStack() as held:
        accelerator = make_accelerator(config.train, config.optim)
        _refuse_sharded_compile(config, accelerator)
        refuse_sharded_ema(config.train.ema, accelerator)
        set_seed(config.train.seed)
        run_dir = shared_run_dir(accelerator, config.run.dir)
        manifest = ensure_dataset(config.data, accelerator)
        check_dataset_fit(config, manifest, accelerator.num_processes)
        model_cfg = replace(config.model, num_classes=config.model.num_classes or manifest["num_classes"])
        model, data_config = _build_model(config, model_cfg.architecture() if config.resume else model_cfg)
        memory_format = model.memory_format(config.train.channels_last, accelerator.device)
        model = model.to(memory_format=memory_format)  # before prepare: ZeRO-3 partitions what it is given
        if config.train.compile:
            model.compile()  # in place (nn.Module.compile): parameter names, checkpoints and weights stay as they are
        streams = make_streams(config, manifest, data_config, accelerator.process_index, accelerator.num_processes)
        device_transform = _device_transform(config, data_config, accelerator)  # refuses augment it cannot run
        held.enter_context(main_process_holds(accelerator, lambda: claim_run_dir(run_dir, config.resume)))
        optimizer = make_optimizer(model.param_groups(config.optim.weight_decay), config.optim)
        model, optimizer = accelerator.prepare(model, optimizer)
        ema = make_ema(config.train.ema, accelerator.unwrap_model(model), accelerator.device)
        _check_precision(config, accelerator, model, data_config["input_size"])
        trail = AuditTrail(run_dir, sha256_file(Path(config.data.root) / "splits.json"), Signer.from_env())
        state, ledger, resumed, record = _start(config, accelerator, run_dir, manifest["counts"], trail,
                                                reader_layout(streams))
        _record_start(cfg, accelerator, run_dir, trail, state, resumed, model_cfg, record)
        trace = ExposureTrace(run_dir, accelerator.process_index, state.step,
                              accelerator.num_processes) if config.train.exposure_log else None
        monitor = Monitor(run_dir, accelerator.is_main_process, resume_at=(state.step, state.epoch) if resumed else None)
        start_trackers(accelerator, config.train.log_with, run_dir, cfg, monitor)
        reporter = Reporter(monitor, SkipBudget.for_dataset(config.data.max_skip_fraction, manifest),
                            partial(reduce_sum, accelerator), accelerator.num_processes)
        with StopSignals(accelerator.num_processes) as stop:
            trainer = Trainer(config, accelerator, model, optimizer, streams, state, ExposureRecorder(ledger, trace),
                              reporter, run_dir, memory_format=memory_format, trail=trail, resumed_from=resumed,
                              stop=stop, ema=ema, device_transform=device_transform)
            trainer.fit()
        if trainer.stopped:
            _stop(trainer, stop.name())
        init = trail.start_entry().get("init", {"from": "random"}) if accelerator.is_main_process else None
        save_final_model(accelerator, model, run_dir, model_cfg, config.mint, data_config, config.data.root, manifest,
                         init, ema)
        _finish(trainer)
        return run_dir


def _device_transform(config: JobConfig, data_config: dict, accelerator: Accelerator) -> DeviceTransform | None:
    """The training step's half of the image transform under ``data.device_transform`` (else None), with the
    decode, crop and flip under ``data.decode=device``."""
    if not config.data.device_transform:
        return None
    augment, device = config.data.augment, accelerator.device
    decode = DeviceDecode(data_config, augment, device) if config.data.decode == "device" else None
    return DeviceTransform(data_config, augment, device, decode)


def _build_model(config: JobConfig, model_cfg: ModelConfig) -> tuple[AuditableModel, dict]:
    """The model and its timm data config; one dry forward, so that a model that builds but cannot compute is
    refused in one line now. On resume ``model_cfg`` is its architecture alone (the checkpoint's weights replace
    any starting weights: the pretrained file or checkpoint need not exist any more)."""
    model = build_auditable_model(model_cfg, config.mint)
    if config.train.grad_checkpointing:
        model.backbone.set_grad_checkpointing(True)  # timm honours it inside forward_intermediates too
    data_config = data_config_for(model.backbone, model_cfg.img_size, model_cfg.in_chans, config.data.transform)
    model.check_forward(data_config["input_size"])
    return model, data_config


def _check_precision(config: JobConfig, accelerator: Accelerator, model: torch.nn.Module,
                     input_size: tuple[int, ...]) -> None:
    """Log the dtype the prepared engine computes in; refuse one that ``train.precision`` did not ask for."""
    precision = resolve_precision(config.train.precision)
    dtype = compute_dtype(model, input_size, accelerator.device)
    reshard(model)
    accelerator.print(f"compute dtype: {dtype} (train.precision={config.train.precision} -> {precision})")
    check_compute_dtype(precision, dtype)


def _refuse_sharded_compile(config: JobConfig, accelerator: Accelerator) -> None:
    """torch.compile traces ZeRO-3's partitioned (empty) parameters and fails deep inside Dynamo; compiling before
    FSDP2's fully_shard is untested: say so first."""
    engine = sharded_engine(accelerator)
    if config.train.compile and engine:
        raise ValueError(f"train.compile=true is not supported under {engine} (partitioned parameters); "
                         "use ZeRO-2 or DDP, or train.compile=false")


def _start(config: JobConfig, accelerator: Accelerator, run_dir: Path, counts: Mapping[str, int],
           trail: AuditTrail, layout: dict) -> tuple[TrainState, ExposureLedger, Path | None, dict]:
    """Fresh state for a new run dir, or with ``resume`` the checkpoint's, verified against the audit trail, whose
    config must be ``config.yaml``'s but for the keys a resume may change (``train.resume_config``); at another
    world size or reader ``layout`` mid-epoch: the newest epoch-boundary checkpoint (``train.elastic``). The third
    value is the checkpoint resumed from, the fourth the resume's record for the trail (the config changes, the
    world size and layout resumed from)."""
    sizes = {split: int(n) for split, n in counts.items()}
    if not config.resume:
        return TrainState(world_size=accelerator.num_processes), ExposureLedger(sizes), None, {}
    latest = latest_checkpoint(run_dir) if config.resume == "latest" else Path(config.resume)
    if latest is None:
        raise FileNotFoundError(f"resume={config.resume}: no checkpoint under {run_dir / 'checkpoints'}")
    verify_checkpoint(accelerator, latest, trail)  # the trail checks config.yaml's sha256: the record compared next
    changes = config_changes(run_dir / "config.yaml", config)
    path = resume_point(latest, accelerator.num_processes, layout)
    accelerator.print(f"resuming from {path}")
    state, ledger, moved = load_checkpoint(accelerator, path, sizes, layout, trail if path != latest else None)
    if moved:
        world = "from_world_size" in moved
        was = ([f"world size {moved['from_world_size']}"] if world else []) + \
            ([layout_text(moved["from_layout"])] if "from_layout" in moved else [])
        now = ([f"at world size {accelerator.num_processes}"] if world else []) + \
            ([f"with {layout_text(layout)}"] if "from_layout" in moved else [])
        fate = f"; optimizer state {moved['optimizer_state']}" if world else ""
        accelerator.print(f"resumed {path.name} ({', '.join(was)}) {' '.join(now)} from epoch {state.epoch}'s "
                          f"start{fate}")
    accelerator.wait_for_everyone()  # every rank has loaded before rank 0 clears what the killed run left
    if accelerator.is_main_process:
        for stale in clean_partials(run_dir):
            log.info("removed %s (half written by an interrupted run)", stale)
    return state, ledger, path, {**moved, **({"config_changes": changes} if changes else {})}


def _record_start(cfg: Mapping[str, Any], accelerator: Accelerator, run_dir: Path, trail: AuditTrail,
                  state: TrainState, resumed: Path | None, model_cfg: ModelConfig, record: dict) -> None:
    """Rank 0: the resolved config (``cfg`` as composed, saved once), provenance (command, versions, git, host,
    time; a resume's config changes) and the trail's start entry (with the starting weights' file and sha256) or
    resume entry (with ``record``: the config changes, the world size and layout resumed from, the loaded
    parameters' sha256 and the optimizer state's fate)."""
    if not accelerator.is_main_process:
        return
    if not (run_dir / "config.yaml").exists():
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(dict(cfg))))
    write_provenance(run_dir, None if resumed is None else state.step, record.get("config_changes"))
    if resumed is None:
        trail.start(run_dir / "config.yaml", accelerator.num_processes, init=init_record(model_cfg))
    else:
        trail.append("resume", checkpoint=resumed.name, step=state.step, world_size=accelerator.num_processes,
                     **record)


def _stop(trainer: Trainer, signal_name: str) -> None:
    """After a stop signal's checkpoint: TensorBoard closed, every rank done, then :class:`Stopped`."""
    trainer.reporter.monitor.close()
    trainer.accelerator.wait_for_everyone()
    raise Stopped(f"stopped by {signal_name} at step {trainer.state.step}: checkpoint {trainer.last_checkpoint} in "
                  f"{trainer.run_dir}; resume=latest continues")


def _finish(trainer: Trainer) -> None:
    """The ledger summed over ranks (a collective), the trail's final entry, TensorBoard closed."""
    accelerator, run_dir = trainer.accelerator, trainer.run_dir
    summed = trainer.exposure.ledger.summed(partial(reduce_sum, accelerator))
    if accelerator.is_main_process:
        summed.save(run_dir / "ledger.npz")
        ema = {"ema_weights_sha256": sha256_file(run_dir / EMA_WEIGHTS)} if trainer.ema is not None else {}
        trainer.trail.append("final", checkpoint=trainer.last_checkpoint, step=trainer.state.step,
                             ledger_sha256=summed.digest(), weights_sha256=sha256_file(run_dir / "model.safetensors"),
                             model_config_sha256=sha256_file(run_dir / "model_config.json"), **ema)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # the train.log_with trackers, if any
    trainer.reporter.monitor.close()
