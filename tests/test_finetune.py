"""IdleViT's fine-tuning recipe: the token cut and self-distillation losses against values computed by hand, the
token cut term on a stub reducer, and ``leanvit finetune`` end to end (patch recorded, frozen tokens, loss parts,
resume) with its bad-input errors."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import leanvit
from leanvit.engine import load_checkpoint
from leanvit.errors import ConfigError
from leanvit.engine.losses import (LogitKDTerm, NormalizedFeatureMSETerm, TokenCutTerm, token_cut_loss,
                                   token_cut_terms)
from leanvit.finetune import finetune_terms
from conftest import step_context as _ctx

# One idle layer, B = 1, N = 4 (cls + 3 image tokens). Logits are log(A): softmax(log a) = a / sum(a), so the
# attention rows are A / 10 exactly (every row of A sums to 10).
A = [[1.0, 2.0, 3.0, 4.0],
     [4.0, 3.0, 2.0, 1.0],
     [2.0, 2.0, 2.0, 4.0],
     [1.0, 1.0, 4.0, 4.0]]
MASK = [1.0, 1.0, 0.0, 1.0]  # cls and tokens 1, 3 selected; token 2 idle


def _layer(a=A, mask=MASK) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(a).log().unsqueeze(0), torch.tensor(mask).unsqueeze(0)


def _by_hand(a, m, num_prefix=1) -> tuple[float, float]:
    """The loss written out with Python floats: rows normalised, mean of squares over the N rows."""
    n = len(m)
    W = [[a[i][j] / sum(a[i]) for j in range(n)] for i in range(n)]
    cut = [sum(abs(m[i] - m[j]) * W[i][j] for j in range(num_prefix, n)) for i in range(n)]
    assoc = [sum(m[i] * m[j] * W[i][j] for j in range(n)) for i in range(n)]
    return sum(c ** 2 for c in cut) / n, sum((s - m[i]) ** 2 for i, s in enumerate(assoc)) / n


# ---------------------------------------------------------------- token cut loss
def test_token_cut_by_hand():
    # cut_i (cls column left out): row 0: W02 = .3; row 1: W12 = .2; row 2 (idle): W21 + W23 = .2 + .4; row 3: W32
    # = .4; mean of squares (.09 + .04 + .36 + .16) / 4. assoc_i: .1+.2+.4, .4+.3+.1, 0, .1+.1+.4 against m:
    # (.09 + .04 + 0 + .16) / 4
    assert _by_hand(A, MASK) == pytest.approx((0.1625, 0.0725))
    cut, assoc = token_cut_terms(*_layer())
    assert cut.item() == pytest.approx(0.1625, rel=1e-6)
    assert assoc.item() == pytest.approx(0.0725, rel=1e-6)
    assert token_cut_loss(*_layer()).item() == pytest.approx(0.235, rel=1e-6)


def test_token_cut_means_over_batch_and_rows():
    # a second image with every token selected has no cut and full association: the batch mean halves the loss
    logits, mask = _layer()
    logits = torch.cat([logits, logits])
    mask = torch.cat([mask, torch.ones(1, 4)])
    cut, assoc = token_cut_terms(logits, mask)
    assert cut.item() == pytest.approx(0.1625 / 2, rel=1e-6)
    assert assoc.item() == pytest.approx(0.0725 / 2, rel=1e-6)


def test_token_cut_leaves_every_prefix_column_out():
    # two prefix tokens: column 1 is not cut either; row 2 keeps only W23 = .4
    assert _by_hand(A, MASK, num_prefix=2)[0] == pytest.approx((0.09 + 0.04 + 0.16 + 0.16) / 4)
    cut, _ = token_cut_terms(*_layer(), num_prefix=2)
    assert cut.item() == pytest.approx(0.1125, rel=1e-6)


def test_token_cut_gradient_reaches_logits_not_mask():
    logits, mask = _layer()
    logits.requires_grad_(True)
    mask.requires_grad_(True)
    token_cut_loss(logits, mask).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert mask.grad is None


def test_token_cut_shape_errors():
    with pytest.raises(ValueError, match="expected logits"):
        token_cut_loss(torch.zeros(1, 4, 3), torch.ones(1, 4))


class _StubReducer:
    """What the idle reducer exposes after a training forward: ``cut_inputs`` and ``info.num_prefix``."""

    records_cut_inputs = True

    class info:
        num_prefix = 1

    def __init__(self, cut_inputs):
        self.cut_inputs = cut_inputs




def test_token_cut_term_averages_the_idle_layers(monkeypatch):
    logits, mask = _layer()
    full = {"logits": logits, "mask": torch.ones(1, 4)}  # nothing idle: 0
    stub = _StubReducer([{"logits": logits, "mask": mask}, full])
    monkeypatch.setattr("leanvit.engine.losses.get_reducer", lambda model: stub)
    term = TokenCutTerm()
    assert term.weight == 20.0 and term.name == "token_cut"
    assert term(_ctx(torch.zeros(1, 3))).item() == pytest.approx((0.235 + 0.0) / 2, rel=1e-6)
    stub.cut_inputs = []  # eval mode: no idle layer recorded
    assert term(_ctx(torch.zeros(1, 3))).item() == 0.0


def test_token_cut_term_needs_an_idling_reducer(monkeypatch):
    monkeypatch.setattr("leanvit.engine.losses.get_reducer", lambda model: None)
    with pytest.raises(ConfigError, match="cut_inputs"):
        TokenCutTerm()(_ctx(torch.zeros(1, 3)))


# ---------------------------------------------------------------- self-distillation
def test_self_distill_logits_by_hand():
    # T = 1: log p_t - log p_s = t - s = (2, 0, -2) (same log-sum-exp), so KL = 2 p_t[0] - 2 p_t[2]
    e = math.exp
    kl = 2 * (e(3) - e(1)) / (e(3) + e(2) + e(1))
    ctx = _ctx(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), t_logits=torch.tensor([[3.0, 2.0, 1.0], [0.0] * 3]))
    term = next(t for t in finetune_terms(nn.Identity()) if t.name == "sd_logits")
    assert isinstance(term, LogitKDTerm) and term.weight == 10.0 and term.temperature == 1.0
    assert term(ctx).item() == pytest.approx(kl / 2, rel=1e-6)  # batch mean; the second row has no loss


def test_self_distill_features_by_hand():
    # (3, 4) -> (.6, .8) against (1, 0): squared differences .16 and .64, mean over 2 rows x 2 channels with an
    # identical second row
    x = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    t = torch.tensor([[5.0, 0.0], [0.0, 7.0]])
    term = next(t for t in finetune_terms(nn.Identity()) if t.name == "sd_features")
    assert isinstance(term, NormalizedFeatureMSETerm) and term.weight == 1000.0 and term.needs_features
    assert term(_ctx(torch.zeros(2, 3), features=x, t_features=t)).item() == pytest.approx(0.8 / 4, rel=1e-6)


def test_finetune_terms_add_token_cut_only_for_an_idling_reducer(monkeypatch):
    monkeypatch.setattr("leanvit.finetune.recipe.get_reducer", lambda model: _StubReducer([]))
    names = [t.name for t in finetune_terms(nn.Identity())]
    assert names == ["sd_logits", "sd_features", "token_cut"]
    assert [t.name for t in finetune_terms(nn.Identity(), token_cut_weight=0, features_weight=0)] == ["sd_logits"]
    monkeypatch.setattr("leanvit.finetune.recipe.get_reducer", lambda model: object())  # e.g. EViT's reducer
    assert [t.name for t in finetune_terms(nn.Identity())] == ["sd_logits", "sd_features"]


def test_pyramid_gets_no_token_cut_term():
    """A pyramid's idle reducer records no cut inputs (its maps are not square): no always-zero term."""
    import timm

    model = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=10)
    leanvit.patch(model, "idle", keep=0.7)
    assert [t.name for t in finetune_terms(model)] == ["sd_logits", "sd_features"]


