"""leanvit tune: the search meets its constraint on the held-out split, is deterministic with a seed, reads the test
split once and only after the choice, ends an impossible constraint with a message, searches idle only on weights
fine-tuned for it; and the CLI verb end to end on the shipped student."""
from __future__ import annotations

import copy
import json
import math

import pytest
import timm
import torch
from torch.utils.data import Dataset

import leanvit
from leanvit.errors import ConfigError
from leanvit.experiments.tune import search_space, tune


class Logged(Dataset):
    """A dataset that appends ``(name, index)`` to a shared log at every read."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, name: str, log: list):
        self.x, self.y, self.name, self.log = x, y, name, log

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        self.log.append((self.name, i))
        return self.x[i], int(self.y[i])


def tiny_vit() -> torch.nn.Module:
    """A 3-block ViT on 6x6 tokens whose weights are drawn with std 0.2: at timm's init (0.02) it gives every
    random image the same class, whatever is removed, and no budget would cost accuracy."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=24, patch_size=4, depth=3,
                              embed_dim=32, num_heads=2, num_classes=10).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model


@pytest.fixture
def setup():
    """A tiny ViT (36 image tokens, 3 blocks) and random images labelled by the model itself, so that dense is
    right on every image and a reduced model loses what it changes: ``(model, heldout, test, log)``."""
    model = tiny_vit()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 3, 24, 24, generator=g)
    with torch.no_grad():
        y = model(x).argmax(-1)
    log: list = []
    return model, Logged(x[:64], y[:64], "heldout", log), Logged(x[64:], y[64:], "test", log), log


def token_speed(models, warmup, runs, rounds):
    """A deterministic stand-in for wall-clock timing: images/s inversely proportional to the tokens the blocks
    compute."""
    return {name: 1e4 / sum(leanvit.reduce.tokens_per_block(m)) for name, m in models.items()}


def run(setup, **kw):
    """tune with a small grid (GTP's orphans and EViT's fuse searched, the rest fixed) and token-count speeds."""
    model, heldout, test, _ = setup
    kw.setdefault("space", {"gtp": {"alpha": [1.5], "graph": ["semantic"], "orphans": ["merge", "drop"],
                                    "score": ["mixed"]}, "tome": {"prop_attn": [True]},
                            "evit": {"fuse": ["mean", None]}})
    return tune(model, heldout, test, measure_speed=token_speed, progress=False, eval_batch=32, **kw)


def held_out_top1(model, ds) -> float:
    with torch.no_grad():
        x = torch.stack([ds.x[i] for i in range(len(ds))])
        return 100.0 * model(x).argmax(-1).eq(ds.y).float().mean().item()


def test_max_drop_is_met_on_the_held_out_split(setup):
    model, heldout, _, _ = setup
    res = run(setup, max_drop=8.0)
    assert res.met and res.chosen is not None
    c = res.chosen
    assert c.images == len(heldout) and c.drop <= 8.0 and c.speedup > 1.0
    # the recipe, applied to a fresh copy, gives the held-out top-1 the search reported, within the limit
    tuned = leanvit.patch(copy.deepcopy(model), recipe=res.recipe(name="tiny"))
    top1 = held_out_top1(tuned, heldout)
    assert top1 == pytest.approx(c.top1)
    assert 100.0 - top1 <= 8.0
    # the chosen is the fastest configuration within the limit among those read on the whole split
    within = [t for t in res.trials if t.images == len(heldout) and t.drop <= 8.0 and any(t.schedule)
              and not math.isnan(t.speedup)]
    assert c.speedup >= max(t.speedup for t in within) - 1e-9


def test_target_speedup_is_met(setup):
    res = run(setup, target_speedup=1.3)
    assert res.met and res.chosen.speedup >= 1.3
    faster = [t for t in res.trials if t.images == res.dense["images"] and t.speedup >= 1.3 and t.verdict]
    assert res.chosen.top1 >= max(t.top1 for t in faster) - 1e-9


