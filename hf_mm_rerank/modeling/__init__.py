"""Backbone loading, pooling and the model classes."""

from .base import AdapterModel, ModelSpec
from .bi_encoder import BiEncoder

__all__ = ["AdapterModel", "BiEncoder", "ModelSpec"]
