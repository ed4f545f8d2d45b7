"""The training loop does not wait for the device every step: losses are summed on the device and read at the log
interval, checkpoints and the epoch's end; a non-finite loss still stops the run, naming its step, with the weights
of the step before it and no checkpoint written after it."""
from __future__ import annotations

import collections
import warnings

import pytest
import timm
import torch
from torch.utils.data import TensorDataset

from leanvit.engine import LossTerm, Trainer, TrainConfig, load_checkpoint
from leanvit.errors import TrainingError

# every way Python code copies a tensor's value to the host (on a GPU: waits for the device)
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             embed_dim=32, num_heads=2, num_classes=4)


def tiny_data(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g))


class NanFromStep(LossTerm):
    """Zero loss until call ``at``, then NaN (with finite, zero gradients: only the loss says something is wrong).
    Keeps a copy of the weights it sees at call ``at``: those after step ``at - 1``."""

    name = "nan_probe"

    def __init__(self, at: int):
        super().__init__(1.0)
        self.at, self.calls, self.weights_before = at, 0, None

    def forward(self, ctx):
        self.calls += 1
        if self.calls == self.at:
            self.weights_before = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
        zero = ctx.logits.sum() * 0.0
        return zero + float("nan") if self.calls >= self.at else zero


@pytest.fixture
def count_reads(monkeypatch):
    """Count the host reads of tensors (by kind) while the fixture is active."""
    counts: collections.Counter = collections.Counter()

    def counting(name):
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return orig(self, *args, **kwargs)
        return wrapper

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    assert bool(torch.tensor(True)) and counts["__bool__"] == 1  # the wrapper sees Python's truth test
    counts.clear()
    return counts


def test_reads_per_log_not_per_step(tmp_path, count_reads):
    """20 steps, a log every 10: a handful of reads (the logs, the epoch's end, the data loader's seed and the
    sampler's order), not several per step as when every step checked the loss and read each part."""
    model = tiny_model()
    cfg = TrainConfig(epochs=1, batch_size=2, progress=False, amp=False, log_steps=10, checkpoint_steps=0,
                      warmup_epochs=0)
    trainer = Trainer(model, tiny_data(40), None, cfg, tmp_path / "run", loss_terms=[NanFromStep(10**9)])
    count_reads.clear()
    result = trainer.fit()
    reads = sum(count_reads.values())
    assert trainer.step == 20 and result.history[0]["step"] == 20
    assert reads <= 2 + 1 + 2, dict(count_reads)  # 2 logs + the epoch's end + loader seed + sampler order
    row = result.history[0]
    assert row["loss"] == pytest.approx(row["loss_ce"]) and row["loss_nan_probe"] == 0.0


def test_logged_losses_are_the_host_sums(tmp_path):
    """The epoch's mean loss is the mean of the per-step losses, as summing ``item()`` on the host gave."""
    model = tiny_model()
    seen = []

    class Spy(LossTerm):
        name = "spy"

        def forward(self, ctx):
            value = 0.25 * len(seen)
            seen.append(value)
            return ctx.logits.sum() * 0.0 + value

    cfg = TrainConfig(epochs=1, batch_size=4, progress=False, amp=False, log_steps=3, warmup_epochs=0)
    result = Trainer(model, tiny_data(24), None, cfg, tmp_path / "run", loss_terms=[Spy()]).fit()
    assert result.history[0]["loss_spy"] == pytest.approx(sum(0.25 * i for i in range(6)) / 6, abs=1e-12)


