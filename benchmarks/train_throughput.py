"""aMINT training vs a plain timm training loop: samples/s, alternated A/B/A/B in one process.

aMINT side: the real ``amint_dist.train.trainer.Trainer.step`` (shifted negatives, combine, AuditableModel forward with taps
and MINT head, task + MINT losses, Accelerate backward/clip/step, exposure ledger, step statistics) on
member + probe + external batches of the configured sizes. Plain side: the same timm backbone (built by
the same factory, same seed) trained on the very same rows with cross-entropy, the same AdamW parameter
groups, clipping and Accelerator. Both read synthetic in-memory tensors (data loading is excluded; see
data_throughput.py). Only valid rows count; every row is valid here.

    python benchmarks/train_throughput.py                               # the default models on CPU
    python benchmarks/train_throughput.py --models vit_digits --rounds 10 --threads 2
    python benchmarks/train_throughput.py --decompose                   # + loop with mint.mode=off

Also reported: the forward FLOPs of backbone and MINT head (torch FlopCounterMode) and the ratio they allow.

Models: ``vit_digits`` (configs/model/vit_digits.yaml at its img_size), ``vit_small`` (vit_small_patch16_224
at --small-img-size on CPU), ``vit_b16`` (vit_base_patch16_224 at 224; default only when CUDA is present).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from _record import REPO, RESULTS, alternate, record, set_threads, verdict
from amint_dist.cli import to_dict
from amint_dist.train.accelerator import make_accelerator
from amint_dist.models import build_auditable_model
from amint_dist.models.backbone import create_backbone
from amint_dist.records.ledger import ExposureLedger
from amint_dist.tb import Monitor
from amint_dist.train.config import JobConfig
from amint_dist.train.exposure import ExposureRecorder
from amint_dist.train.optim import make_optimizer
from amint_dist.train.reporting import Reporter
from amint_dist.train.skips import SkipBudget
from amint_dist.train.state import TrainState
from amint_dist.train.streams import read_batches
from amint_dist.train.trainer import Trainer

# split sizes of the ledger (ImageNet-1k-like for the bigger models; the digits root's for the default)
DIGITS_SIZES = {"members": 784, "probe": 174, "external": 451, "heldout": 388}
IMAGENET_SIZES = {"members": 640_000, "probe": 128_000, "external": 256_000, "heldout": 256_000}
IMAGENET_RECIPE = ["experiment=vit_b16_imagenet", "data.root=unused", "train.precision=auto"]
MODELS = {
    # name: (hydra overrides, num_classes, ledger sizes); the default experiment (configs/train.yaml) for
    # vit_digits, the ImageNet recipe (token head on blocks 4, 8, 12) for the ImageNet-sized backbones
    "vit_digits": ([], 10, DIGITS_SIZES),
    "vit_small": ([*IMAGENET_RECIPE, "model.name=vit_small_patch16_224"], 1000, IMAGENET_SIZES),
    "vit_b16": (IMAGENET_RECIPE, 1000, IMAGENET_SIZES),
}
CPU_BATCH = {"vit_small": 32}  # members per step on CPU (the recipe's 128 per GPU is minutes per step here)


def compose_cfg(overrides: list[str]) -> JobConfig:
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return JobConfig.from_dict(to_dict(compose("train", overrides=overrides)))


class _FakeStream:
    """What ``Trainer.__init__`` asks of a stream (its epoch length and reader layout); no data behind it."""

    readers = 1  # one in-process reader per rank

    def __init__(self, batches: int, batch_size: int):
        self._batches, self.batch_size = batches, batch_size

    def __len__(self) -> int:
        return self._batches


def synthetic_batches(sizes: dict[str, int], split_sizes: dict[str, int], image_shape, num_classes: int,
                      count: int, gen: torch.Generator) -> list[dict[str, dict]]:
    """``count`` step inputs: per split a reader-like batch (image, label, index, valid, key, skipped)."""
    steps = []
    for _ in range(count):
        parts = {}
        for split, n in sizes.items():
            index = torch.randint(0, split_sizes[split], (n,), generator=gen)
            parts[split] = {
                "image": torch.randn((n, *image_shape), generator=gen),
                "label": torch.randint(0, num_classes, (n,), generator=gen),
                "index": index,
                "valid": torch.ones(n, dtype=torch.bool),
                "key": [f"{split}_{i}" for i in index.tolist()],
                "skipped": [],
            }
        steps.append(parts)
    return steps


def _joined(batches: list[dict], split_size: int) -> dict:
    """One reader-like batch of several (so a mode-off step can forward as many rows as an aMINT step);
    indices wrapped into the split the joined batch stands for."""
    out = {k: (sum((b[k] for b in batches), []) if isinstance(batches[0][k], list) else torch.cat([b[k] for b in batches]))
           for k in batches[0]}
    out["index"] = out["index"] % split_size
    return out


def step_sizes(cfg: JobConfig, split_sizes: dict[str, int]) -> dict[str, int]:
    """Rows per split per step, as training sizes them (``train.streams.read_batches``)."""
    return {s: n for s, n in read_batches(cfg, split_sizes).items() if n > 0}


def shifted_parts(cfg: JobConfig) -> list[str]:
    """Splits whose copies the trainer adds as MINT negatives (mint.member_shift / external_shift / member_perturb)."""
    return list(cfg.mint.shifts())


def forward_rows(cfg: JobConfig, parts: dict[str, dict]) -> int:
    """Rows one aMINT micro-step forwards: every part's rows plus the shifted copies."""
    return sum(len(b["label"]) for b in parts.values()) + sum(len(parts[s]["label"]) for s in shifted_parts(cfg) if s in parts)


