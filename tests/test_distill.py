"""Distillation: each loss against values computed by hand, the method registry and its errors, projectors in the
training state (optimiser, last.pt, resume) but not in the exported student, one teacher pass per step, a CNN
teacher for a ViT student, a short run that lowers its distillation loss, and ``leanvit distill`` end to end."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

from conftest import FixedTeacher, step_context as _ctx

import leanvit
from leanvit.data.fashion_mnist import FashionMNIST
from leanvit.distill import METHODS, build_terms, check_options, register_method
from leanvit.engine.losses import LogitKDTerm, ProjectedFeatureTerm, ProjectedLogitKDTerm
from leanvit.models.features import block_features, pooled_features
from leanvit.models.projectors import ProjectorEnsemble
from leanvit.engine import StepContext, Trainer, TrainConfig, load_checkpoint
from leanvit.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def student() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("leanvit_vit_fm_student")


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    return timm.create_model("leanvit_vit_fm_teacher", pretrained=True).eval()


# ---------------------------------------------------------------- losses against hand-computed values
def test_kd_by_hand():
    # s/T = (0.5, 1, 1.5), t/T = (1.5, 1, 0.5): log(p_t / p_s) is (1, 0, -1), so KL = p_t[0] - p_t[2]
    e = math.exp
    kl = (e(1.5) - e(0.5)) / (e(1.5) + e(1.0) + e(0.5))
    ctx = _ctx(torch.tensor([[1.0, 2.0, 3.0]]), t_logits=torch.tensor([[3.0, 2.0, 1.0]]))
    assert LogitKDTerm(temperature=2.0)(ctx).item() == pytest.approx(4 * kl, rel=1e-6)  # T^2 = 4
    # identical logits: no loss; batchmean averages over the batch
    ctx = _ctx(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), t_logits=torch.tensor([[3.0, 2.0, 1.0], [5., 5., 5.]]))
    assert LogitKDTerm(temperature=2.0)(ctx).item() == pytest.approx(4 * kl / 2, rel=1e-6)


def test_kd_proj_by_hand():
    term = ProjectedLogitKDTerm(3, temperature=2.0)
    with torch.no_grad():
        term.projector.weight.copy_(2 * torch.eye(3))
        term.projector.bias.zero_()
    e = math.exp
    kl = (e(1.5) - e(0.5)) / (e(1.5) + e(1.0) + e(0.5))
    ctx = _ctx(torch.tensor([[0.5, 1.0, 1.5]]), t_logits=torch.tensor([[3.0, 2.0, 1.0]]))  # P(s) = (1, 2, 3)
    assert term(ctx).item() == pytest.approx(4 * kl, rel=1e-6)
    assert ctx.logits.tolist() == [[0.5, 1.0, 1.5]]  # the student's own logits are untouched


def test_pefd_by_hand():
    ens = ProjectorEnsemble(2, 2, n=2)
    with torch.no_grad():  # projector 0 = identity, projector 1 = -identity (rows 2k..2k+1 are projector k)
        ens.linear.weight.copy_(torch.cat([torch.eye(2), -torch.eye(2)]))
        ens.linear.bias.zero_()
    x = torch.tensor([[1.0, -2.0], [3.0, 4.0], [0.0, 0.0]])
    # ReLU before the average: (relu(x) + relu(-x)) / 2
    assert ens(x).tolist() == [[0.5, 1.0], [1.5, 2.0], [0.0, 0.0]]
    t = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    cos = [1.5 / (math.sqrt(1.25) * math.sqrt(2)), 2.0 / 2.5, 0.0]  # an all-zero projection has cosine 0
    term = ProjectedFeatureTerm(ens, weight=25.0, name="pefd")
    assert term(_ctx(torch.zeros(3, 2), features=x, t_features=t)).item() == pytest.approx(
        sum(1 - c for c in cos) / 3, rel=1e-6)


def test_proj_is_one_linear_without_relu():
    ens = ProjectorEnsemble(2, 2, n=1, relu=False)
    with torch.no_grad():
        ens.linear.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
        ens.linear.bias.copy_(torch.tensor([0.0, 1.0]))
    x = torch.tensor([[2.0, 3.0]])
    assert ens(x).tolist() == [[2.0, -2.0]]  # negative output kept
    t = torch.tensor([[1.0, -1.0]])
    assert ProjectedFeatureTerm(ens)(_ctx(torch.zeros(1, 2), features=x, t_features=t)).item() == pytest.approx(0.0,
                                                                                                               abs=1e-6)


def test_ensemble_initialises_projectors_independently():
    torch.manual_seed(0)
    ens = ProjectorEnsemble(64, 96, n=3)
    w = ens.linear.weight.view(3, 96, 64)
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    bound = 1 / math.sqrt(64)  # nn.Linear(64, 96)'s own initialisation range
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound


# ---------------------------------------------------------------- registry and options
def test_registry_and_defaults(student, teacher):
    assert list(METHODS) == ["none", "kd", "kd-proj", "proj", "pefd"]
    d = build_terms("pefd", student, teacher)
    assert d.ce_weight == 1.0 and d.options == {"weight": 25.0, "projectors": 3, "relu": True}
    (term,) = d.terms
    assert term.name == "pefd" and term.weight == 25.0 and term.needs_features
    assert term.projector.linear.in_features == 64 and term.projector.linear.out_features == 3 * 96
    d = build_terms("pefd", student, teacher, projectors=5, weight=10, relu=False)
    assert d.terms[0].projector.n == 5 and not d.terms[0].projector.relu and d.terms[0].weight == 10
    d = build_terms("kd-proj", student, teacher)
    assert d.ce_weight == 0.1 and d.terms[0].weight == 0.9 and d.terms[0].temperature == 4.0
    assert d.terms[0].projector.weight.shape == (10, 10)
    assert build_terms("none", student).terms == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="pefdd"), "unknown distillation method 'pefdd'; choose one of none, kd, kd-proj, proj, pefd"),
    (dict(projectors=0), "projectors must be an integer >= 1, got 0"),
    (dict(projectors=2.5), "projectors must be an integer >= 1"),
    (dict(weight=-1.0), "weight must be a number >= 0, got -1.0"),
    (dict(ce_weight=-0.5), "ce_weight must be a number >= 0"),
    (dict(method="kd", temperature=0.0), "temperature must be a number > 0"),
    (dict(method="kd", projectors=3), "method 'kd' has no option 'projectors' \\(projectors applies to pefd\\)"),
    (dict(has_teacher=False), "method 'pefd' needs a teacher"),
    (dict(method="none", has_teacher=True), "method 'none' learns from the labels alone; drop the teacher"),
    (dict(weight=0.0, ce_weight=0.0), "nothing to train on"),
])
def test_option_errors(kwargs, match):
    kwargs = {"method": "pefd", "has_teacher": True, **kwargs}
    with pytest.raises(ConfigError, match=match):
        check_options(kwargs.pop("method"), kwargs.pop("has_teacher"), **kwargs)


def test_registry_refuses_a_second_method_of_the_same_name():
    with pytest.raises(ValueError, match="'pefd' is already registered"):
        register_method("pefd", "another PEFD")(lambda student, teacher: [])
    assert METHODS["pefd"].help.startswith("PEFD")
    with pytest.raises(ValueError, match="unknown options"):
        register_method("pefd2", "typo", options={"projector": 3})


def test_logit_methods_need_the_same_classes(student):
    other = timm.create_model("resnet10t", num_classes=7, in_chans=1)
    with pytest.raises(ConfigError, match="student has 10 classes and the teacher 7"):
        build_terms("kd", student, other)
    rgb = timm.create_model("test_vit")  # 3 x 160 x 160 input: cannot read the student's 1 x 28 x 28 images
    with pytest.raises(ConfigError, match="the teacher cannot read the student's 1x28x28 input"):
        build_terms("pefd", student, rgb)


# ---------------------------------------------------------------- features through timm and hooks
def test_features_from_timm_and_from_hooks():
    torch.manual_seed(0)
    vit = timm.create_model("leanvit_vit_fm_student").eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        blocks, f, logits = block_features(vit, x)
        f2, logits2 = pooled_features(vit, x)
        assert torch.allclose(f, f2) and torch.allclose(logits, vit(x))
        assert [b.shape for b in blocks] == [(3, 64)] * len(vit.blocks)
        # the last block's patch tokens, averaged (the cls token is left out by forward_intermediates)
        seen = []
        handle = vit.blocks[-1].register_forward_hook(lambda _m, _i, out: seen.append(out))
        vit(x)
        handle.remove()
        assert torch.allclose(blocks[-1], seen[0][:, vit.num_prefix_tokens:].mean(1), atol=1e-6)

    class Plain(nn.Module):  # no timm interface: features read by hooks
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU())
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            return self.fc(self.blocks(x))

    plain = Plain()
    f, logits = pooled_features(plain, x)
    assert torch.equal(f, plain.blocks(x)) and torch.equal(logits, plain(x))
    blocks, f3, _ = block_features(plain, x)
    assert [b.shape for b in blocks] == [(3, 784), (3, 32), (3, 32)] and torch.equal(f3, f)


# ---------------------------------------------------------------- training: state, names, teacher, CNN teacher
def _images(n: int = 16, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


def test_projectors_are_trained_checkpointed_resumed_and_not_exported(tmp_path, student, teacher):
    d = build_terms("pefd", student, teacher)
    proj = d.terms[0].projector
    before = proj.linear.weight.detach().clone()
    cfg = TrainConfig(epochs=1, batch_size=8, progress=False, amp=False, warmup_epochs=0, lr=3e-3)
    trainer = Trainer(student, _images(), None, cfg, tmp_path / "run", loss_terms=d.terms, teacher=teacher,
                      ce_weight=d.ce_weight)
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_optimizer for p in proj.parameters())
    assert not any(id(p) in in_optimizer for p in teacher.parameters())
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.fit()
    assert not torch.equal(proj.linear.weight, before)  # optimised
    assert not teacher.training and all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())

    saved = load_checkpoint(tmp_path / "run" / "last.pt")["loss_terms"]
    assert torch.equal(saved["1.projector.linear.weight"], proj.linear.weight)
    exported = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert set(exported) == set(student.state_dict()) and not any("projector" in k for k in exported)

    # a new run of the same command restores the projectors (and their optimiser state) from last.pt
    fresh = build_terms("pefd", student, teacher)
    assert not torch.equal(fresh.terms[0].projector.linear.weight, proj.linear.weight)
    resumed = Trainer(student, _images(), None, cfg, tmp_path / "run", loss_terms=fresh.terms, teacher=teacher,
                      ce_weight=fresh.ce_weight)
    assert resumed.resume()
    assert torch.equal(fresh.terms[0].projector.linear.weight, proj.linear.weight)
    state = resumed.optimizer.state[fresh.terms[0].projector.linear.weight]
    assert state["step"] == trainer.step


def test_one_teacher_pass_per_step_and_distinct_part_names(tmp_path, student, teacher, monkeypatch):
    calls = []
    forward_features = teacher.forward_features
    monkeypatch.setattr(teacher, "forward_features", lambda x: calls.append(x.shape[0]) or forward_features(x))
    terms = [*build_terms("pefd", student, teacher).terms, *build_terms("pefd", student, teacher, projectors=1).terms,
             LogitKDTerm(0.5)]
    cfg = TrainConfig(epochs=1, batch_size=8, progress=False, amp=False)
    trainer = Trainer(student, _images(), None, cfg, tmp_path / "run", loss_terms=terms, teacher=teacher)
    calls.clear()  # build_terms' dry runs
    trainer.fit()
    assert calls == [8, 8]  # two steps, one teacher pass each, shared by three terms
    row = trainer.history[-1]
    assert {"loss_ce", "loss_pefd", "loss_pefd_1", "loss_kd"} <= set(row)
    assert row["loss_pefd"] != row["loss_pefd_1"]


def _counting(teacher, monkeypatch) -> list[int]:
    """Batch sizes of the teacher's training passes (build_terms' dry run of 2 blank images left out)."""
    calls: list[int] = []
    forward_features = teacher.forward_features
    monkeypatch.setattr(teacher, "forward_features",
                        lambda x: (x.shape[0] != 2 and calls.append(x.shape[0])) or forward_features(x))
    return calls


def _fit_kd(tmp_path, name, teacher, seed=0, cache=None):
    torch.manual_seed(0)
    student = timm.create_model("leanvit_vit_fm_student")
    d = build_terms("kd", student, teacher)
    cfg = TrainConfig(epochs=2, batch_size=8, progress=False, amp=False, seed=seed)
    trainer = Trainer(student, _images(24), None, cfg, tmp_path / name, loss_terms=d.terms, teacher=teacher,
                      ce_weight=d.ce_weight, teacher_cache=cache)
    trainer.fit()
    return trainer


def test_teacher_cache_serves_a_later_run_on_the_same_batches_exactly(tmp_path, teacher, monkeypatch):
    cache = tmp_path / "cache"
    plain = _fit_kd(tmp_path, "plain", teacher)
    calls = _counting(teacher, monkeypatch)
    first = _fit_kd(tmp_path, "first", teacher, cache=cache)  # fills the cache (another method would too)
    assert calls == [8] * 6 and [r["teacher_cache_hits"] for r in first.history] == [0.0, 0.0]
    files = sorted(p.name for p in next(cache.iterdir()).iterdir())
    assert files == ["epoch0000_rank0.safetensors", "epoch0001_rank0.safetensors"]
    calls.clear()
    second = _fit_kd(tmp_path, "second", teacher, cache=cache)
    assert calls == [] and [r["teacher_cache_hits"] for r in second.history] == [1.0, 1.0]
    for run in (first, second):  # the cache changes nothing in what is learned
        assert [r["loss_kd"] for r in run.history] == [r["loss_kd"] for r in plain.history]
        assert all(torch.equal(a, b) for a, b in zip(run.model.state_dict().values(),
                                                     plain.model.state_dict().values()))
    # other batches (another seed shuffles the data differently) miss and run the teacher
    calls.clear()
    other = _fit_kd(tmp_path, "other", teacher, seed=1, cache=cache)
    assert calls == [8] * 6 and other.history[0]["teacher_cache_hits"] < 1.0


def test_teacher_cache_ignores_an_unreadable_file(tmp_path, teacher, monkeypatch):
    cache = tmp_path / "cache"
    _fit_kd(tmp_path, "first", teacher, cache=cache)
    (next(cache.iterdir()) / "epoch0000_rank0.safetensors").write_bytes(b"not a safetensors file")
    calls = _counting(teacher, monkeypatch)
    with pytest.warns(UserWarning, match="ignoring the unreadable teacher cache .*epoch0000_rank0"):
        run = _fit_kd(tmp_path, "second", teacher, cache=cache)
    assert calls == [8] * 3 and [r["teacher_cache_hits"] for r in run.history] == [0.0, 1.0]
    _fit_kd(tmp_path, "third", teacher, cache=cache)  # the file was rewritten and reads again


def test_teacher_cache_keys_the_batch_and_the_teacher(teacher):
    from leanvit.engine.teacher import batch_key, teacher_fingerprint

    x = torch.randn(2, 1, 28, 28)
    y = x.clone()
    y[1, 0, 5, 5] += 1e-6
    assert batch_key(x) == batch_key(x.clone()) and batch_key(x) != batch_key(y)
    assert batch_key(x) != batch_key(x.double()) and batch_key(x) != batch_key(x.reshape(1, 2, 28, 28))
    other = timm.create_model("leanvit_vit_fm_teacher")  # same architecture, other weights
    assert teacher_fingerprint(teacher) == teacher_fingerprint(teacher)
    assert teacher_fingerprint(teacher) != teacher_fingerprint(other)


def test_cnn_teacher_into_vit_student(tmp_path, student):
    torch.manual_seed(0)
    cnn = timm.create_model("resnet10t", num_classes=10, in_chans=1)
    d = build_terms("pefd", student, cnn, projectors=2)
    assert d.terms[0].projector.linear.out_features == 2 * 512  # resnet10t's pooled width
    cfg = TrainConfig(epochs=1, batch_size=8, progress=False, amp=False)
    trainer = Trainer(student, _images(), None, cfg, tmp_path / "run", loss_terms=d.terms, teacher=cnn)
    trainer.fit()
    assert not cnn.training and math.isfinite(trainer.history[-1]["loss_pefd"])


def test_short_run_lowers_the_distillation_loss(tmp_path, teacher, fmnist_dir):
    torch.manual_seed(0)
    student = timm.create_model("leanvit_vit_fm_student")
    data = FashionMNIST(fmnist_dir, split="test", limit=16)
    d = build_terms("pefd", student, teacher)
    cfg = TrainConfig(epochs=4, batch_size=16, progress=False, amp=False, warmup_epochs=0, lr=3e-3, min_lr=3e-3)
    trainer = Trainer(student, data, None, cfg, tmp_path / "run", loss_terms=d.terms, teacher=teacher,
                      ce_weight=d.ce_weight)
    trainer.fit()
    losses = [r["loss_pefd"] for r in trainer.history]
    assert losses[-1] < 0.8 * losses[0], losses


# ---------------------------------------------------------------- command line
def test_distill_cli_end_to_end(tmp_path, run_cli, fmnist_dir):
    out = tmp_path / "pefd"
    code, stdout, err = run_cli("distill", "-c", CONFIGS / "fmnist_student.yaml", "--teacher", "leanvit_vit_fm_teacher",
                                "--method", "pefd", "--projectors", "2", "--data", f"fmnist:{fmnist_dir}",
                                "--split", "trainval", "--val-split", "test", "--limit", "64", "--limit-val", "16",
                                "--epochs", "1", "--batch-size", "32", "--no-progress", "--threads", "1", "-o", out)
    assert code == 0, err
    assert "distill: pefd (weight=25.0, projectors=2, relu=True, ce_weight=1)" in stdout
    log = json.loads((out / "log.json").read_text())
    assert {"loss_ce", "loss_pefd", "val_top1"} <= set(log[0]) and log[0]["step"] == 2
    state = load_checkpoint(out / "last.pt")
    assert state["run_info"]["method"] == "pefd" and state["run_info"]["teacher"] == "leanvit_vit_fm_teacher"
    assert state["run_info"]["model"] == "leanvit_vit_fm_student"  # the config's model is the student
    assert state["loss_terms"]["1.projector.linear.weight"].shape == (2 * 96, 64)
    assert set(load_file(str(out / "model.safetensors"))) == set(leanvit.create_model("leanvit_vit_fm_student")
                                                                 .state_dict())
    # resume: nothing left to do, the projectors load back
    code, stdout, err = run_cli("distill", "--student", "leanvit_vit_fm_student", "--teacher", "leanvit_vit_fm_teacher",
                                "--projectors", "2", "--data", f"fmnist:{fmnist_dir}", "--split", "trainval",
                                "--val-split", "none", "--limit", "64", "--epochs", "1", "--batch-size", "32",
                                "--no-progress", "--threads", "1", "-o", out, "--resume")
    assert code == 0, err
    assert "resumed" in stdout and "nothing to do" in stdout
    # resuming with other projectors is refused in one line
    code, stdout, err = run_cli("distill", "--teacher", "leanvit_vit_fm_teacher", "--projectors", "3",
                                "--data", f"fmnist:{fmnist_dir}", "--split", "trainval", "--val-split", "none",
                                "--limit", "64", "--epochs", "1", "--batch-size", "32", "--no-progress", "-o", out,
                                "--resume")
    assert code == 2 and "cannot resume" in err and "loss terms differ" in err and "Traceback" not in err


T = ("--teacher", "leanvit_vit_fm_teacher")


@pytest.mark.parametrize("argv, message", [
    ([*T, "--method", "fitnet"], "unknown distillation method 'fitnet'; choose one of none, kd, kd-proj, proj, pefd"),
    ([*T, "--projectors", "0"], "projectors must be an integer >= 1, got 0"),
    ([*T, "--method", "kd", "--projectors", "3"], "method 'kd' has no option 'projectors'"),
    ([*T, "--distill-weight", "-1"], "weight must be a number >= 0"),
    ([*T, "--method", "none"], "method 'none' learns from the labels alone"),
    (["--teacher", "leanvit_vit_fm_teachr"], "unknown model 'leanvit_vit_fm_teachr'"),
    ([], "method 'pefd' needs a teacher (--teacher)"),
    (["--method", "none", "--teacher-cache", "c"], "--teacher-cache keeps a teacher's outputs, and method 'none' has"),
    ([*T, "--teacher-cache", __file__], "is a file, not a folder"),
])
def test_distill_cli_errors_before_any_work(tmp_path, run_cli, argv, message):
    code, _, err = run_cli("distill", "--data", f"fmnist:{tmp_path / 'missing'}", "-o", tmp_path / "run", *argv)
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
