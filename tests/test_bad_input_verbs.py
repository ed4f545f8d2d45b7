"""The verbs that use a trained model (eval, bench, compare) against input that used to give a wrong or misleading
answer instead of an error or a clear report: a comparison cell a method cannot run, a model that comes patched,
a weights file that records its patch, a run's own config.yaml, a head that would be untrained, an interrupt."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import timm
import torch
import yaml

import leanvit
from leanvit.analysis import count_macs
from leanvit.errors import ConfigError
from leanvit.io import save_weights
from leanvit.progress import track
from leanvit.zoo import RUNS_DIR, weight_file

STUDENT = "leanvit_vit_fm_student"
IDLE70 = "leanvit_vit_fm_teacher_idle70"  # the reference teacher fine-tuned with idle at keep 0.7, created patched
SHUFFLE = "leanvit_shuffle_fm_mlp_grouped"  # GTP cannot reach 0.5 of its MACs, idle refuses its blocks


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("leanvit: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _weights_with_patch(tmp_path: Path, name: str, patch: dict) -> Path:
    """``name``'s shipped weights saved again with ``patch`` in the metadata, as leanvit finetune writes it."""
    model = timm.create_model(name, pretrained=True)
    path = tmp_path / f"{name}-patched.safetensors"
    save_weights(model, path, metadata={"model": name, "patch": json.dumps(patch)})
    return path


# ---------------------------------------------------------------------------------------------------------------
# 1. a cell of compare that cannot be run is a row that says why; the rest of the table runs
def test_compare_reports_unreachable_cells_and_runs_the_rest(run_cli, fmnist_dir, tmp_path):
    """GTP cannot reach half the MACs of the channel-shuffle student (its own graph work makes it aim at 0.39) and
    idle refuses channel-shuffle blocks: those cells used to end the whole table with a number the user never
    typed. Now they are rows with '-' figures and the reason, named with the budget as typed, and the plot skips
    them."""
    out_json, out_png = tmp_path / "rows.json", tmp_path / "pareto.png"
    code, out, err = run_cli("compare", "-m", SHUFFLE, "--data", f"fmnist:{fmnist_dir}", "--limit", "8",
                             "--methods", "dense,gtp,idle", "--budgets", "0.9,0.5", "--bench-runs", "0",
                             "--no-progress", "--json", out_json, "--plot", out_png)
    assert code == 0, err
    rows = {(r["method"], r["budget"]): r for r in _json(out_json)["rows"]}
    assert list(rows) == [("dense", 1.0), ("gtp", 0.9), ("gtp", 0.5), ("idle", 0.9), ("idle", 0.5)]
    assert rows["dense", 1.0]["error"] is None and rows["gtp", 0.9]["error"] is None
    assert 0 <= rows["gtp", 0.9]["top1"] <= 100
    gtp = rows["gtp", 0.5]
    assert gtp["error"].startswith("budget 0.5 cannot be reached") and gtp["top1"] is None and gtp["gmacs"] is None
    assert all("does not support channel-shuffle" in rows["idle", b]["error"] for b in (0.9, 0.5))
    assert "0.3919" not in out + err  # the solver's internal target is nobody's business
    table = [line for line in out.splitlines() if line.startswith("gtp ") and "0.50" in line]
    assert len(table) == 1 and " - " in table[0] and "not run: budget 0.5 cannot be reached" in table[0]
    assert "3 of 5 cells not run" in out
    assert out_png.is_file() and out_png.stat().st_size > 1000


def test_run_comparison_rows_for_cells_that_cannot_run():
    """The Python API keeps going too (a row with ``error``), and build_variants, which hands back models, raises
    the refusal naming the method and the budget as given."""
    from leanvit.experiments.compare import build_variants, format_table, run_comparison

    torch.manual_seed(0)
    model = timm.create_model("test_vit").eval()
    rows = run_comparison(model, None, ["dense", "gtp", "idle"], [0.9, 0.2], bench_runs=0, progress=False)
    by = {(r.method, r.budget): r for r in rows}
    assert by["gtp", 0.9].error is None and by["gtp", 0.9].macs_ratio <= 0.9 + 1e-9
    assert by["gtp", 0.2].error.startswith("budget 0.2 cannot be reached")
    assert by["idle", 0.2].error.startswith("budget 0.2 cannot be reached")  # not 'budget 0.200'
    assert by["gtp", 0.2].as_dict()["error"] == by["gtp", 0.2].error
    assert "not run: budget 0.2" in format_table(rows)
    with pytest.raises(ConfigError, match=r"^gtp: budget 0.2 cannot be reached"):
        build_variants(model, ["gtp"], [0.2])


