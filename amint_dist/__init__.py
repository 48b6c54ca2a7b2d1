"""amint-dist: train auditable vision models with active Membership Inference Test (aMINT)."""

__version__ = "0.1.0"