# ---------------------------------------------------------------- leanvit finetune
STUDENT = "leanvit_vit_fm_student"


def _argv(out, *extra) -> list:
    return ["finetune", STUDENT, "--method", "evit", "--keep", "0.7", "--data", "synthetic:32",
            "--val-split", "test", "--limit-val", "16", "--epochs", "2", "--batch-size", "16", "--no-progress",
            "--threads", "1", "-o", out, *extra]


def test_finetune_cli_end_to_end(tmp_path, run_cli, monkeypatch):
    from leanvit.engine.train import Trainer

    out = tmp_path / "evit"
    # interrupt the run after its first epoch (as a kill would: epoch 1's checkpoint is on disk)
    train_epoch = Trainer._train_epoch

    def interrupted(self):
        if self.epoch == 1:
            raise KeyboardInterrupt
        return train_epoch(self)

    monkeypatch.setattr(Trainer, "_train_epoch", interrupted)
    code, stdout, err = run_cli(*_argv(out))
    assert code == 130, err
    assert "finetune: leanvit_vit_fm_student patched with evit (keep=0.7, fuse=mean)" in stdout
    assert "loss: ce 1, sd_logits 10, sd_features 1000 (no token cut: evit idles no tokens)" in stdout
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    monkeypatch.setattr(Trainer, "_train_epoch", train_epoch)

    code, stdout, err = run_cli(*_argv(out, "--resume"))
    assert code == 0, err
    assert "resumed" in stdout and "at epoch 1" in stdout

    # the patch is in config.yaml, the checkpoint and the weights' metadata
    patch = {"method": "evit", "keep": 0.7, "options": {"fuse": "mean"}}
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["patch"] == patch and cfg["model"] == STUDENT
    assert (cfg["lr"], cfg["warmup_epochs"], cfg["ema_decay"], cfg["frozen"]) == (2e-5, 0.0, 0.99994,
                                                                                 ["cls_token", "pos_embed"])
    state = load_checkpoint(out / "last.pt")
    assert state["run_info"]["patch"] == patch and state["epoch"] == 2
    assert [tuple(t) for t in state["terms"]] == [("ce", 1.0), ("sd_logits", 10.0), ("sd_features", 1000.0)]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["patch"]) == patch

    # loss parts under distinct names, both epochs logged, the EMA evaluated
    log = json.loads((out / "log.json").read_text())
    assert [r["epoch"] for r in log] == [1, 2]
    assert {"loss", "loss_ce", "loss_sd_logits", "loss_sd_features", "val_top1", "val_ema_top1"} <= set(log[-1])
    assert log[-1]["loss_sd_features"] > 0

    # cls token and position embedding frozen; every other weight moved from the pretrained ones
    start = leanvit.create_model(STUDENT, pretrained=True).state_dict()
    end = load_file(str(out / "model.safetensors"))
    assert end.keys() == start.keys()
    unchanged = sorted(k for k in start if torch.equal(start[k], end[k]))
    assert unchanged == ["cls_token", "pos_embed"]
    # the exported weights rebuild the fine-tuned model: dense weights + the recorded patch
    model = leanvit.create_model(STUDENT, weights=str(out / "model.safetensors"))
    leanvit.patch(model, patch["method"], keep=patch["keep"], **patch["options"])
    assert leanvit.get_reducer(model).options() == patch["options"]

    # the run's own config.yaml runs it again (patch recorded, not set; --output is required on the command
    # line): nothing left to do
    code, stdout, err = run_cli("finetune", "-c", out / "config.yaml", "-o", out)
    assert code == 0, err
    assert "nothing to do" in stdout

    # another keep rate is another model: resuming is refused in one line
    before = (out / "last.pt").read_bytes()
    code, _, err = run_cli(*_argv(out, "--resume")[:-3], "--keep", "0.5", "-o", out, "--resume")
    assert code == 2 and "cannot resume" in err and "patch" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert (out / "last.pt").read_bytes() == before


