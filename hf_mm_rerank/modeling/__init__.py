"""Backbone loading, pooling and the model classes."""

from .base import AdapterModel, ModelSpec
from .bi_encoder import BiEncoder
from .cross_encoder import CrossEncoder

__all__ = ["AdapterModel", "BiEncoder", "CrossEncoder", "ModelSpec"]
