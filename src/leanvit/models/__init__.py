"""leanvit's own architectures, registered in timm under the ``leanvit_`` prefix, and model creation."""
from .cnn import CNN_ARCHS
from .factory import create_model, list_models
from .reference import FMNIST_MEAN, FMNIST_STD, REFERENCE_ARCHS
from .shuffle import ChannelShuffleBlock, channel_shuffle, write_channels
from .shuffle_zoo import SHUFFLE_ARCHS, VANILLA_ARCHS, ShuffleArch
from .stem import ConvStemEmbed

__all__ = ["CNN_ARCHS", "SHUFFLE_ARCHS", "VANILLA_ARCHS", "ChannelShuffleBlock", "ConvStemEmbed", "FMNIST_MEAN",
           "FMNIST_STD", "REFERENCE_ARCHS", "ShuffleArch", "channel_shuffle", "create_model", "list_models",
           "write_channels"]
