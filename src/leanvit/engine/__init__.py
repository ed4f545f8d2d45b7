"""Training, evaluation, checkpoints and distributed set-up."""
from .checkpoint import load_checkpoint, load_into, load_weights, save_checkpoint, save_weights
from .distributed import DistInfo, init_distributed
from .evaluate import EvalResult, evaluate
from .losses import CrossEntropyTerm, LossTerm, StepContext
from .train import Trainer, TrainConfig, TrainResult

__all__ = ["CrossEntropyTerm", "DistInfo", "EvalResult", "LogitKDTerm", "LossTerm", "StepContext", "TrainConfig",
           "TrainResult", "Trainer", "evaluate", "init_distributed", "load_checkpoint", "load_into", "load_weights",
           "save_checkpoint", "save_weights"]


def __getattr__(name: str):
    # LogitKDTerm moved to leanvit.distill (which imports the engine); read lazily to avoid an import cycle
    if name == "LogitKDTerm":
        from ..distill import LogitKDTerm

        return LogitKDTerm
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
