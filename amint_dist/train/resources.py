"""Peak memory and the gradient norm, read at log steps only (each read may sync the host with the device)."""

from __future__ import annotations

import resource

import torch


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak memory in GiB: ``torch.cuda.max_memory_allocated`` on CUDA, else peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def resource_scalars(device: torch.device, grad_norm: torch.Tensor | float | None) -> dict[str, float]:
    """TensorBoard scalars: peak memory and (when the engine gave one) the last optimizer step's gradient norm."""
    scalars = {"train/peak_memory_gib": peak_memory_gib(device)}
    if grad_norm is not None:
        scalars["train/grad_norm"] = float(grad_norm)
    return scalars
