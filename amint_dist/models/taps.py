"""Tap selection: which of a timm model's `forward_intermediates` outputs the MINT head reads.

A tap index is exactly what timm's `forward_intermediates(x, indices=...)` accepts for that
model (ViT: block index; CNNs: stem/stage index). timm keeps `model.feature_info` aligned with
those intermediates (one entry per index, with its `num_chs`), so its length is the count of
valid taps for every family that implements `forward_intermediates`.
"""

from collections.abc import Sequence

from torch import nn

PRESETS = ("entry", "middle", "output")


def num_intermediates(model: nn.Module) -> int:
    """Number of maps `model.forward_intermediates` can return."""
    info = getattr(model, "feature_info", None)
    if not hasattr(model, "forward_intermediates") or not info:
        raise ValueError(f"{type(model).__name__} has no forward_intermediates/feature_info: cannot tap it")
    return len(info)


def preset_indices(preset: str, n: int) -> list[int]:
    """Indices of `preset` for a model with `n` intermediates (entry: first two, middle: the two
    around the centre, output: the last one)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown tap preset {preset!r}; valid presets: {', '.join(PRESETS)} (or a list of indices)")
    mid = (n - 1) // 2
    wanted = {"entry": (0, 1), "middle": (mid, mid + 1), "output": (n - 1,)}[preset]
    return sorted({min(i, n - 1) for i in wanted})


def _normalise(indices: Sequence[int], n: int) -> list[int]:
    if not indices:
        raise ValueError("taps: empty index list")
    taken = []
    for i in indices:
        if not isinstance(i, int) or isinstance(i, bool):
            raise ValueError(f"tap index {i!r} is not an int")
        idx = i + n if i < 0 else i
        if not 0 <= idx < n:
            raise ValueError(f"tap index {i} out of range: valid are {-n}..{n - 1} ({n} intermediates)")
        if idx in taken:
            raise ValueError(f"tap index {i} repeats index {idx}")
        taken.append(idx)
    # forward_intermediates returns maps in forward order whatever order indices are given in
    return sorted(taken)


def resolve_taps(model: nn.Module, taps: str | Sequence[int]) -> list[int]:
    """Absolute, sorted tap indices for `model` from a preset name or a list of (maybe negative) ints."""
    n = num_intermediates(model)
    if isinstance(taps, str):
        return preset_indices(taps, n)
    return _normalise(list(taps), n)


def block_class_names(model: nn.Module) -> list[str]:
    """Class names of the blocks behind `model.feature_info` (FSDP's sharding units): each entry's module, or
    for a plain container stage (a ResNet layer) the blocks inside it; modules without parameters are skipped."""
    names: list[str] = []
    for info in model.feature_info:
        module = model.get_submodule(info["module"])
        parts = list(module.children()) if type(module) in (nn.Sequential, nn.ModuleList) else [module]
        names += [type(m).__name__ for m in parts if any(True for _ in m.parameters())]
    return list(dict.fromkeys(names))