def optimizer_for(groups, cfg: JobConfig, before: bool) -> torch.optim.Optimizer:
    """The trainer's optimizer (amint_dist.train.optim), or with ``before`` the one the loop built before the
    performance work (torch's default AdamW kernels)."""
    if before:
        return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas)
    return make_optimizer(groups, cfg.optim)


def as_before(model) -> None:
    """Undo the head change of the performance work: plain AdaptiveAvgPool2d in conv heads (same numbers)."""
    for module in model.modules():
        if isinstance(module, torch.nn.AdaptiveAvgPool2d):
            module.__class__ = torch.nn.AdaptiveAvgPool2d


def make_amint_side(cfg: JobConfig, accelerator, steps, split_sizes, run_dir: Path, sync, before: bool = False,
                    compiled: bool = False):
    """A Trainer stepping through prepared batches; returns the timed-block callable and the trainer."""
    torch.manual_seed(0)
    model = build_auditable_model(cfg.model, cfg.mint)
    if before:
        as_before(model)
    memory_format = model.memory_format(cfg.train.channels_last, accelerator.device)  # as training does
    model = model.to(memory_format=memory_format)
    optimizer = optimizer_for(model.param_groups(cfg.optim.weight_decay), cfg, before)
    if compiled:
        model.compile()  # as training does for train.compile=true
    model, optimizer = accelerator.prepare(model, optimizer)
    streams = {s: _FakeStream(10**6, len(b["label"])) for s, b in steps[0].items()}
    reporter = Reporter(Monitor(run_dir, False), SkipBudget(1.0), lambda t: t, 1)
    trainer = Trainer(cfg, accelerator, model, optimizer, streams, TrainState(),
                      ExposureRecorder(ExposureLedger(split_sizes)), reporter, run_dir, memory_format=memory_format)
    inputs = itertools.cycle(steps)
    rows = forward_rows(cfg, steps[0])

    def block(n_steps: int) -> int:
        for _ in range(n_steps):
            trainer.step(next(inputs))
        sync()
        return rows * n_steps

    return block, trainer


