"""Training, evaluation, loss terms, the teacher's outputs, checkpoints and distributed set-up."""
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import DistInfo, init_distributed
from .evaluate import EvalResult, evaluate
from .losses import CrossEntropyTerm, LossTerm, StepContext
from .train import Trainer, TrainConfig, TrainResult

__all__ = ["CrossEntropyTerm", "DistInfo", "EvalResult", "LossTerm", "StepContext", "TrainConfig", "TrainResult",
           "Trainer", "evaluate", "init_distributed", "load_checkpoint", "save_checkpoint"]
