"""Recipes: a patch written to YAML and applied back gives identical logits; a recipe for a model of another depth,
grid or prefix tokens is refused; files that are not recipes are refused by name; --recipe on the CLI verbs."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import leanvit
from leanvit.errors import ConfigError
from leanvit.reduce.recipe import FORMAT, Recipe, read_recipe, recipe_of, write_recipe

from conftest import image, make, run

PATCHES = [("gtp", dict(budget=0.7, alpha=1.5, graph="semantic", orphans="merge")), ("tome", dict(budget=0.6)),
           ("evit", dict(budget=0.6, fuse=None)), ("idle", dict(keep=0.6))]


@pytest.mark.parametrize("method,kw", PATCHES, ids=[m for m, _ in PATCHES])
def test_round_trip_gives_identical_logits(tmp_path, method, kw):
    model = make("deit", depth=4)
    tuned = leanvit.patch(copy.deepcopy(model), method, **kw)
    path = write_recipe(recipe_of(tuned, name="deit-tiny-test", heldout={"top1": 80.0}), tmp_path / "r.yaml")
    applied = leanvit.patch(copy.deepcopy(model), recipe=path)
    x = image()
    assert torch.equal(run(tuned, x), run(applied, x))
    red = leanvit.get_reducer(applied)
    assert red.schedule == leanvit.get_reducer(tuned).schedule and red.report["recipe"] == str(path)
    rec = read_recipe(path)
    assert rec.record["heldout"] == {"top1": 80.0} and rec.model["name"] == "deit-tiny-test"
    # the same from the Recipe object and from its mapping
    for given in (rec, rec.as_dict()):
        again = leanvit.patch(copy.deepcopy(model), recipe=given)
        assert torch.equal(run(tuned, x), run(again, x))


def test_a_recipe_replaces_the_patch_a_model_comes_with(tmp_path):
    model = make("deit", depth=4)
    path = write_recipe(recipe_of(leanvit.patch(copy.deepcopy(model), "tome", r=3)), tmp_path / "r.yaml")
    shipped = leanvit.patch(copy.deepcopy(model), "idle", keep=0.5)
    leanvit.patch(shipped, recipe=path)
    assert leanvit.get_reducer(shipped).name == "tome" and leanvit.get_reducer(shipped).schedule == [3, 3, 3, 3]


@pytest.mark.parametrize("other,why", [
    (dict(depth=3), "depth 3"),
    (dict(img_size=32), "grid 2x2"),
    (dict(variant="deit_distilled"), "2 prefix tokens"),
], ids=["depth", "grid", "prefix"])
def test_a_recipe_for_another_model_is_refused(tmp_path, other, why):
    path = write_recipe(recipe_of(leanvit.patch(make("deit", depth=4), "tome", r=2), name="deit-a"),
                        tmp_path / "r.yaml")
    target = make(**{"variant": "deit", "depth": 4, **other})
    with pytest.raises(ConfigError, match=f"made for deit-a \\(depth 4, grid 4x4, 1 prefix token\\).*{why}"):
        leanvit.patch(target, recipe=path)
    assert leanvit.get_reducer(target) is None


def test_files_that_are_not_recipes_are_refused(tmp_path):
    model = make("deit", depth=2)
    good = recipe_of(leanvit.patch(copy.deepcopy(model), "tome", r=2)).as_dict()
    cases = {
        "missing.yaml": (None, "does not exist"),
        "bad.yaml": ("method: [tome", "not valid YAML"),
        "list.yaml": ("- 1\n- 2\n", "mapping"),
        "noformat.yaml": ({k: v for k, v in good.items() if k != "format"}, "has no 'format"),
        "future.yaml": ({**good, "format": "leanvit-recipe/9"}, "this leanvit reads"),
        "method.yaml": ({**good, "method": "magic"}, "method 'magic'"),
        "schedule.yaml": ({**good, "schedule": [1, "x"]}, "schedule must be a list"),
        "option.yaml": ({**good, "options": {"alpha": 1.0}}, "unknown option 'alpha'"),
        "counts.yaml": ({**good, "schedule_counts": "idle"}, "counts 'removed'"),
        "geometry.yaml": ({**good, "model": {"name": "x"}}, "geometry"),
    }
    for name, (content, why) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(ConfigError, match=why):
            leanvit.patch(copy.deepcopy(model), recipe=path)
    with pytest.raises(ConfigError, match="give recipe= alone, not method, r"):
        leanvit.patch(copy.deepcopy(model), "tome", r=2, recipe=good)
    with pytest.raises(ConfigError, match="not patched"):
        recipe_of(model)
    with pytest.raises(ConfigError, match="needs a method"):
        leanvit.patch(model)


def test_recipe_yaml_is_plain_and_versioned(tmp_path):
    red_model = leanvit.patch(make("deit", depth=2), "gtp", r=2)
    rec = recipe_of(red_model, versions={"torch": torch.__version__}, shape=(1, 2))
    text = write_recipe(rec, tmp_path / "r.yaml").read_text()
    assert text.startswith("# leanvit recipe") and f"format: {FORMAT}" in text and "!!" not in text
    back = read_recipe(tmp_path / "r.yaml")
    assert back.record["versions"]["torch"] == str(torch.__version__) and back.record["shape"] == [1, 2]
    assert isinstance(back, Recipe) and back.options == rec.options and "theta" in back.options


# ------------------------------------------------------------------------------------------------ --recipe on the CLI
def test_cli_eval_bench_compare_apply_a_recipe(tmp_path, run_cli, fmnist_dir):
    model = leanvit.create_model("leanvit_vit_fm_student", pretrained=True)
    path = write_recipe(recipe_of(leanvit.patch(copy.deepcopy(model), "tome", budget=0.6),
                                  name="leanvit_vit_fm_student"), tmp_path / "r.yaml")
    data = f"fmnist:{fmnist_dir}"
    code, out, err = run_cli("eval", "--recipe", path, "--data", data, "--no-progress", "--json", tmp_path / "e.json")
    assert code == 0, err
    row = json.loads((tmp_path / "e.json").read_text())
    assert row["model"] == "leanvit_vit_fm_student" and row["patch_source"] == "recipe"
    assert row["schedule"] == read_recipe(path).schedule
    code, out, err = run_cli("bench", "--recipe", path, "--runs", "1", "--warmup", "0", "--no-progress")
    assert code == 0 and f"schedule     {row['schedule']}" in out, err
    code, out, err = run_cli("compare", "--recipe", path, "--data", data, "--methods", "dense", "--budgets", "0.9",
                             "--bench-runs", "0", "--no-progress")
    assert code == 0 and "tome-shipped" in out, err
    # the recipe is the whole patch; a model of another depth is refused before any data is read
    code, _, err = run_cli("eval", "--recipe", path, "--method", "gtp", "--budget", "0.7", "--data", data)
    assert code == 2 and "--recipe sets the patch" in err
    code, _, err = run_cli("eval", "--recipe", path, "-m", "leanvit_vit_fm_teacher", "--data", data)
    assert code == 2 and "was made for leanvit_vit_fm_student (depth 4" in err
    code, _, err = run_cli("eval", "--recipe", tmp_path / "none.yaml", "--data", data)
    assert code == 2 and "does not exist" in err