# ---------------------------------------------------------------------------------------------------------------
# 2. one meaning of dense and of the patch a model carries, in eval, bench and compare
def test_eval_dense_unpatches_and_no_method_runs_as_shipped(run_cli, fmnist_dir, tmp_path):
    """``--method dense`` on a model created patched used to run it patched, and eval's JSON named no method."""
    data = ["--data", f"fmnist:{fmnist_dir}", "--limit", "8", "--no-progress"]
    code, out, err = run_cli("eval", "-m", IDLE70, *data, "--json", tmp_path / "shipped.json")
    assert code == 0, err
    assert f"note: {IDLE70} comes patched (idle, keep 0.7); running it as shipped; --method dense runs it unpatched" \
        in err
    shipped = _json(tmp_path / "shipped.json")
    assert shipped["method"] == "idle" and shipped["patch_source"] == "model" and shipped["keep"] == 0.7
    assert shipped["schedule"] == leanvit.get_reducer(timm.create_model(IDLE70)).schedule
    code, out, err = run_cli("eval", "-m", IDLE70, *data, "--method", "dense", "--json", tmp_path / "dense.json")
    assert code == 0, err
    dense = _json(tmp_path / "dense.json")
    assert dense["method"] == "dense" and dense["schedule"] == [] and dense["patch_source"] is None
    assert "idle:" not in out  # no reducer ran
    # a schedule without a method is still refused (no --method is not a method)
    code, _, err = run_cli("eval", "-m", IDLE70, *data, "--keep", "0.5")
    assert code == 2 and "pick a --method" in _one_error_line(err)


def test_bench_percent_of_dense_is_of_the_unpatched_model(run_cli, tmp_path):
    """bench used to call a patched model's own MACs "dense" (100% at 0.119 GMACs while compare's dense was the
    unpatched 0.184)."""
    fast = ["--runs", "1", "--warmup", "0", "-b", "1", "--no-progress"]
    code, out, err = run_cli("bench", "-m", IDLE70, *fast, "--json", tmp_path / "shipped.json")
    assert code == 0, err
    shipped = _json(tmp_path / "shipped.json")
    assert "comes patched (idle, keep 0.7); running it as shipped" in err
    code, out, err = run_cli("bench", "-m", IDLE70, *fast, "--method", "dense", "--json", tmp_path / "dense.json")
    assert code == 0, err
    dense = _json(tmp_path / "dense.json")
    unpatched = count_macs(timm.create_model("leanvit_vit_fm_teacher")).gmacs
    assert dense["method"] == "dense" and dense["gmacs"] == pytest.approx(unpatched)
    assert dense["macs_fraction"] == pytest.approx(1.0)
    assert shipped["method"] == "idle" and shipped["keep"] == 0.7 and shipped["patch_source"] == "model"
    assert shipped["dense_gmacs"] == pytest.approx(unpatched) and shipped["macs_fraction"] < 0.75


def test_weights_that_record_a_patch_run_patched(run_cli, fmnist_dir, tmp_path):
    """A fine-tuned file records its patch in its metadata; eval used to ignore it and evaluate the dense model.
    The patch is applied (and said), ``--method`` still overrides it, and compare shows it as its shipped row."""
    weights = _weights_with_patch(tmp_path, STUDENT, {"method": "evit", "keep": 0.5, "options": {"fuse": "mean"}})
    data = ["--data", f"fmnist:{fmnist_dir}", "--limit", "8", "--no-progress"]
    code, out, err = run_cli("eval", "-m", STUDENT, "--weights", weights, *data, "--json", tmp_path / "e.json")
    assert code == 0, err
    assert f"weights file {weights} records the patch it was fine-tuned with (evit, keep 0.5)" in err
    row = _json(tmp_path / "e.json")
    assert row["method"] == "evit" and row["patch_source"] == "weights" and row["keep"] == 0.5 and row["schedule"]
    code, out, err = run_cli("eval", "-m", STUDENT, "--weights", weights, *data, "--method", "dense",
                             "--json", tmp_path / "d.json")
    assert code == 0 and _json(tmp_path / "d.json")["method"] == "dense" and "--method dense runs it unpatched" in err
    code, out, err = run_cli("compare", "-m", STUDENT, "--weights", weights, *data, "--methods", "dense",
                             "--bench-runs", "0", "--json", tmp_path / "c.json")
    assert code == 0, err
    assert [r["method"] for r in _json(tmp_path / "c.json")["rows"]] == ["dense", "evit-shipped"]


def test_weights_whose_patch_the_model_cannot_take_are_refused(run_cli, fmnist_dir, tmp_path):
    weights = _weights_with_patch(tmp_path, SHUFFLE, {"method": "idle", "keep": 0.7, "options": {}})
    code, _, err = run_cli("eval", "-m", SHUFFLE, "--weights", weights, "--data", f"fmnist:{fmnist_dir}",
                           "--limit", "8", "--no-progress")
    assert code == 2
    line = _one_error_line(err)
    assert f"weights file {weights} records the patch it was fine-tuned with (idle, keep 0.7)" in line
    assert "cannot take" in line and "channel-shuffle" in line


def test_checkpoint_run_info_patch_is_read(tmp_path):
    """A leanvit checkpoint (last.pt) records the patch in its run_info; it is read without running code."""
    from leanvit.cli.build import weights_patch

    model = timm.create_model(STUDENT)
    path = tmp_path / "last.pt"
    torch.save({"model": model.state_dict(), "run_info": {"patch": {"method": "idle", "keep": 0.7,
                                                                    "options": {"path": "auto"}}}}, path)
    assert weights_patch(path) == {"method": "idle", "keep": 0.7, "options": {"path": "auto"}}
    save_weights(model, tmp_path / "plain.safetensors")
    assert weights_patch(tmp_path / "plain.safetensors") is None


