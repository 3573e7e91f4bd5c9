"""Backbone loading, pooling and the model classes."""

from .base import AdapterModel
from .bi_encoder import BiEncoder
from .cross_encoder import CrossEncoder
from .multi_vector import MultiVectorEncoder
from .options import LoadOptions
from .spec import ModelSpec

__all__ = ["AdapterModel", "BiEncoder", "CrossEncoder", "LoadOptions", "ModelSpec", "MultiVectorEncoder"]