def test_a_method_far_behind_has_no_option_search(setup):
    """A method whose boundary runs far slower than the best method's has no option search (stage 3) and no
    refined boundary; the log says why."""
    def slow_gtp(models, warmup, runs, rounds):
        speed = token_speed(models, warmup, runs, rounds)
        return {k: v / 3 if getattr(leanvit.get_reducer(models[k]), "name", None) == "gtp" else v
                for k, v in speed.items()}

    model, heldout, test, _ = setup
    lines: list[str] = []
    res = tune(model, heldout, test, max_drop=8.0, measure_speed=slow_gtp, progress=False, log=lines.append,
               space={"gtp": {"orphans": ["merge", "drop"], "graph": ["semantic"], "alpha": [1.5],
                              "score": ["mixed"]}, "tome": {"prop_attn": [True]}, "evit": {"fuse": ["mean"]}})
    assert any(line.startswith("options not searched for gtp") for line in lines), lines
    gtp = [t for t in res.trials if t.method == "gtp"]
    assert gtp and all(t.stage == "budget" for t in gtp)  # no option search, no refined boundary
    assert res.chosen.method != "gtp"


def test_search_is_deterministic_with_a_seed(setup):
    a = run(setup, max_drop=8.0, seed=3)
    b = run(setup, max_drop=8.0, seed=3)
    key = [(t.label, t.schedule, t.images, t.top1) for t in a.trials]
    assert key == [(t.label, t.schedule, t.images, t.top1) for t in b.trials]
    assert a.chosen.label == b.chosen.label and a.chosen.top1 == b.chosen.top1


def test_test_split_is_read_once_and_only_after_the_choice(setup):
    _, _, test, log = setup
    res = run(setup, max_drop=8.0)
    assert res.met and res.test["images"] == len(test)
    first_test = next(i for i, (name, _) in enumerate(log) if name == "test")
    assert all(name == "test" for name, _ in log[first_test:]), "a held-out read after the test split was read"
    assert sorted(i for name, i in log if name == "test") == list(range(len(test)))  # each test image once


def test_impossible_target_ends_with_the_best_found(setup):
    _, _, _, log = setup
    res = run(setup, target_speedup=10.0)
    assert not res.met and res.chosen is None and res.best is not None
    assert "no configuration reaches a 10x speed-up" in res.message and res.best.label in res.message
    assert res.best.speedup == max(t.speedup for t in res.trials if not math.isnan(t.speedup))
    assert not any(name == "test" for name, _ in log)  # nothing chosen: the test split is never read
    with pytest.raises(ConfigError, match="no configuration"):
        res.recipe()


def test_idle_only_on_weights_fine_tuned_for_it(setup):
    model = setup[0]
    assert "idle" not in search_space(model)
    with pytest.raises(ConfigError, match="not training-free.*fine-tuned"):
        search_space(model, methods=["gtp", "idle"])
    finetuned = leanvit.patch(copy.deepcopy(model), "idle", keep=0.7)  # as a fine-tuned zoo model comes
    assert list(search_space(finetuned)) == ["gtp", "tome", "evit", "idle"]
    res = run((finetuned, *setup[1:]), max_drop=8.0, methods=["idle"], space=None)
    assert {t.method for t in res.trials} == {"idle"} and res.chosen.schedule_counts == "idle"
    assert leanvit.get_reducer(finetuned).schedule == leanvit.get_reducer(
        leanvit.patch(copy.deepcopy(model), "idle", keep=0.7)).schedule  # the caller's model is left as it came


def test_bad_settings_are_refused(setup):
    model, heldout, test, _ = setup
    with pytest.raises(ConfigError, match="one constraint"):
        tune(model, heldout, test, progress=False)
    with pytest.raises(ConfigError, match="one constraint"):
        tune(model, heldout, test, max_drop=1.0, target_speedup=1.5, progress=False)
    with pytest.raises(ConfigError, match="above 1"):
        tune(model, heldout, test, target_speedup=0.9, progress=False)
    with pytest.raises(ConfigError, match="unknown runtime"):
        tune(model, heldout, test, max_drop=1.0, runtime="tensorrt", progress=False)
    with pytest.raises(ConfigError, match="alpha"):
        tune(model, heldout, test, max_drop=1.0, space={"gtp": {"alpha": [-1.0]}}, progress=False)


