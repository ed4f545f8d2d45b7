"""The training loop: AdamW, warmup + cosine, label smoothing, mixup/cutmix, EMA, clipping, AMP on CUDA, DDP,
atomic per-epoch checkpoints and exact resume.

Exact resume: every epoch starts by seeding torch's RNG from ``(seed, epoch, rank)`` and the sampler from
``(seed, epoch)``, and a checkpoint is written after every epoch. A run killed mid-epoch therefore resumes at the
start of that epoch and replays it bit for bit; RNG states are saved too so that code drawing random numbers
outside the epoch loop stays reproducible. Seeding the global RNGs (python, numpy, torch) is what makes dropout,
drop-path, augmentation and mixup, which draw from them, repeat; :meth:`Trainer.fit` gives the caller's RNG states
back when it returns, so a training run in a notebook or script does not change the random numbers that follow.

No host sync per step: the loss and its parts are summed on the device and read (one transfer) only every
``log_steps`` steps, at within-epoch checkpoints and at the end of the epoch. A non-finite loss is recorded on the
device (the first bad step and its loss) and raised as :class:`TrainingError` at the next read, before any
checkpoint is written; from that step on no optimizer update is applied, so the model's weights are those before
the bad step, as when the loss was checked on the host every step (the steps in between still run their forward
and backward, and the EMA, if any, keeps averaging the unchanged weights; nothing of them is saved). The update is
skipped on the device by AdamW's fused kernel, which takes a ``found_inf`` flag: the contract by which GradScaler
skips steps with non-finite gradients without a sync. On a device without fused kernels the loss is read every
step instead, before the update.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..errors import ConfigError, TrainingError
from ..io import atomic_write_text, load_into, save_weights, to_json_safe
from ..progress import track
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import DistInfo, barrier, broadcast_buffers, init_distributed
from .evaluate import evaluate
from .losses import CrossEntropyTerm, LossTerm, StepContext


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (per-process batch size; lr is for the global batch)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    ema_decay: float = 0.0
    clip_grad: float | None = 1.0
    amp: bool = True
    seed: int = 0
    workers: int = 0
    eval_batch_size: int = 256
    frozen: Sequence[str] = ()
    progress: bool = True
    find_unused_parameters: bool = False
    checkpoint_steps: int = 100  # also checkpoint every this many steps within an epoch (0: at epoch ends only)
    # read the running losses from the device (progress output, non-finite check) every this many steps; a read
    # waits for the device, so reading every step would stall a GPU (the epoch's end and checkpoints also read)
    log_steps: int = 50

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and self.min_lr >= 0):
            raise ConfigError(f"learning rates must be positive (lr={self.lr}, min_lr={self.min_lr})")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"EMA decay must be in [0, 1), got {self.ema_decay}")
        if self.checkpoint_steps < 0:
            raise ConfigError(f"checkpoint_steps must be >= 0, got {self.checkpoint_steps}")
        if self.log_steps < 1:
            raise ConfigError(f"log_steps must be >= 1, got {self.log_steps}")


class _SkipSampler(torch.utils.data.Sampler):
    """The epoch's sampler without its first ``skip`` indices: resuming mid-epoch continues the same order
    without loading (or drawing random augmentations for) the batches already trained on."""

    def __init__(self, base: torch.utils.data.Sampler, skip: int):
        self.base, self.skip = base, skip

    def __iter__(self):
        it = iter(self.base)
        for _ in range(self.skip):
            next(it)
        return it

    def __len__(self) -> int:
        return len(self.base) - self.skip


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    # numpy's generator state holds an ndarray; it is stored as a tensor so that checkpoints load with
    # torch.load(weights_only=True), which runs no code from the file
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _callers_rng():
    """Give the caller's global RNG states (python, numpy, torch, CUDA) back on exit: a run reseeds them every
    epoch (dropout, augmentation and mixup draw from them), which should not change what the caller draws next."""
    state = _rng_state()
    try:
        yield
    finally:
        _set_rng_state(state)


class _StepModule(nn.Module):
    """Student + loss terms in one module, so DDP synchronises the gradients of both (e.g. projectors).

    Each term's value is returned under the term's ``name``; terms that share a name are told apart by a suffix
    in their order (``pefd``, ``pefd_1``, ...), so that every part is logged.
    """

    def __init__(self, model: nn.Module, terms: nn.ModuleList, teacher: nn.Module | None, teacher_cache=None):
        super().__init__()
        self.model = model
        self.terms = terms
        object.__setattr__(self, "_teacher", teacher)  # not a submodule: frozen, not synchronised or saved
        self.teacher_cache = teacher_cache
        self.part_names: list[str] = []
        for t in terms:
            name, i = t.name, 0
            while name in self.part_names:
                i += 1
                name = f"{t.name}_{i}"
            self.part_names.append(name)

    def forward(self, images: torch.Tensor, targets: torch.Tensor):
        if any(t.needs_features for t in self.terms):
            f = self.model.forward_features(images)
            features = self.model.forward_head(f, pre_logits=True)
            logits = self.model.forward_head(f)
        else:
            features, logits = None, self.model(images)
        ctx = StepContext(self.model, images, targets, logits, features, self._teacher,
                          teacher_cache=self.teacher_cache)
        parts = {name: t(ctx) for name, t in zip(self.part_names, self.terms)}
        total = sum(t.weight * parts[name] for name, t in zip(self.part_names, self.terms))
        return total, parts, logits


@dataclass
class TrainResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    output: Path | None = None


class Trainer:
    """Train ``model`` on ``train_set`` with pluggable loss terms and an optional frozen teacher.

    Args:
        model: the network to train (any timm-style classifier).
        train_set, val_set: datasets yielding ``(image, label)``; ``val_set`` may be None.
        cfg: hyper-parameters.
        output: run folder; receives ``last.pt`` (resumable), ``log.csv``/``log.json``, ``model.safetensors``.
        loss_terms: extra terms added to cross-entropy (e.g. distillation); ``ce_weight`` scales the CE term.
        teacher: frozen teacher for distillation terms (moved to the device, set to eval, grads off).
        run_info: free-form dict stored in the checkpoint and in ``config.json`` (model name, data spec, ...).
        teacher_cache: a folder where the teacher's outputs are kept and read back by runs that train on the same
            batches (:mod:`leanvit.engine.teacher`); None computes them in every step.
    """

    def __init__(self, model: nn.Module, train_set: Dataset, val_set: Dataset | None, cfg: TrainConfig,
                 output: str | Path, loss_terms: Sequence[LossTerm] = (), teacher: nn.Module | None = None,
                 ce_weight: float = 1.0, run_info: dict[str, Any] | None = None, dist: DistInfo | None = None,
                 on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
                 teacher_cache: str | Path | None = None):
        cfg.validate()
        self.cfg = cfg
        self.dist = dist or init_distributed()
        self.device = self.dist.device
        self.output = Path(output)
        self.model = model.to(self.device)
        self.run_info = run_info or {}
        self.on_epoch_end = on_epoch_end
        terms = [CrossEntropyTerm(ce_weight, cfg.label_smoothing)] if ce_weight > 0 else []
        self.terms = nn.ModuleList([*terms, *loss_terms]).to(self.device)
        if not len(self.terms):
            raise ConfigError("no loss terms: ce_weight is 0 and no other term was given")
        self.teacher = None
        if teacher is not None:
            self.teacher = teacher.to(self.device).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.teacher_cache = None
        if teacher_cache is not None:
            if self.teacher is None:
                raise ConfigError("a teacher cache needs a teacher")
            from .teacher import TeacherCache

            self.teacher_cache = TeacherCache(teacher_cache, self.teacher, rank=self.dist.rank)
        names = [name for name, _ in self.model.named_parameters()]
        for f in cfg.frozen:
            if not any(name == f or name.startswith(f + ".") for name in names):
                tops = sorted({name.split(".")[0] for name in names})
                raise ConfigError(f"frozen prefix '{f}' matches no parameter of the model; its parameters start "
                                  f"with {', '.join(tops)} (e.g. blocks.0.attn)")
        for name, p in self.model.named_parameters():
            if any(name == f or name.startswith(f + ".") for f in cfg.frozen):
                p.requires_grad_(False)

        self.train_set, self.val_set = train_set, val_set
        self.sampler = DistributedSampler(train_set, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                          shuffle=True, seed=cfg.seed, drop_last=True)
        self.loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=self.sampler, drop_last=True,
                                 num_workers=cfg.workers, pin_memory=self.device.type == "cuda",
                                 persistent_workers=False)
        if len(self.loader) == 0:
            raise ConfigError(f"training set of {len(train_set)} images is smaller than one batch of "
                              f"{cfg.batch_size} x {self.dist.world_size} processes")
        self.steps_per_epoch = len(self.loader)
        self.total_steps = cfg.epochs * self.steps_per_epoch

        self.step_module = _StepModule(self.model, self.terms, self.teacher, self.teacher_cache)
        params = [p for p in self.step_module.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]  # biases, norms, tokens: no weight decay (DeiT recipe)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        try:
            # fused: one kernel per step, and it skips an update on the device when told to (found_inf), which is
            # how a non-finite loss stops the weights without a host sync (see the module docs)
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
            self.fused = True
        except RuntimeError:  # no fused kernels for this device or dtype: the loss is then read every step
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
            self.fused = False
        from timm.scheduler import CosineLRScheduler

        # linear warmup, then one cosine cycle that ends at min_lr on the last step (with warmup_prefix the cosine
        # starts after the warmup, so it spans the remaining steps)
        warmup = min(int(cfg.warmup_epochs * self.steps_per_epoch), self.total_steps - 1)
        self.scheduler = CosineLRScheduler(
            self.optimizer, t_initial=max(self.total_steps - warmup, 1), lr_min=cfg.min_lr,
            warmup_t=warmup, warmup_lr_init=cfg.lr * 1e-3, warmup_prefix=True, t_in_epochs=False)
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            from timm.data import Mixup

            num_classes = getattr(self.model, "num_classes", None)
            if not num_classes:
                raise ConfigError("mixup/cutmix needs a model with num_classes")
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                               num_classes=num_classes)
        self.ema = None
        if cfg.ema_decay > 0:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay, device=self.device)
        self.use_amp = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.ddp = (DistributedDataParallel(self.step_module, device_ids=[self.device.index]
                                            if self.device.type == "cuda" else None,
                                            find_unused_parameters=cfg.find_unused_parameters)
                    if self.dist.enabled else self.step_module)
        self.epoch = 0  # epochs completed
        self.step = 0
        # the running sums of loss and parts (times batch size) live on the device in this order; float64 where the
        # device has it, so that the logged means are those of summing the values on the host
        self._sum_keys = ["loss", *(f"loss_{name}" for name in self.step_module.part_names)]
        self._sum_dtype = torch.float64 if self.device.type in ("cpu", "cuda") else torch.float32
        self._first_bad = torch.zeros((), dtype=torch.int64, device=self.device)  # first non-finite step, 0: none
        self._bad_loss = torch.zeros((), dtype=torch.float32, device=self.device)  # the loss at that step
        self._partial: dict[str, Any] | None = None  # the running sums of an epoch stopped mid-way (resume)
        self.history: list[dict[str, Any]] = []
        self.best_top1 = -1.0

    # ------------------------------------------------------------------ checkpoints
    @property
    def last_path(self) -> Path:
        return self.output / "last.pt"

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "loss_terms": self.terms.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "rng": _rng_state(),
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "best_top1": self.best_top1,
            "partial": self._partial,
            "config": asdict(self.cfg),
            "run_info": self.run_info,
            "terms": self._terms_desc(),
        }

    def _terms_desc(self) -> list[tuple[str, float]]:
        """``(name, weight)`` of each loss term, to refuse resuming a run with other terms."""
        return [(t.name, float(t.weight)) for t in self.terms]

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        load_into(self.model, state["model"], source)
        self.terms.load_state_dict(state["loss_terms"])
        # a checkpoint's param groups carry the implementation it ran with (fused or not) and would replace this
        # run's; keep this run's, which the loop relies on (and with it, where the step counts are kept)
        saved = state["optimizer"]
        impl = {k: self.optimizer.param_groups[0][k] for k in ("fused", "foreach")}
        self.optimizer.load_state_dict({**saved, "param_groups": [{**g, **impl} for g in saved["param_groups"]]})
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])
        _set_rng_state(state["rng"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = list(state["history"])
        self.best_top1 = float(state.get("best_top1", -1.0))
        self._partial = state.get("partial")

    # the settings of TrainConfig that decide what the run optimises and along which schedule: a resume with
    # another value would continue a run that no single setting describes (and the optimiser's and scheduler's
    # states, loaded from the checkpoint, would quietly keep the old lr, weight decay and schedule)
    IDENTITY = ("batch_size", "epochs", "seed", "lr", "min_lr", "weight_decay", "warmup_epochs", "label_smoothing",
                "mixup", "cutmix", "ema_decay", "clip_grad", "frozen")

    def resume(self, path: str | Path | None = None) -> bool:
        """Load ``path`` (default ``output/last.pt``) if it exists; returns whether anything was loaded.

        Refused (:class:`ConfigError`, one line naming the setting, the recorded value and this run's) when the
        checkpoint's run differs from this one in its identity: ``run_info``'s model, data, split, teacher,
        distillation method and token-reduction patch, the loss settings in ``run_info["loss"]`` and the other
        settings in ``run_info["settings"]`` (each compared where both runs record it), the settings of
        :attr:`IDENTITY`, and the loss terms' names and weights.
        """
        path = Path(path) if path else self.last_path
        if not path.is_file():
            return False
        state = load_checkpoint(path)
        again = "resume with the same settings or choose another --output"
        # what the run trains and how: the same model, data, teacher, distillation method and token-reduction
        # patch (leanvit finetune), the same loss settings and training set, the same loss terms
        was, now = state.get("run_info", {}), self.run_info
        for key in ("model", "data", "split", "teacher", "method", "patch"):
            if key in was and key in now and was[key] != now[key]:
                raise ConfigError(f"cannot resume {path}: it was run with {key} {was[key]}, now {now[key]}; {again}")
        for group, what in (("loss", "its loss terms differ from this command's: "), ("settings", "")):
            old, new = was.get(group) or {}, now.get(group) or {}
            for key in old.keys() & new.keys():
                if old[key] != new[key]:
                    raise ConfigError(f"cannot resume {path}: {what}it was run with {key}={old[key]}, now "
                                      f"{key}={new[key]}; {again}")
        saved = state.get("config", {})

        def plain(v: Any) -> Any:  # a sequence as a list: a tuple in this config, maybe a list once saved
            return list(v) if isinstance(v, (tuple, list)) else v

        for key in self.IDENTITY:
            if key in saved and plain(saved[key]) != plain(getattr(self.cfg, key)):
                raise ConfigError(f"cannot resume {path}: it was run with {key}={plain(saved[key])}, now "
                                  f"{key}={plain(getattr(self.cfg, key))}; {again}")
        terms = self._terms_desc()
        if "terms" in state and [tuple(t) for t in state["terms"]] != terms:
            raise ConfigError(f"cannot resume {path}: its loss terms were {state['terms']}, now {terms} "
                              f"(name, weight); resume with the same settings or choose another --output")
        self.load_state_dict(state, str(path))
        return True

    # ------------------------------------------------------------------ logging
    def _write_logs(self) -> None:
        if not self.dist.is_main or not self.history:
            return
        keys = list(dict.fromkeys(k for row in self.history for k in row))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        w.writeheader()
        w.writerows(self.history)
        atomic_write_text(self.output / "log.csv", buf.getvalue())
        atomic_write_text(self.output / "log.json", json.dumps(to_json_safe(self.history), indent=1, allow_nan=False))

    # ------------------------------------------------------------------ loop
    def _record_loss(self, total: torch.Tensor) -> torch.Tensor:
        """Record step ``self.step + 1``'s loss on the device: the first non-finite step and its loss are kept for
        the next read (:meth:`_read`). Returns whether a non-finite loss has been seen (a 0-dim bool tensor)."""
        loss = total.detach()
        bad = ~torch.isfinite(loss)
        if self.dist.enabled:
            # every process halts at the same step and raises at the same read, so that none waits for the others
            flag = bad.to(torch.float32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            bad = flag > 0
        first = bad & (self._first_bad == 0)
        self._first_bad = torch.where(first, self.step + 1, self._first_bad)
        self._bad_loss = torch.where(first, loss.to(torch.float32), self._bad_loss)
        return self._first_bad > 0

    def _read(self, sums: torch.Tensor | None = None) -> list[float]:
        """Copy the running sums and the non-finite record to the host (one sync); raise if a loss was non-finite.

        The weights are then those before the first non-finite step (no update was applied from it on), and
        ``self.step`` counts the steps applied.
        """
        parts = [self._first_bad.to(self._sum_dtype).view(1), self._bad_loss.to(self._sum_dtype).view(1)]
        values = torch.cat([*([] if sums is None else [sums]), *parts]).tolist()
        first, loss = int(values[-2]), values[-1]
        if first:
            self.step = first - 1
            what = f"{loss}" if not math.isfinite(loss) else "non-finite (in another process)"
            raise TrainingError(
                f"loss became {what} at step {first} (epoch {(first - 1) // self.steps_per_epoch + 1}); lower "
                f"the learning rate (now {self.optimizer.param_groups[0]['lr']:.3g}) or enable gradient clipping; "
                f"the last good checkpoint is {self.last_path}")
        return values[:-2]

    def _optimizer_step(self, halted: torch.Tensor) -> None:
        """Clip and apply the gradients, unless ``halted`` (a 0-dim bool tensor on the device): no host sync.

        Without AMP, fused AdamW is told to skip through the ``found_inf`` attribute its ``step`` reads (GradScaler
        sets it the same way). With AMP, GradScaler already skips steps whose gradients are not finite and passes
        its flag to the fused kernel; a non-finite loss does not always make the gradients non-finite (a term that
        adds a constant NaN has zero gradient), so one gradient is made NaN when halted: the scaler then skips the
        step (and lowers its scale, which the run never saves since it raises at the next read).
        """
        cfg = self.cfg
        amp = self.scaler.is_enabled()
        if amp and self.fused:
            grad = next((p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None),
                        None)
            if grad is not None:
                grad.masked_fill_(halted, float("nan"))
        if cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.step_module.parameters(), cfg.clip_grad)
        if amp or not self.fused:
            self.scaler.step(self.optimizer)
            return
        self.optimizer.grad_scale, self.optimizer.found_inf = None, halted.to(torch.float32)
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.grad_scale, self.optimizer.found_inf

    def _train_epoch(self) -> dict[str, float]:
        cfg = self.cfg
        self.ddp.train()
        self.sampler.set_epoch(self.epoch)
        done = self.step - self.epoch * self.steps_per_epoch  # batches of this epoch trained before a resume
        loader = self.loader
        sums = torch.zeros(len(self._sum_keys), dtype=self._sum_dtype, device=self.device)
        if done > 0 and self._partial is not None:
            # resumed mid-epoch: the RNG state was restored with the checkpoint; skip the batches already done
            saved, seen, before = self._partial["sums"], int(self._partial["seen"]), self._partial["seconds"]
            sums = torch.tensor([float(saved.get(k, 0.0)) for k in self._sum_keys], dtype=self._sum_dtype,
                                device=self.device)
            loader = DataLoader(self.train_set, batch_size=cfg.batch_size, drop_last=True,
                                sampler=_SkipSampler(self.sampler, done * cfg.batch_size), num_workers=cfg.workers,
                                pin_memory=self.device.type == "cuda")
        else:
            _seed_all(cfg.seed * 100_003 + self.epoch * 1_009 + self.dist.rank)
            seen, before = 0, 0.0
        self._first_bad.zero_()
        if self.teacher_cache is not None:
            self.teacher_cache.begin_epoch(self.epoch)
        t0 = time.perf_counter() - before
        batches = iter(loader)
        if done > 0 and self._partial is not None:
            # creating the iterator draws a seed from the RNG, which the interrupted run did at the epoch's start:
            # restore the checkpoint's state after it, so that the run continues with the same random stream
            _set_rng_state(self._partial["rng"])
        bar = track(batches, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", total=self.steps_per_epoch,
                    enabled=cfg.progress and self.dist.is_main, initial=max(done, 0))
        for images, targets in bar:
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
            with torch.autocast(self.device.type, enabled=self.use_amp):
                total, parts, _ = self.ddp(images, targets)
            halted = self._record_loss(total)
            if not self.fused:
                self._read()  # the update cannot be skipped on the device: look now, before it is applied
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            self._optimizer_step(halted)
            self.scaler.update()
            self.step += 1
            self.scheduler.step_update(num_updates=self.step)
            if self.ema is not None:
                self.ema.update(self.model, step=self.step)
            bs = images.shape[0]
            seen += bs
            values = torch.stack([total.detach(), *(v.detach() for v in parts.values())]).view(-1)
            sums.add_(values.to(self._sum_dtype), alpha=bs)
            in_epoch = self.step - self.epoch * self.steps_per_epoch
            checkpoint = (cfg.checkpoint_steps and in_epoch % cfg.checkpoint_steps == 0
                          and in_epoch < self.steps_per_epoch)
            if not (checkpoint or in_epoch % cfg.log_steps == 0):
                continue
            read = dict(zip(self._sum_keys, self._read(sums)))  # raises on a non-finite loss, before any save
            elapsed = time.perf_counter() - t0
            ips = seen * self.dist.world_size / max(elapsed, 1e-9)
            remaining = (self.total_steps - self.step) * bs * self.dist.world_size / max(ips, 1e-9)
            bar.set_postfix(loss=f"{read['loss'] / seen:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{ips:.0f}", eta=f"{remaining / 60:.0f}m")
            if checkpoint:
                # a checkpoint within the epoch: a stopped run loses at most checkpoint_steps steps
                self._partial = {"sums": read, "seen": seen, "seconds": elapsed, "rng": _rng_state()}
                if self.teacher_cache is not None:
                    self.teacher_cache.flush()
                if self.dist.is_main:
                    save_checkpoint(self.state_dict(), self.last_path)
        read = dict(zip(self._sum_keys, self._read(sums)))
        self._partial = None
        elapsed = time.perf_counter() - t0
        row = {k: v / seen for k, v in read.items()}
        row["images_per_s"] = seen * self.dist.world_size / elapsed
        row["epoch_seconds"] = elapsed
        if self.teacher_cache is not None:
            self.teacher_cache.flush()
            row["teacher_cache_hits"] = self.teacher_cache.hit_rate  # of this process's steps since the epoch began
        return row

    def fit(self) -> TrainResult:
        """Train the remaining epochs; the caller's global RNG states are given back on return (module docs)."""
        with _callers_rng():
            return self._fit()

    def _fit(self) -> TrainResult:
        cfg = self.cfg
        log = print if self.dist.is_main else (lambda *a, **k: None)
        trained = self.epoch < cfg.epochs
        if not trained:
            log(f"nothing to do: {self.epoch} of {cfg.epochs} epochs already done ({self.last_path})")
        while self.epoch < cfg.epochs:
            row = {"epoch": self.epoch + 1, "step": 0}
            row.update(self._train_epoch())
            broadcast_buffers(self.step_module, self.dist)  # every rank ends the epoch with rank 0's BN statistics
            row["step"] = self.step
            row["lr"] = self.optimizer.param_groups[0]["lr"]  # at the end of the epoch
            if self.val_set is not None and self.dist.is_main:
                loader = DataLoader(self.val_set, batch_size=cfg.eval_batch_size, shuffle=False,
                                    num_workers=cfg.workers)
                res = evaluate(self.model, loader, self.device, amp=self.use_amp, progress=cfg.progress,
                               desc="val")
                row.update(val_top1=res.top1, val_top5=res.top5, val_loss=res.loss)
                if self.ema is not None:
                    res_ema = evaluate(self.ema.module, loader, self.device, amp=self.use_amp,
                                       progress=cfg.progress, desc="val ema")
                    row.update(val_ema_top1=res_ema.top1, val_ema_loss=res_ema.loss)
            self.epoch += 1
            self.history.append(row)
            if self.dist.is_main:
                if "val_top1" in row and row["val_top1"] > self.best_top1:
                    self.best_top1 = row["val_top1"]
                    save_weights(self.model, self.output / "best.safetensors", metadata=self._weights_metadata())
                save_checkpoint(self.state_dict(), self.last_path)
                self._write_logs()
                msg = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
                log(f"[epoch {self.epoch}/{cfg.epochs}] {msg}")
                if self.on_epoch_end is not None:
                    self.on_epoch_end(row)
            barrier(self.dist)
        # a resumed run with nothing left to do keeps the weights (and their metadata: the command that trained
        # them) it has; they are written only when missing (a run stopped after its last checkpoint)
        if self.dist.is_main and (trained or not (self.output / "model.safetensors").is_file()):
            meta = self._weights_metadata()
            save_weights(self.model, self.output / "model.safetensors", metadata=meta)
            if self.ema is not None:
                save_weights(self.ema.module, self.output / "model_ema.safetensors", metadata=meta)
        barrier(self.dist)
        return TrainResult(self.history, self.output)

    def _weights_metadata(self) -> dict[str, str]:
        """The run information written into every exported weights file (model, best, EMA): mappings and lists
        (e.g. leanvit finetune's patch) as JSON, so that an export can read them back."""
        return {k: json.dumps(to_json_safe(v)) if isinstance(v, (dict, list)) else str(v)
                for k, v in self.run_info.items()}