def test_non_finite_loss_names_step_and_keeps_weights(tmp_path):
    """NaN from step 13, logs every 10, checkpoints every 5: the run stops at the read of step 15 with the error
    naming step 13, the weights are those after step 12 and the last checkpoint is the one of step 10."""
    model = tiny_model()
    probe = NanFromStep(13)
    cfg = TrainConfig(epochs=2, batch_size=2, progress=False, amp=False, log_steps=10, checkpoint_steps=5,
                      warmup_epochs=0)
    trainer = Trainer(model, tiny_data(40), None, cfg, tmp_path / "run", loss_terms=[probe])
    with pytest.raises(TrainingError) as ei:
        trainer.fit()
    msg = str(ei.value)
    assert "at step 13 " in msg and "(epoch 1)" in msg and "nan" in msg.lower() and "learning rate" in msg
    assert probe.calls == 15  # stopped at the next read (the checkpoint of step 15), not at the epoch's end
    assert trainer.step == 12  # the steps applied
    for k, v in model.state_dict().items():
        assert torch.equal(v, probe.weights_before[k]), k  # no update from the bad step on
    assert int(load_checkpoint(tmp_path / "run" / "last.pt")["step"]) == 10
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_non_finite_loss_in_later_epoch(tmp_path):
    """The step named is the global one and the epoch the one it is in (epoch 2 here), read at the epoch's end."""
    model = tiny_model()
    cfg = TrainConfig(epochs=2, batch_size=4, progress=False, amp=False, log_steps=100, checkpoint_steps=0,
                      warmup_epochs=0)
    trainer = Trainer(model, tiny_data(16), None, cfg, tmp_path / "run", loss_terms=[NanFromStep(6)])
    with pytest.raises(TrainingError, match=r"at step 6 \(epoch 2\)"):
        trainer.fit()
    assert trainer.step == 5
    assert int(load_checkpoint(tmp_path / "run" / "last.pt")["epoch"]) == 1


def test_log_steps_validated():
    with pytest.raises(Exception, match="log_steps"):
        TrainConfig(log_steps=0).validate()


def test_resume_from_checkpoint_of_non_fused_optimizer(tmp_path):
    """A checkpoint written by a run whose AdamW was not fused (older leanvit) resumes into the fused one."""
    cfg = TrainConfig(epochs=1, batch_size=4, progress=False, amp=False, warmup_epochs=0)
    Trainer(tiny_model(), tiny_data(16), None, cfg, tmp_path / "run").fit()
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    for g in state["optimizer"]["param_groups"]:
        g["fused"], g["foreach"] = None, None
    cfg.epochs = 2
    again = Trainer(tiny_model(), tiny_data(16), None, cfg, tmp_path / "run2")
    again.load_state_dict(state, "old")
    assert again.fused and all(g["fused"] for g in again.optimizer.param_groups)
    again.fit()
    assert again.step == 8 and all(int(s["step"]) == 8 for s in again.optimizer.state.values())
    assert all(torch.isfinite(p).all() for p in again.model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", [False, True])
def test_cuda_steps_do_not_sync(tmp_path, amp):
    """On a GPU, CUDA's sync debug mode reports every synchronising call: a few per read, none per step."""
    model = tiny_model()
    cfg = TrainConfig(epochs=1, batch_size=2, progress=False, amp=amp, log_steps=10, checkpoint_steps=0,
                      warmup_epochs=0, ema_decay=0.9, mixup=0.2)
    trainer = Trainer(model, tiny_data(80), None, cfg, tmp_path / "run")
    assert trainer.fused and trainer.device.type == "cuda"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.fit()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert trainer.step == 40
    assert len(syncs) <= 12, [str(w.message)[:80] for w in syncs]  # 4 logs + the epoch's end, then saving


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", [False, True])
def test_cuda_non_finite_loss(tmp_path, amp):
    """With and without AMP (GradScaler) the bad step and those after it are not applied."""
    model = tiny_model()
    probe = NanFromStep(3)
    cfg = TrainConfig(epochs=1, batch_size=2, progress=False, amp=amp, log_steps=8, warmup_epochs=0)
    trainer = Trainer(model, tiny_data(40), None, cfg, tmp_path / "run", loss_terms=[probe])
    with pytest.raises(TrainingError, match="at step 3 "):
        trainer.fit()
    assert trainer.step == 2 and probe.calls == 8
    for k, v in model.state_dict().items():
        assert torch.equal(v, probe.weights_before[k]), k