def make_plain_side(cfg, accelerator, steps, sync, before: bool = False, compiled: bool = False):
    """timm backbone, cross-entropy on the same rows, same optimizer groups, clipping and Accelerator."""
    torch.manual_seed(0)
    model = create_backbone(cfg.model.name, cfg.model.num_classes, cfg.model.img_size, cfg.model.in_chans,
                            cfg.model.kwargs)
    from timm.optim import param_groups_weight_decay

    groups = param_groups_weight_decay(model, cfg.optim.weight_decay,
                                       no_weight_decay_list=getattr(model, "no_weight_decay", set)())
    optimizer = optimizer_for(groups, cfg, before)
    if compiled:
        model.compile()  # as training does for train.compile=true
    model, optimizer = accelerator.prepare(model, optimizer)
    extra = shifted_parts(cfg)  # the plain loop forwards as many rows as the aMINT step (copies stand in)
    inputs = [(torch.cat([b["image"] for b in st.values()] + [st[x]["image"] for x in extra if x in st]),
               torch.cat([b["label"] for b in st.values()] + [st[x]["label"] for x in extra if x in st])) for st in steps]
    if torch.cuda.is_available():
        inputs = [(images.pin_memory(), labels.pin_memory()) for images, labels in inputs]
    cycle = itertools.cycle(inputs)
    clip, smoothing, lr = cfg.optim.clip_grad, cfg.train.label_smoothing, cfg.optim.lr

    def block(n_steps: int) -> int:
        rows = 0
        for _ in range(n_steps):
            images, labels = next(cycle)
            images, labels = images.to(accelerator.device, non_blocking=True), labels.to(accelerator.device, non_blocking=True)
            with accelerator.accumulate(model):
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss = F.cross_entropy(model(images), labels, label_smoothing=smoothing)
                accelerator.backward(loss)
                if accelerator.sync_gradients and clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            rows += len(labels)
        sync()
        return rows

    return block