@pytest.mark.slow
def test_onnxruntime_runtime_times_exported_models(setup):
    """Bench's ONNX Runtime runtime: every timed configuration is exported (and checked against PyTorch)."""
    pytest.importorskip("onnxruntime")
    model, heldout, test, _ = setup
    res = tune(model, heldout, test, max_drop=50.0, methods=["tome"], space={"tome": {"prop_attn": [True]}},
               runtime="onnxruntime", batch=8, progress=False)
    timed = [t for t in res.trials if not math.isnan(t.speedup)]
    assert res.settings["runtime"] == "onnxruntime" and timed and all(t.images_per_s > 0 for t in timed)


# ------------------------------------------------------------------------------------------------ the CLI verb
def test_cli_tune_writes_a_recipe_that_eval_applies(tmp_path, run_cli, fmnist_dir):
    out = tmp_path / "r.yaml"
    code, stdout, err = run_cli("tune", "leanvit_vit_fm_student", "--data", f"fmnist:{fmnist_dir}", "--max-drop",
                                "50", "--methods", "tome", "-O", "tome.prop_attn=true", "--bench-batch", "8",
                                "--bench-runs", "2", "-o", out, "--no-progress")
    assert code == 0, err
    assert out.is_file() and (tmp_path / "r.json").is_file() and (tmp_path / "r.png").is_file()
    rec = leanvit.read_recipe(out)
    trials = json.loads((tmp_path / "r.json").read_text())
    assert trials["met"] and trials["chosen"]["schedule"] == rec.schedule
    assert rec.record["heldout"]["split"] == "val" and "speedup" in rec.record["speed"]
    assert {"leanvit", "timm", "torch"} <= set(rec.record["versions"])
    assert f"held-out top-1 {rec.record['heldout']['top1']:.2f}%" in stdout
    # eval --recipe runs exactly the tuned model: its held-out top-1 is the one tune reported
    code, stdout, err = run_cli("eval", "--recipe", out, "--data", f"fmnist:{fmnist_dir}", "--split", "val",
                                "--no-progress")
    assert code == 0, err
    assert f"top-1 {rec.record['heldout']['top1']:.2f}%" in stdout
    assert "--recipe" in err and "patches leanvit_vit_fm_student" in err


def test_cli_impossible_target_is_a_message_not_a_traceback(tmp_path, run_cli, fmnist_dir):
    out = tmp_path / "r.yaml"
    code, stdout, err = run_cli("tune", "-m", "leanvit_vit_fm_student", "--data", f"fmnist:{fmnist_dir}",
                                "--target-speedup", "10", "--methods", "tome", "-O", "tome.prop_attn=true",
                                "--bench-batch", "4", "--bench-runs", "1", "-o", out, "--no-progress")
    assert code == 1
    assert "Traceback" not in err and "no configuration reaches a 10x speed-up" in stdout
    assert "fastest found: tome" in stdout and "no recipe written" in err
    assert not out.exists() and (tmp_path / "r.json").is_file()


def test_cli_bad_input_is_refused_before_work(tmp_path, run_cli, fmnist_dir):
    data = f"fmnist:{fmnist_dir}"
    code, _, err = run_cli("tune", "--data", data, "-o", tmp_path / "r.yaml")
    assert code == 2 and "one constraint" in err
    code, _, err = run_cli("tune", "--data", data, "--max-drop", "1", "--target-speedup", "2")
    assert code == 2 and "one constraint" in err
    code, _, err = run_cli("tune", "--data", data, "--max-drop", "1", "-o", tmp_path)
    assert code == 2 and "is a folder" in err
    code, _, err = run_cli("tune", "--data", data, "--max-drop", "1", "-o", tmp_path / "r.txt")
    assert code == 2 and ".yaml" in err
    code, _, err = run_cli("tune", "-m", "leanvit_vit_fm_student", "--data", data, "--max-drop", "1",
                           "--methods", "idle", "-o", tmp_path / "r.yaml")
    assert code == 2 and "fine-tuned" in err
    code, _, err = run_cli("tune", "--data", data, "--max-drop", "1", "--heldout-split", "test")
    assert code == 2 and "must not read" in err
    assert not list(tmp_path.iterdir())
