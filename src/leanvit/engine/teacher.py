"""Teacher outputs kept on disk and reused by later runs that train on the same batches.

Every distillation step runs the frozen teacher on the step's augmented batch. Random crops and flips mean that
one image's teacher output cannot serve the next epoch, but runs that share the seed, the data and the recipe (a
method sweep, ``kd`` against ``kd-proj``, PEFD's number of projectors) see bit-identical batches, so the outputs one
run computed serve the others: the teacher's forward is paid once per sweep instead of once per run. For the
reference pair a step that reads the cache takes 0.49x the time of one that runs the teacher (2-core CPU,
``benchmarks/distill_cost.py``).

Outputs are stored under a hash of the batch itself (its bytes, shape and dtype, and whether autocast was on) and
of the teacher's weights, never under a step number: a run whose batches differ in any way (another seed, batch
size, augmentation, mixup, world size) misses and computes the teacher, so a hit is exact by construction. Entries
are grouped in one safetensors file per epoch and process (``DIR/<teacher hash>/epoch0003_rank0.safetensors``),
written atomically at each checkpoint and at the end of the epoch, so a reader holds one epoch in memory and a run
killed at any moment leaves either the previous file or the new one. An unreadable file is reported and ignored
(the teacher is run instead, and the file rewritten).

Written by hand: no library caches a frozen model's outputs by input content across processes; the storage is
safetensors.

    leanvit distill ... --teacher-cache runs/teacher_cache     # the first run fills it, later ones read it
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch
from torch import nn


def teacher_fingerprint(teacher: nn.Module) -> str:
    """A hex digest of the teacher's class and every tensor of its ``state_dict`` (names, shapes, dtypes, values)."""
    h = hashlib.blake2b(type(teacher).__qualname__.encode(), digest_size=12)
    for name, t in teacher.state_dict().items():
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def batch_key(images: torch.Tensor) -> str:
    """A hex digest of a batch: its bytes, shape and dtype, and whether autocast is on for its device."""
    t = images.detach().contiguous().cpu()
    try:
        amp = torch.is_autocast_enabled(images.device.type)
    except TypeError:  # torch < 2.4 takes no device type
        amp = torch.is_autocast_cpu_enabled() if images.device.type == "cpu" else torch.is_autocast_enabled()
    h = hashlib.blake2b(f"{tuple(t.shape)}:{t.dtype}:{amp}".encode(), digest_size=16)
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class TeacherCache:
    """Teacher ``(pre_logits, logits)`` per batch, on disk under ``root``, for one teacher.

    The trainer calls :meth:`begin_epoch` when an epoch starts, :meth:`lookup` / :meth:`store` in each step
    (through :meth:`leanvit.engine.losses.StepContext.teacher_outputs`) and :meth:`flush` at each checkpoint.

    Attributes:
        dir: the folder of this teacher's entries.
        hits, misses: lookups of the current epoch that found an entry, and that did not.
    """

    def __init__(self, root: str | os.PathLike, teacher: nn.Module, rank: int = 0):
        self.dir = Path(root) / teacher_fingerprint(teacher)
        self.rank = rank
        self.epoch: int | None = None
        self.hits = self.misses = 0
        self._stored: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._new: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def path(self, epoch: int) -> Path:
        return self.dir / f"epoch{epoch:04d}_rank{self.rank}.safetensors"

    def begin_epoch(self, epoch: int) -> None:
        """Write what the previous epoch added, then load this epoch's file if there is one."""
        self.flush()
        self.epoch, self.hits, self.misses = epoch, 0, 0
        self._stored = self._load(self.path(epoch))

    def lookup(self, key: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        entry = self._new.get(key) or self._stored.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        return entry[0].to(device), entry[1].to(device)

    def store(self, key: str, pre: torch.Tensor, logits: torch.Tensor) -> None:
        if self.epoch is not None:
            self._new[key] = (pre.detach().cpu(), logits.detach().cpu())

    @property
    def hit_rate(self) -> float:
        """Fraction of this epoch's lookups that found an entry (0 before any lookup)."""
        return self.hits / max(self.hits + self.misses, 1)

    def flush(self) -> None:
        """Write this epoch's file with the new entries added (atomically); nothing when there are none."""
        if self.epoch is None or not self._new:
            return
        from safetensors.torch import save

        from ..io import atomic_write

        self._stored.update(self._new)
        self._new = {}
        tensors = {}
        for key, (pre, logits) in self._stored.items():
            tensors[f"{key}.pre"] = pre.contiguous()
            tensors[f"{key}.logits"] = logits.contiguous()
        data = save(tensors)
        atomic_write(self.path(self.epoch), lambda f: f.write(data))

    @staticmethod
    def _load(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if not path.exists():
            return {}
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
            keys = {name.rsplit(".", 1)[0] for name in tensors}
            return {k: (tensors[f"{k}.pre"], tensors[f"{k}.logits"]) for k in keys}
        except Exception as e:  # any unreadable or incomplete file: compute the teacher instead
            warnings.warn(f"ignoring the unreadable teacher cache {path} ({type(e).__name__}: {e}); the teacher "
                          f"is run for this epoch and the file rewritten", stacklevel=2)
            return {}
