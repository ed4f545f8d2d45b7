"""Image folders whose layout used to give wrong splits: no val/ folder (validation ran on the training images) and
train/ and val/ with different class folders (contradictory class-count errors)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm

import leanvit  # noqa: F401  (registers leanvit_* models)
from leanvit.data import build_dataset
from leanvit.errors import DataError


def _make_classes(root, classes=("a", "b", "c"), per_class=10):
    """``root/<class>/<i>.png``: tiny 8x8 RGB images (only their paths are compared; none is decoded)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    counts = per_class if isinstance(per_class, dict) else dict.fromkeys(classes, per_class)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(counts[c]):
            Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _model(num_classes=3):
    return timm.create_model("test_vit", pretrained=False, num_classes=num_classes)


def _paths(ds):
    return [p for p, _ in ds.samples]


# ---------------------------------------------------------------- no val/ folder: a seeded held-out part
def test_flat_folder_holds_out_a_seeded_validation_split(tmp_path, capsys):
    root = _make_classes(tmp_path / "flat")
    spec, model = f"imagefolder:{root}", _model()
    train = build_dataset(spec, "train", model, train=True)
    val = build_dataset(spec, "val", model)
    err = capsys.readouterr().err
    train_p, val_p = _paths(train), _paths(val)
    assert len(train_p) == 27 and len(val_p) == 3
    assert not set(train_p) & set(val_p), "validation images are training images"
    assert sorted(train_p + val_p) == sorted(str(p) for p in root.glob("*/*.png"))
    # stratified: one held-out image per class, and every class still trains
    assert sorted(t for _, t in val.samples) == [0, 1, 2] and set(train.targets) == {0, 1, 2}
    assert train.classes == val.classes == ["a", "b", "c"]
    # said once, on stderr
    assert err.count("note:") == 1 and f"{root} has no val/ folder" in err and "10%" in err and "seeded" in err
    # deterministic: the same split on every call, and no second note
    assert _paths(build_dataset(spec, "val", model)) == val_p
    assert _paths(build_dataset(spec, "train", model)) == train_p
    assert "note:" not in capsys.readouterr().err
    # trainval is everything; test of a plain class folder is the whole folder, as before
    assert sorted(_paths(build_dataset(spec, "trainval", model))) == sorted(train_p + val_p)
    assert len(build_dataset(spec, "test", model)) == 30


def test_held_out_split_does_not_depend_on_where_the_folder_is(tmp_path):
    a = _make_classes(tmp_path / "one" / "imgs")
    b = _make_classes(tmp_path / "two" / "elsewhere")
    va = [Path(p).relative_to(a) for p in _paths(build_dataset(f"imagefolder:{a}", "val", _model()))]
    vb = [Path(p).relative_to(b) for p in _paths(build_dataset(f"imagefolder:{b}", "val", _model()))]
    assert va == vb


def test_held_out_split_survives_skip_bad_images(tmp_path, capsys):
    root = _make_classes(tmp_path / "flat")
    (root / "b" / "zz_broken.png").write_bytes(b"not an image")
    spec, model = f"imagefolder:{root}", _model()
    train = build_dataset(spec, "train", model, train=True, skip_bad=True, progress=False)
    val = build_dataset(spec, "val", model)  # without --skip-bad-images: the same choice of held-out files
    assert not set(_paths(train)) & set(_paths(val))
    assert not any("zz_broken" in p for p in _paths(train))


def test_class_too_small_to_hold_out_names_the_layout(tmp_path):
    root = _make_classes(tmp_path / "flat", per_class={"a": 10, "b": 1, "c": 10})
    for split in ("train", "val"):
        with pytest.raises(DataError, match=r"has only 1 image.*/train/<class>/<image> and .*/val/<class>/<image>"):
            build_dataset(f"imagefolder:{root}", split, _model())
    assert len(build_dataset(f"imagefolder:{root}", "trainval", _model())) == 21


def test_train_folder_without_val_folder(tmp_path, capsys):
    _make_classes(tmp_path / "ds" / "train")
    spec, model = f"imagefolder:{tmp_path / 'ds'}", _model()
    train, val = build_dataset(spec, "train", model), build_dataset(spec, "val", model)
    assert len(train) == 27 and len(val) == 3 and not set(_paths(train)) & set(_paths(val))
    assert "no val/ folder" in capsys.readouterr().err
    # no test/ or val/ folder: the test split would be training images
    with pytest.raises(DataError, match=r"no test/ or val/ folder.*/train/<class>/<image> and .*/val/<class>/<image>"):
        build_dataset(spec, "test", model)


def test_split_folders_are_used_as_they_are(tmp_path, capsys):
    _make_classes(tmp_path / "ds" / "train", per_class=4)
    _make_classes(tmp_path / "ds" / "val", per_class=2)
    spec, model = f"imagefolder:{tmp_path / 'ds'}", _model()
    assert len(build_dataset(spec, "train", model)) == 12
    assert len(build_dataset(spec, "val", model)) == 6
    assert len(build_dataset(spec, "test", model)) == 6  # no test/: val/
    trainval = build_dataset(spec, "trainval", model)
    assert len(trainval) == 18 and sorted(set(trainval.targets)) == [0, 1, 2]
    _make_classes(tmp_path / "ds" / "test", per_class=1)
    assert len(build_dataset(spec, "test", model)) == 3
    assert "note:" not in capsys.readouterr().err


def test_val_folder_only_still_evaluates(tmp_path):
    _make_classes(tmp_path / "ds" / "val", per_class=2)
    spec, model = f"imagefolder:{tmp_path / 'ds'}", _model()
    assert len(build_dataset(spec, "test", model)) == len(build_dataset(spec, "val", model)) == 6
    with pytest.raises(DataError, match="no train/ folder"):
        build_dataset(spec, "train", model)


# ---------------------------------------------------------------- train/ and val/ with different classes
@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("split", ["train", "val", "trainval", "test"])
def test_train_and_val_with_different_classes(tmp_path, num_classes, split):
    _make_classes(tmp_path / "ds" / "train", classes=("bird", "cat"), per_class=2)
    _make_classes(tmp_path / "ds" / "val", classes=("bird", "dog", "eel"), per_class=1)
    msg = r"train/ and val/ have different classes: only in train/: cat; only in val/: dog, eel$"
    with pytest.raises(DataError, match=msg):
        build_dataset(f"imagefolder:{tmp_path / 'ds'}", split, _model(num_classes))