def forward_flops(model: torch.nn.Module, images: torch.Tensor) -> dict:
    """Forward FLOPs per row of the aMINT model (torch's FlopCounterMode), split into backbone and MINT head.
    Training costs ~3x the forward on both sides alike, so ``backbone / total`` is the ratio to the plain
    loop that the head's arithmetic alone allows (the ceiling of ``ratio_amint_over_plain``)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    per_module = {k.rsplit(".", 1)[-1]: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    total, head = counter.get_total_flops(), per_module.get("mint_head", 0)
    rows = len(images)
    head_params = sum(p.numel() for p in model.mint_head.parameters()) if model.mint_head is not None else 0
    return {"backbone_params": sum(p.numel() for p in model.backbone.parameters()), "head_params": head_params,"total_per_row_mflops": round(total / rows / 1e6, 3), "head_per_row_mflops": round(head / rows / 1e6, 3),
            "head_share": round(head / total, 4), "ceiling_ratio_to_plain": round((total - head) / total, 4)}


def bench_model(name: str, args, accelerator_cache: dict) -> dict:
    overrides, num_classes, split_sizes = MODELS[name]
    overrides = [*overrides, f"model.num_classes={num_classes}", *args.override]
    if name == "vit_small":
        overrides.append(f"model.img_size={args.small_img_size}")
    cuda = torch.cuda.is_available()
    if args.batch_size or (name in CPU_BATCH and not cuda):
        overrides.append(f"train.batch_size={args.batch_size or CPU_BATCH[name]}")
    cfg = compose_cfg(overrides)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if "acc" not in accelerator_cache:
        accelerator_cache["acc"] = make_accelerator(cfg.train, cfg.optim)
    accelerator = accelerator_cache["acc"]
    sizes = step_sizes(cfg, split_sizes)
    image_shape = (cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
    steps = synthetic_batches(sizes, split_sizes, image_shape, num_classes, 4, torch.Generator().manual_seed(0))
    if cuda:  # as the training loaders deliver them on CUDA (pin_memory)
        steps = [{s: {**b, "image": b["image"].pin_memory(), "label": b["label"].pin_memory()} for s, b in st.items()}
                 for st in steps]
    run_dir = Path(args.tmp) / name
    run_dir.mkdir(parents=True, exist_ok=True)

    amint, amint_trainer = make_amint_side(cfg, accelerator, steps, split_sizes, run_dir, sync)
    plain = make_plain_side(cfg, accelerator, steps, sync)
    sides = {"plain": plain, "amint": amint}
    if args.decompose:  # the loop without the MINT head, on as many rows (external rows stand in for the
        # shifted copies): splits aMINT's cost into loop machinery and head
        off_cfg = compose_cfg([*overrides, "mint.mode=off"])
        off_steps = [{**st, "external": _joined([st["external"], *(st[x] for x in shifted_parts(cfg))],
                                                split_sizes["external"])} for st in steps]
        sides["loop_mint_off"], _ = make_amint_side(off_cfg, accelerator, off_steps, split_sizes, run_dir, sync)
    if args.before:  # the code before the performance work (docs/performance.md), in the same alternation
        sides["plain_before"] = make_plain_side(cfg, accelerator, steps, sync, before=True)
        sides["amint_before"], _ = make_amint_side(cfg, accelerator, steps, split_sizes, run_dir, sync, before=True)
    if args.compile:  # torch.compile (inductor) on both models; compilation happens in the warm-up
        sides["plain_compiled"] = make_plain_side(cfg, accelerator, steps, sync, compiled=True)
        sides["amint_compiled"], _ = make_amint_side(cfg, accelerator, steps, split_sizes, run_dir, sync, compiled=True)
    for block in sides.values():  # warm-up (first-step loss normalisers, allocator, kernels)
        block(args.warmup)
    result = alternate({k: (lambda b=b: b(args.steps)) for k, b in sides.items()}, args.rounds)
    target = verdict(result, "plain", "amint", 0.95, "amint_over_plain")
    ratio = target["ratio_amint_over_plain"]
    ledger_total = sum(amint_trainer.exposure.ledger.total().values())
    flops = forward_flops(accelerator.unwrap_model(amint_trainer.model), steps[0]["members"]["image"].to(accelerator.device))
    rows, samples = forward_rows(cfg, steps[0]), sum(sizes.values())
    return {
        "model": name,
        "timm_name": cfg.model.name,
        "img_size": cfg.model.img_size,
        "mint": {**cfg.mint.model_record(), "member_shift": cfg.mint.member_shift,
                 "external_shift": cfg.mint.external_shift},
        "dataset_rows_per_step": sizes,
        "forward_rows_per_step": rows,
        "batch_note": "both sides forward the same rows: members + probe + external, plus the shifted copies "
                      "the recipe adds as MINT negatives (the plain side gets unshifted copies); rates are rows/s",
        "steps_per_block": args.steps,
        "device": str(accelerator.device),
        "precision": accelerator.mixed_precision,
        **result,
        **target,
        "forward_flops": flops,
        "ratio_over_flop_ceiling": round(ratio / flops["ceiling_ratio_to_plain"], 4),
        "dataset_samples_per_s_amint": round(result["samples_per_s"]["amint"] * samples / rows, 2),
        "ratio_dataset_samples_vs_plain_on_dataset_rows": round(ratio * samples / rows, 4),
        "ledger_exposures_recorded": ledger_total,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, choices=list(MODELS),
                   help="default: vit_digits vit_small on CPU, + vit_b16 with CUDA")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: the CPU count)")
    p.add_argument("--rounds", type=int, default=8, help="A/B rounds (each side runs once per round)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per timed block")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    p.add_argument("--small-img-size", type=int, default=64, help="vit_small resolution on CPU")
    p.add_argument("--batch-size", type=int, default=None,
                   help="members per step (default: the config's; vit_small on CPU: 32)")
    p.add_argument("--decompose", action="store_true", help="also time the loop with mint.mode=off")
    p.add_argument("--before", action="store_true",
                   help="also time both sides as they were before the performance work (default AdamW, plain pooling)")
    p.add_argument("--compile", action="store_true", help="also time both sides under torch.compile")
    p.add_argument("--tmp", default="/tmp/amint_bench_train")
    p.add_argument("--results", type=Path, default=RESULTS, help="the JSON-lines file results are appended to")
    p.add_argument("override", nargs="*", help="extra Hydra overrides for both sides (e.g. mint.head.channels=32)")
    args = p.parse_args()
    threads = set_threads(args.threads)
    models = args.models or (["vit_digits", "vit_small"] + (["vit_b16"] if torch.cuda.is_available() else []))
    cache: dict = {}
    for name in models:
        record("train_throughput", {"threads": threads, **bench_model(name, args, cache)}, args.results)


if __name__ == "__main__":
    main()