def test_run_record_keeps_model_and_data_and_notes_the_rest(capsys):
    """A run's config.yaml (save_resolved: every option of the run and its ``command``) is read by the verbs that
    use a trained model as its model, head and data; its training settings are ignored with one note. A config
    written by hand is left as it is, so its unknown keys stay errors."""
    from leanvit.cli.build import adapt_run_record

    path = RUNS_DIR / IDLE70 / "config.yaml"
    record = yaml.safe_load(path.read_text())
    taken = adapt_run_record(path, record, known={"model", "data", "num_classes", "split", "batch_size", "method"})
    assert taken == {"model": "leanvit_vit_fm_teacher", "data": "fmnist", "num_classes": None}
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"note: config file {path} is the record of a `leanvit finetune` run")
    assert "split" in err[0] and "epochs" in err[0]
    hand = {"model": STUDENT, "epochz": 3}
    assert adapt_run_record("mine.yaml", hand, known={"model"}) == hand


def test_run_config_yaml_can_be_passed_back(run_cli, fmnist_dir, tmp_path):
    """``-c runs/X/config.yaml`` used to fail on the run's training keys; with the run's weights it evaluates the
    fine-tuned model with its patch."""
    code, out, err = run_cli("eval", "-c", RUNS_DIR / IDLE70 / "config.yaml", "--weights", weight_file(IDLE70),
                             "--data", f"fmnist:{fmnist_dir}", "--limit", "8", "--no-progress",
                             "--json", tmp_path / "e.json")
    assert code == 0, err
    row = _json(tmp_path / "e.json")
    assert row["model"] == "leanvit_vit_fm_teacher" and row["split"] == "test" and row["method"] == "idle"
    assert "is the record of a `leanvit finetune` run" in err


# ---------------------------------------------------------------------------------------------------------------
# 3. a head that would be untrained is refused by the verbs that measure accuracy
def test_eval_refuses_an_untrained_head(run_cli, fmnist_dir):
    """``--num-classes`` other than the pretrained head's size used to evaluate a random head."""
    data = ["--data", f"fmnist:{fmnist_dir}", "--limit", "8", "--no-progress"]
    code, _, err = run_cli("eval", "-m", STUDENT, "--num-classes", "5", *data)
    assert code == 2
    line = _one_error_line(err)
    assert "--num-classes 5" in line and "untrained" in line and "leanvit train" in line
    code, _, err = run_cli("compare", "-m", STUDENT, "--num-classes", "5", *data, "--methods", "dense",
                           "--bench-runs", "0")
    assert code == 2 and "untrained" in _one_error_line(err)
    code, out, err = run_cli("eval", "-m", STUDENT, "--num-classes", "10", *data)  # the head it has: fine
    assert code == 0, err


def test_class_mismatch_in_eval_does_not_suggest_a_new_head(run_cli, fmnist_dir):
    """The data's class check told eval's user to pass --num-classes, which gives a random head."""
    code, _, err = run_cli("eval", "-m", STUDENT, "--no-pretrained", "--num-classes", "5",
                           "--data", f"fmnist:{fmnist_dir}", "--limit", "8", "--no-progress")
    assert code == 2
    line = _one_error_line(err)
    assert "10 classes but the model's head has 5 outputs" in line
    assert "Give --num-classes" not in line and "trained on these classes" in line


# ---------------------------------------------------------------------------------------------------------------
# 4. an interrupted phase does not claim it is done
def _interrupted_loader(n: int):
    for i in range(n):
        if i == 2:
            raise KeyboardInterrupt
        yield i


def test_interrupted_progress_says_stopped_not_done():
    """A loader interrupted part-way (Ctrl-C while a batch loads) used to print 'done' before 'interrupted'."""
    buf = io.StringIO()  # not a tty: the line mode
    with pytest.raises(KeyboardInterrupt):
        for _ in track(_interrupted_loader(4), desc="eval", total=4, file=buf):
            pass
    lines = buf.getvalue().splitlines()
    assert lines[0] == "eval: started (4 steps)" and "done" not in buf.getvalue()
    assert lines[-1].startswith("eval: stopped at 2/4 after ")


def test_progress_stopped_in_the_loop_body_and_done_when_finished():
    buf = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        for i in track(range(10), desc="eval", file=buf):
            if i == 3:
                raise KeyboardInterrupt  # Ctrl-C during the model's forward
    assert buf.getvalue().splitlines()[-1].startswith("eval: stopped at 3/10 after ")
    buf = io.StringIO()
    with pytest.raises(RuntimeError):
        with track(total=5, desc="timing", file=buf) as bar:
            bar.update()
            raise RuntimeError("boom")
    assert buf.getvalue().splitlines()[-1].startswith("timing: stopped at 1/5")
    buf = io.StringIO()
    assert list(track(range(3), desc="eval", file=buf)) == [0, 1, 2]
    assert buf.getvalue().splitlines()[-1].startswith("eval: done in ")
