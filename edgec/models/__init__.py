"""Model intake (teacher loaders) and students. Imports torch: not for the device side."""

from .intake import ModelKind, describe, load_model

__all__ = ["ModelKind", "describe", "load_model"]
