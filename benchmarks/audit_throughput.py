"""Audit scoring vs a forward-only loop of the same model: samples/s, alternated A/B/A/B in one process.

Scoring: ``amint_dist.audit.scoring.score_split`` with the model the audit scores with (backbone + the
aMINT head and a passive head stacked, one backbone pass; ``audit.run._mint_heads``), computing keys,
indices, labels, correctness, the four logit baselines and both heads' probabilities per sample.
Forward-only: the same module's ``model(images)`` in eval/no-grad over the same batches from the same
DataLoader, nothing kept. ``backbone_only`` (the plain timm forward, no taps, no heads) is reported too:
the cost of a plain evaluation pass. Batches are synthetic in-memory tensors served through
``make_loader`` (data loading is benchmarked by data_throughput.py).

    python benchmarks/audit_throughput.py
    python benchmarks/audit_throughput.py --models vit_digits vit_small --batches 8 --rounds 8
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch.utils.data import IterableDataset

from _record import alternate, record, set_threads, verdict
from amint_dist.audit.scoring import StackedHeads, score_split
from amint_dist.data.pipeline import make_loader
from amint_dist.models import AuditableModel, build_auditable_model
from train_throughput import MODELS, compose_cfg


class MemoryStream(IterableDataset):
    """Prepared reader-like batches, served like a ShardedSplitStream with ``workers=0``."""

    workers = 0

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def make_batches(n: int, batch: int, shape, num_classes: int, gen: torch.Generator) -> list[dict]:
    out = []
    for b in range(n):
        index = torch.arange(b * batch, (b + 1) * batch)
        out.append({"image": torch.randn((batch, *shape), generator=gen),
                    "label": torch.randint(0, num_classes, (batch,), generator=gen),
                    "index": index, "valid": torch.ones(batch, dtype=torch.bool),
                    "key": [f"s{i}" for i in index.tolist()], "skipped": []})
    return out


def bench_model(name: str, args) -> dict:
    overrides, num_classes, _ = MODELS[name]
    overrides = [*overrides, f"model.num_classes={num_classes}", *args.override]
    if name == "vit_small":
        overrides.append(f"model.img_size={args.small_img_size}")
    cfg = compose_cfg(overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    audited = build_auditable_model(cfg.model, cfg.mint).eval()
    scorer = AuditableModel(audited.backbone, StackedHeads([audited.mint_head, copy.deepcopy(audited.mint_head)]),
                            audited.taps, "passive").to(device).eval()
    names = ["amint", "passive"]
    shape = (cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
    stream = MemoryStream(make_batches(args.batches, args.batch_size, shape, num_classes, torch.Generator().manual_seed(0)))
    samples = args.batches * args.batch_size
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)  # noqa: E731

    def scoring() -> int:
        columns, _ = score_split(scorer, stream, names, device, autocast)
        sync()
        return len(columns["key"])

    @torch.no_grad()
    def forward_only(module) -> int:
        module.eval()
        n = 0
        for batch in make_loader(stream):
            valid = batch["valid"]
            with autocast():
                module(batch["image"][valid].to(device))
            n += int(valid.sum())
        sync()
        return n

    sides = {"forward_only": lambda: forward_only(scorer), "scoring": scoring,
             "backbone_only": lambda: forward_only(scorer.backbone)}
    for side in sides.values():
        side()
    result = alternate(sides, args.rounds)
    return {
        "model": name,
        "timm_name": cfg.model.name,
        "img_size": shape[1],
        "heads": names,
        "head": cfg.mint.head.record(),
        "batch_size": args.batch_size,
        "samples_per_block": samples,
        "device": str(device),
        "bf16": args.bf16,
        **result,
        **verdict(result, "forward_only", "scoring", 0.90, "scoring_over_forward_only"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, choices=list(MODELS))
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: the CPU count)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--batches", type=int, default=8, help="batches per timed block")
    p.add_argument("--batch-size", type=int, default=256, help="configs/audit.yaml audit.batch_size")
    p.add_argument("--small-img-size", type=int, default=64)
    p.add_argument("--bf16", action="store_true", help="audit.precision=bf16 (autocast)")
    p.add_argument("override", nargs="*", help="extra Hydra overrides (e.g. mint.head.kind=token)")
    args = p.parse_args()
    threads = set_threads(args.threads)
    models = args.models or (["vit_digits", "vit_small"] + (["vit_b16"] if torch.cuda.is_available() else []))
    for name in models:
        record("audit_throughput", {"threads": threads, **bench_model(name, args)})


if __name__ == "__main__":
    main()
