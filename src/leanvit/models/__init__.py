"""leanvit's own architectures, registered in timm under the ``leanvit_`` prefix, and model creation."""
from .factory import create_model, list_models
from .reference import FMNIST_MEAN, FMNIST_STD, REFERENCE_ARCHS
from .stem import ConvStemEmbed

__all__ = ["ConvStemEmbed", "FMNIST_MEAN", "FMNIST_STD", "REFERENCE_ARCHS", "create_model", "list_models"]
