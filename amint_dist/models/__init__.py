"""amint_dist.models: timm backbone + MINT head as one auditable module."""

from .auditable import AuditableModel, build_auditable_model, model_from_record
from .config import MintConfig, ModelConfig
from .taps import resolve_taps

__all__ = ["AuditableModel", "MintConfig", "ModelConfig", "build_auditable_model", "model_from_record",
           "resolve_taps"]
