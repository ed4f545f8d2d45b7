"""Analysis: linear CKA's invariances and its agreement with the Gram-matrix form, ECE against a case computed by
hand, and ``leanvit analyze`` end to end (JSON figures, reliability diagram and CKA heatmap)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from leanvit.analysis import calibration, cka_matrix, linear_cka
from leanvit.errors import ConfigError

PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- linear CKA
def _features(n: int = 300, d: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)  # correlated columns


def _orthogonal(d: int, seed: int = 1) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_cka_invariances():
    x = _features()
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 7.5 * x) == pytest.approx(1.0, abs=1e-12)  # isotropic scaling
    assert linear_cka(x, x.double() @ _orthogonal(12)) == pytest.approx(1.0, abs=1e-10)  # orthogonal transform
    assert linear_cka(x, 0.3 * x.double() @ _orthogonal(12) + 4.0) == pytest.approx(1.0, abs=1e-10)  # + shift
    wide = torch.cat([x, torch.zeros(300, 5)], dim=1).double() @ _orthogonal(17, seed=2)  # d2 != d1, same geometry
    assert linear_cka(x, wide) == pytest.approx(1.0, abs=1e-10)
    y = _features(seed=3)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), abs=1e-12)
    # anisotropic scaling is not an invariance
    assert linear_cka(x, x * torch.linspace(0.1, 10, 12)) < 0.99


def test_cka_of_independent_features_is_near_zero():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4000, 8, generator=g), torch.randn(4000, 6, generator=g)
    assert 0 <= linear_cka(x, y) < 0.01
    # half of y's dimensions copied from x: in between
    mixed = torch.cat([x[:, :3], y[:, :3]], dim=1)
    assert 0.2 < linear_cka(x, mixed) < 0.8


def test_cka_matches_the_gram_matrix_form():
    x, y = _features(50, 7).double(), _features(50, 4, seed=5).double()
    h = torch.eye(50, dtype=torch.float64) - 1.0 / 50  # centring matrix
    k, lg = h @ x @ x.T @ h, h @ y @ y.T @ h
    hsic = (k * lg).sum() / torch.sqrt((k * k).sum() * (lg * lg).sum())
    assert linear_cka(x, y) == pytest.approx(hsic.item(), abs=1e-12)
    assert cka_matrix([x, y], [y]) == [[pytest.approx(hsic.item(), abs=1e-12)], [pytest.approx(1.0)]]


def test_cka_errors_and_constant_features():
    with pytest.raises(ConfigError, match="same inputs"):
        linear_cka(torch.randn(5, 3), torch.randn(6, 3))
    with pytest.raises(ConfigError, match="at least two"):
        linear_cka(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ConfigError, match=r"\(n, d\)"):
        linear_cka(torch.randn(5), torch.randn(5, 3))
    assert linear_cka(torch.ones(5, 3), torch.randn(5, 2)) == 0.0


# ---------------------------------------------------------------- calibration
def test_ece_by_hand():
    # logits = log p, so softmax gives p back exactly; 15 bins of width 1/15
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.7, 0.3], [0.38, 0.62]], dtype=torch.float64)
    targets = torch.tensor([0, 1, 0, 1])
    r = calibration(probs.log(), targets, n_bins=15)
    # bin 14 [0.933, 1): two predictions at 0.95, one right -> |0.5 - 0.95| * 2/4
    # bin 10 [0.667, 0.733): 0.7, right -> |1 - 0.7| * 1/4;  bin 9 [0.6, 0.667): 0.62, right -> |1 - 0.62| * 1/4
    assert r.ece == pytest.approx(0.45 * 2 / 4 + 0.3 / 4 + 0.38 / 4, abs=1e-6)
    assert r.n == 4 and len(r.edges) == 16 and r.edges[0] == 0 and r.edges[-1] == 1
    assert [i for i, c in enumerate(r.counts) if c] == [9, 10, 14] and sum(r.counts) == 4
    assert (r.counts[14], r.accuracy[14], r.confidence[14]) == (2, 0.5, pytest.approx(0.95))
    assert (r.accuracy[9], r.confidence[9]) == (1.0, pytest.approx(0.62))
    assert r.accuracy[0] == 0.0 and r.confidence[0] == 0.0  # empty bins


def test_ece_bins_add_up_to_torchmetrics():
    g = torch.Generator().manual_seed(0)
    logits, targets = 2 * torch.randn(2000, 10, generator=g), torch.randint(0, 10, (2000,), generator=g)
    r = calibration(logits, targets)
    from_bins = sum(abs(a - c) * n for a, c, n in zip(r.accuracy, r.confidence, r.counts)) / r.n
    assert r.ece == pytest.approx(from_bins, abs=1e-6) and 0 < r.ece < 1
    with pytest.raises(ConfigError, match="bins"):
        calibration(logits, targets, n_bins=0)
    with pytest.raises(ConfigError, match="shapes"):
        calibration(logits, targets[:5])


# ---------------------------------------------------------------- command line
def test_analyze_cli_with_teacher(tmp_path, run_cli, fmnist_dir):
    out = tmp_path / "a.json"
    code, stdout, err = run_cli("analyze", "-m", "leanvit_vit_fm_student", "--teacher", "leanvit_vit_fm_teacher",
                                "--data", f"fmnist:{fmnist_dir}", "--limit", "24", "--train-split", "trainval",
                                "--limit-train", "16", "--batch-size", "8", "--no-progress", "--threads", "1",
                                "--json", out,
                                "--reliability-plot", tmp_path / "rel.png", "--cka-plot", tmp_path / "cka.png")
    assert code == 0, err
    assert "linear CKA of the pre-logits features" in stdout and "ECE" in stdout and "train-test gap" in stdout
    row = json.loads(out.read_text())
    assert row["n"] == 24 and row["train_n"] == 16 and row["bins"] == 15
    assert row["gap"] == pytest.approx(row["train_top1"] - row["top1"])
    assert 0 <= row["ece"] <= 1 and 0 <= row["teacher_ece"] <= 1 and 0 <= row["teacher_top1"] <= 100
    assert 0 < row["cka"] <= 1
    assert len(row["cka_blocks"]) == 4 and all(len(r) == 6 for r in row["cka_blocks"])  # student x teacher blocks
    assert all(0 <= v <= 1 + 1e-9 for r in row["cka_blocks"] for v in r)
    assert sum(row["calibration"]["counts"]) == 24 and len(row["calibration"]["edges"]) == 16
    for png in ("rel.png", "cka.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG


def test_analyze_cli_alone(tmp_path, run_cli, fmnist_dir):
    out = tmp_path / "a.json"
    code, _, err = run_cli("analyze", "-m", "leanvit_vit_fm_student", "--data", f"fmnist:{fmnist_dir}", "--limit",
                           "16", "--train-split", "none", "--bins", "10", "--no-progress", "--threads", "1",
                           "--json", out)
    assert code == 0, err
    row = json.loads(out.read_text())
    assert "cka" not in row and "gap" not in row and len(row["calibration"]["counts"]) == 10
    assert math.isfinite(row["ece"])


@pytest.mark.parametrize("argv, message", [
    (["--cka-plot", "c.png"], "--cka-plot compares with a teacher; pass --teacher"),
    (["--bins", "0"], "argument --bins: must be at least 1, got 0"),
    (["--reliability-plot", "r.xyz"], "--reliability-plot r.xyz: cannot write plots as 'xyz'"),
    (["--teacher", "no_such_vit"], "unknown model 'no_such_vit'"),
])
def test_analyze_cli_errors_before_any_work(tmp_path, run_cli, argv, message):
    code, _, err = run_cli("analyze", "--data", f"fmnist:{tmp_path / 'missing'}", *argv)
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
