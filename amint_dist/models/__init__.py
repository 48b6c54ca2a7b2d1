"""amint_dist.models: timm backbone + MINT head as one auditable module."""

from .auditable import AuditableModel, build_auditable_model
from .taps import resolve_taps

__all__ = ["AuditableModel", "build_auditable_model", "resolve_taps"]
