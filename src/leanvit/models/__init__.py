"""leanvit's own architectures, registered in timm under the ``leanvit_`` prefix, and model creation; also the
model-side pieces that training reads (pooled and per-block features, distillation projectors)."""
from . import cnn, reference  # noqa: F401  (register the reference ViTs and the CNN teacher in timm)
from .factory import create_model, list_models
from .shuffle import ChannelShuffleBlock, channel_shuffle, write_channels
from .shuffle_zoo import SHUFFLE_ARCHS, VANILLA_ARCHS, ShuffleArch

__all__ = ["SHUFFLE_ARCHS", "VANILLA_ARCHS", "ChannelShuffleBlock", "ShuffleArch", "channel_shuffle", "create_model",
           "list_models", "write_channels"]
