"""Library calls leave the process as they found it: the matplotlib backend and pyplot's figures (plots), the
global RNGs (comparisons, training runs), and a log file gets whole progress lines, not redrawn bars (training)."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import leanvit
from leanvit.data import SyntheticImages
from leanvit.engine import Trainer, TrainConfig, evaluate
from leanvit.experiments.compare import build_variants, run_comparison
from leanvit.reduce import get_reducer

from conftest import subprocess_env

# every vis function, on tiny hand-made inputs (run in this process and in a fresh one)
PLOT_ALL = """
import torch
from leanvit.analysis.calibration import calibration
from leanvit.vis import plot_cka, plot_pareto, plot_reliability, plot_token_maps

def plot_all(out):
    g = torch.Generator().manual_seed(0)
    plot_pareto([{"method": "dense", "gmacs": 1.0, "top1": 80.0}, {"method": "gtp", "gmacs": 0.6, "top1": 78.0},
                 {"method": "gtp", "gmacs": 0.8, "top1": 79.0, "top1_std": 0.3}], out / "pareto.png")
    n = 16
    eye = torch.eye(n, dtype=torch.bool)
    entry = {"block": torch.tensor(0), "tokens": torch.tensor(n), "source": eye[None],
             "state": torch.zeros(1, n, dtype=torch.uint8)}
    plot_token_maps(torch.rand(3, 32, 32, generator=g), {"gtp": [entry]}, (4, 4), out / "tokens.png")
    logits, targets = torch.randn(64, 5, generator=g), torch.randint(0, 5, (64,), generator=g)
    plot_reliability(calibration(logits, targets, n_bins=5), out / "reliability.png")
    plot_cka([[1.0, 0.5], [0.25, 0.75]], out / "cka.svg", title="cka")
"""


def _plot_all(out: Path) -> None:
    scope: dict = {}
    exec(PLOT_ALL, scope)
    scope["plot_all"](out)
    for name in ("pareto.png", "tokens.png", "reliability.png", "cka.svg"):
        assert (out / name).stat().st_size > 500, name


# ---------------------------------------------------------------- matplotlib
def test_plots_never_select_a_backend_or_use_pyplot(tmp_path, monkeypatch):
    import matplotlib
    import matplotlib.pyplot as plt

    def refuse(*args, **kwargs):
        raise AssertionError("library code called matplotlib.use")

    monkeypatch.setattr(matplotlib, "use", refuse)
    backend, figures = matplotlib.get_backend(), plt.get_fignums()
    _plot_all(tmp_path)
    assert matplotlib.get_backend() == backend
    assert plt.get_fignums() == figures  # no figure left open in pyplot's list


def test_plots_keep_the_users_backend(tmp_path):
    """In a fresh process whose user chose a (headless) backend, plotting does not switch it (and opens no pyplot
    figure; pyplot itself may be imported, by torchmetrics)."""
    script = PLOT_ALL + f"""
import sys
from pathlib import Path
import matplotlib
matplotlib.use("svg")
plot_all(Path({str(tmp_path)!r}))
plt = sys.modules.get("matplotlib.pyplot")
print(matplotlib.get_backend(), len(plt.get_fignums()) if plt else 0)
"""
    env = subprocess_env()
    env["PYTHONPATH"] = str(Path(leanvit.__file__).resolve().parents[1]) + ":" + env["PYTHONPATH"]
    env.pop("MPLBACKEND", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["svg", "0"]


# ---------------------------------------------------------------- global RNG: compare
def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=96, depth=4, num_classes=10).eval()


def test_compare_leaves_global_rng_and_random_rows_reproduce():
    model = tiny_vit()
    loader = DataLoader(SyntheticImages((3, 96, 96), num_classes=10, size=8), batch_size=4)
    opts = {"gtp-random": {"method": "gtp", "score": "random"}}
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    rows = run_comparison(model, loader, ["dense", "gtp-random"], [0.6], method_options=opts, seeds=3,
                          bench_batch=2, bench_runs=1, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    again = run_comparison(model, loader, ["dense", "gtp-random"], [0.6], method_options=opts, seeds=3,
                           bench_runs=0, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    row = rows[1]
    assert row.seeds == 3 and (row.top1, row.top1_std) == (again[1].top1, again[1].top1_std)
    # the figures of seeding the global RNG before each pass (what compare did before it had a generator)
    (_, _, variant), = build_variants(model, ["gtp-random"], [0.6], opts)
    accs = []
    for s in range(3):
        torch.manual_seed(s)
        accs.append(evaluate(variant, loader, progress=False).top1)
    assert row.top1 == pytest.approx(sum(accs) / 3, abs=1e-9)


def test_gtp_seed_is_the_global_seed_and_optional():
    model = leanvit.patch(tiny_vit(), "gtp", r=[6, 5, 4, 3], score="random")
    red = get_reducer(model)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.manual_seed(7)
        ref = [model(x), model(x)]  # two forwards: the stream goes on across forwards
        red.seed(7)
        state = torch.get_rng_state()
        ours = [model(x), model(x)]
        assert torch.equal(torch.get_rng_state(), state)  # drawn from the reducer's generator
        assert all(torch.equal(a, b) for a, b in zip(ref, ours))
        red.seed(None)
        model(x)
        assert not torch.equal(torch.get_rng_state(), state)  # back on the global RNG


# ---------------------------------------------------------------- global RNG and progress: training
def _tiny_run(tmp_path: Path, progress: bool) -> Trainer:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=32, num_heads=2, num_classes=4, drop_rate=0.1)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, 3, 32, 32, generator=g), torch.randint(0, 4, (48,), generator=g))
    cfg = TrainConfig(epochs=2, batch_size=2, progress=progress, amp=False, warmup_epochs=0, log_steps=4,
                      checkpoint_steps=0, eval_batch_size=8, mixup=0.2)
    return Trainer(model, data, TensorDataset(data.tensors[0][:16], data.tensors[1][:16]), cfg, tmp_path / "run")


def test_fit_gives_the_callers_rng_back(tmp_path):
    trainer = _tiny_run(tmp_path, progress=False)
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    trainer.fit()
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1] and np.array_equal(np.random.get_state()[1], states[2])
    # the run itself is still seeded by its config: the same weights from another caller state
    first = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    other = _tiny_run(tmp_path / "b", progress=False)
    torch.manual_seed(5)
    other.fit()
    assert all(torch.equal(first[k], v) for k, v in other.model.state_dict().items())


def test_training_progress_in_a_log_file_is_whole_lines(tmp_path, capsys):
    """stderr not a terminal (a log file): a few lines per phase (epoch, validation), never a redrawn bar."""
    _tiny_run(tmp_path, progress=True).fit()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    for phase in ("epoch 1/2", "epoch 2/2"):
        mine = [line for line in lines if line.startswith(phase + ":")]
        assert mine[0] == f"{phase}: started (24 steps)" and mine[-1].startswith(f"{phase}: done in")
        assert 3 <= len(mine) <= 6, mine
        assert any("loss=" in line for line in mine)
    val = [line for line in lines if line.startswith("val:")]
    assert len([line for line in val if "started" in line]) == 2 == len([line for line in val if "done in" in line])
    assert len(val) <= 8, val
    assert len(lines) <= 30, err


def test_no_raw_tqdm_in_library():
    """Progress output goes through leanvit.progress.track, which picks bars or lines for where stderr goes."""
    root = Path(leanvit.__file__).resolve().parent
    users = [p.relative_to(root).as_posix() for p in root.rglob("*.py")
             if "tqdm" in p.read_text() and p.name != "progress.py"]
    assert users == []

