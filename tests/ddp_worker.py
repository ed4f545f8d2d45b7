"""``leanvit train`` under torchrun, instrumented for tests/test_ddp.py (not a test module itself).

Usage: torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py train ARGS...

Before the Trainer wraps the model in DDP, ranks other than 0 perturb their copy of the weights (so the test sees
that DDP really starts every rank from rank 0's weights) and each rank saves what it starts from to
``OUTPUT/init_rank{R}.safetensors``. After ``fit`` every rank saves its final weights to
``OUTPUT/rank{R}.safetensors`` and the indices its sampler drew in epoch 0 to ``OUTPUT/rank{R}.json``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from leanvit.cli.main import main
from leanvit.io import save_weights
from leanvit.engine.train import Trainer

_init, _fit = Trainer.__init__, Trainer.fit


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def patched_init(self, model, train_set, val_set, cfg, output, *args, **kwargs):
    rank = _rank()
    if rank > 0:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * rank)
    save_weights(model, Path(output) / f"init_rank{rank}.safetensors")
    _init(self, model, train_set, val_set, cfg, output, *args, **kwargs)


def patched_fit(self):
    result = _fit(self)
    rank = self.dist.rank
    save_weights(self.model, self.output / f"rank{rank}.safetensors")
    self.sampler.set_epoch(0)
    info = {"rank": rank, "world_size": self.dist.world_size, "steps_per_epoch": self.steps_per_epoch,
            "train_len": len(self.train_set), "batch_size": self.cfg.batch_size,
            "indices": [int(i) for i in self.sampler], "step": self.step}
    (self.output / f"rank{rank}.json").write_text(json.dumps(info))
    return result


Trainer.__init__ = patched_init
Trainer.fit = patched_fit

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