@pytest.mark.parametrize("argv, message", [
    (["--keep", "0.7"], "give the token reduction to fine-tune with: --method"),
    (["--method", "dense"], "finetune trains a patched model"),
    (["--method", "dense", "--keep", "0.7"], "finetune trains a patched model"),
    (["--method", "foo", "--keep", "0.7"], "unknown method 'foo'"),
    (["--method", "evit"], "needs --r, --budget or --keep"),
    (["--method", "evit", "--keep", "1.5"], "--keep"),
    (["--method", "evit", "--keep", "0"], "--keep"),
    (["--method", "evit", "--keep", "0.7", "--budget", "0.5"], "not --budget and --keep"),
    (["--method", "evit", "--keep", "0.7", "-O", "fuse=3"], "option 'fuse' of 'evit'"),
    (["--method", "evit", "--keep", "0.7", "--sd-features-weight", "-1"], "--sd-features-weight"),
    (["--method", "evit", "--keep", "0.7", "--patch", "x"], "--patch"),
    (["--method", "evit", "--keep", "0.7", "--model", STUDENT], "unrecognized arguments: --model"),
])
def test_finetune_cli_errors_before_any_work(tmp_path, run_cli, argv, message):
    code, _, err = run_cli("finetune", STUDENT, "--data", f"fmnist:{tmp_path / 'missing'}", "-o", tmp_path / "run",
                           *argv)
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_finetune_idle_adds_the_token_cut_loss(tmp_path, run_cli):
    out = tmp_path / "idle"
    code, stdout, err = run_cli("finetune", STUDENT, "--method", "idle", "--keep", "0.7", "--data", "synthetic:16",
                                "--val-split", "none", "--epochs", "1", "--batch-size", "16", "--no-progress",
                                "--threads", "1", "-o", out)
    assert code == 0, err
    assert "sd_logits 10, sd_features 1000, token_cut 20" in stdout
    log = json.loads((out / "log.json").read_text())
    assert log[0]["loss_token_cut"] > 0
    assert yaml.safe_load((out / "config.yaml").read_text())["patch"]["method"] == "idle"
    assert ("token_cut", 20.0) in [tuple(t) for t in load_checkpoint(out / "last.pt")["terms"]]
