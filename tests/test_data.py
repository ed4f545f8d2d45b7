"""Datasets: idx parsing, Fashion-MNIST splits and errors, synthetic images, image folders."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import timm
import torch

import leanvit  # noqa: F401  (registers leanvit_* models)
from leanvit.data import SyntheticImages, build_dataset, parse_data_spec, read_idx
from leanvit.data import fashion_mnist
from leanvit.data.fashion_mnist import FashionMNIST, load_arrays
from leanvit.errors import DataError

from conftest import REAL_FMNIST, make_fmnist, write_idx


# ---------------------------------------------------------------- idx files
@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_read_idx_round_trip(tmp_path, name):
    arr = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    path = write_idx(tmp_path / name, arr)
    if name.endswith(".gz"):
        assert path.read_bytes()[:2] == b"\x1f\x8b"  # really gzipped
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (5, 28, 28)
    np.testing.assert_array_equal(out, arr)


def test_read_idx_1d_labels(tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "labels.gz", labels)), labels)


def test_read_idx_truncated(tmp_path):
    arr = np.zeros((4, 28, 28), dtype=np.uint8)
    path = write_idx(tmp_path / "x-idx3-ubyte", arr)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_read_idx_truncated_gzip_stream(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, size=(8, 28, 28), dtype=np.uint8)
    path = write_idx(tmp_path / "x-idx3-ubyte.gz", arr)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # torn gzip stream
    with pytest.raises(DataError):
        read_idx(path)


def test_read_idx_bad_magic(tmp_path):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x0d\x03" + (1).to_bytes(4, "big") * 3 + b"\x00")  # 0x0d = float, not ubyte
    with pytest.raises(DataError, match="magic"):
        read_idx(path)
    png = tmp_path / "notidx.gz"
    png.write_bytes(gzip.compress(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32))
    with pytest.raises(DataError, match="magic"):
        read_idx(png)


# ---------------------------------------------------------------- Fashion-MNIST
def _assert_install_hint(msg: str) -> None:
    assert "apt-get install -y dataset-fashion-mnist" in msg
    assert "--data fmnist:PATH" in msg


def test_missing_folder_message(tmp_path):
    with pytest.raises(DataError) as ei:
        FashionMNIST(tmp_path / "nowhere", split="test")
    _assert_install_hint(str(ei.value))
    assert str(tmp_path / "nowhere") in str(ei.value)


def test_missing_files_message(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as ei:
        FashionMNIST(tmp_path / "empty", split="train")
    _assert_install_hint(str(ei.value))
    assert "train-images-idx3-ubyte" in str(ei.value)


def test_env_var_root(fmnist_dir, monkeypatch):
    monkeypatch.setenv("LEANVIT_FMNIST", str(fmnist_dir))
    assert len(FashionMNIST(None, split="test")) == 32


def test_mismatched_files(tmp_path):
    root = make_fmnist(tmp_path / "fm", 20, 10)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros(9, dtype=np.uint8))  # 10 images, 9 labels
    with pytest.raises(DataError, match="disagree"):
        FashionMNIST(root, split="test")


def test_splits_generated(fmnist_dir, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "VAL_SIZE", 16)
    sizes = {s: len(FashionMNIST(fmnist_dir, split=s)) for s in fashion_mnist.SPLITS}
    assert sizes == {"train": 48, "val": 16, "trainval": 64, "test": 32}
    # train and val partition trainval, in order
    tv_x, tv_y = load_arrays(fmnist_dir, "trainval")
    tr_x, _ = load_arrays(fmnist_dir, "train")
    va_x, va_y = load_arrays(fmnist_dir, "val")
    np.testing.assert_array_equal(np.concatenate([tr_x, va_x]), tv_x)
    np.testing.assert_array_equal(va_y, tv_y[-16:])


def test_splits_real_data_if_installed(fmnist_dir):
    """The documented sizes on the real data when it is installed; the generated files otherwise."""
    if (REAL_FMNIST / "train-images-idx3-ubyte.gz").is_file() or (REAL_FMNIST / "train-images-idx3-ubyte").is_file():
        expected = {"train": 55000, "val": 5000, "trainval": 60000, "test": 10000}
        sizes = {s: len(load_arrays(REAL_FMNIST, s)[1]) for s in expected}
        assert sizes == expected
        x, y = load_arrays(REAL_FMNIST, "test")
        assert x.shape == (10000, 28, 28) and set(np.unique(y).tolist()) == set(range(10))
    else:
        assert len(load_arrays(fmnist_dir, "trainval")[1]) == 64
        assert len(load_arrays(fmnist_dir, "test")[1]) == 32


def test_sample_shape_norm_and_aug(fmnist_dir):
    ds = FashionMNIST(fmnist_dir, split="test", mean=(0.5,), std=(0.25,))
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int) and 0 <= y < 10
    raw = torch.from_numpy(load_arrays(fmnist_dir, "test")[0][0].copy()).float() / 255
    torch.testing.assert_close(x[0], (raw - 0.5) / 0.25)
    aug = FashionMNIST(fmnist_dir, split="test", train_aug=True)
    torch.manual_seed(0)
    a = aug[3][0]
    torch.manual_seed(0)
    assert torch.equal(a, aug[3][0]) and a.shape == (1, 28, 28)  # augmentation follows torch's RNG
    assert len(FashionMNIST(fmnist_dir, split="test", limit=5)) == 5


def test_unknown_split_and_spec(fmnist_dir):
    with pytest.raises(DataError, match="split"):
        FashionMNIST(fmnist_dir, split="validation")
    model = timm.create_model("leanvit_vit_fm_student")
    with pytest.raises(DataError, match="split"):
        build_dataset(f"fmnist:{fmnist_dir}", "dev", model)
    for bad in ("mnist", "cifar10:/tmp", ""):
        with pytest.raises(DataError, match="unknown data source"):
            parse_data_spec(bad)
    with pytest.raises(DataError, match="imagefolder needs a path"):
        parse_data_spec("imagefolder")
    with pytest.raises(DataError, match="synthetic"):
        parse_data_spec("synthetic:many")
    assert str(parse_data_spec("FMNIST:/x/y")) == "fmnist:/x/y"
    assert parse_data_spec("synthetic:8").path == "8"


def test_build_dataset_fmnist(fmnist_dir):
    model = timm.create_model("leanvit_vit_fm_student")
    ds = build_dataset(f"fmnist:{fmnist_dir}", "test", model, limit=10)
    assert len(ds) == 10 and ds[0][0].shape == (1, 28, 28)
    # the model's own normalisation is used
    assert ds.mean.flatten().tolist() == pytest.approx(list(model.pretrained_cfg["mean"]))


def test_fmnist_with_rgb_model_fails(fmnist_dir):
    model = timm.create_model("test_vit", pretrained=False)
    with pytest.raises(DataError, match="1x28x28"):
        build_dataset(f"fmnist:{fmnist_dir}", "test", model)


# ---------------------------------------------------------------- synthetic
def test_synthetic_deterministic():
    a, b = SyntheticImages((3, 8, 8), 7, size=5), SyntheticImages((3, 8, 8), 7, size=5)
    torch.manual_seed(123)  # the global RNG must not matter
    xa, ya = a[2]
    torch.manual_seed(456)
    xb, yb = b[2]
    assert torch.equal(xa, xb) and ya == yb and 0 <= ya < 7
    assert not torch.equal(a[0][0], a[1][0])
    assert not torch.equal(a[0][0], SyntheticImages((3, 8, 8), 7, size=5, seed=1)[0][0])
    assert len(a) == 5


def test_build_synthetic_matches_model():
    model = timm.create_model("test_vit", pretrained=False)
    ds = build_dataset("synthetic:6", "test", model)
    assert len(ds) == 6 and ds[0][0].shape == tuple(model.pretrained_cfg["input_size"])
    assert len(build_dataset("synthetic", "test", model, limit=3)) == 3


# ---------------------------------------------------------------- image folders
def _make_imagefolder(root, classes=("cat", "dog"), per_class=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            h, w = 40 + 7 * i, 50 + 3 * i
            Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize("train", [False, True])
def test_imagefolder_uses_model_transform(tmp_path, train):
    root = _make_imagefolder(tmp_path / "imgs")
    model = timm.create_model("test_vit", pretrained=False, num_classes=2)
    ds = build_dataset(f"imagefolder:{root}", "trainval" if train else "test", model, train=train)
    assert len(ds) == 6
    x, y = ds[4]
    assert tuple(x.shape) == tuple(model.pretrained_cfg["input_size"]) == (3, 160, 160)
    assert y == 1 and ds.classes == ["cat", "dog"]
    if not train:
        # test_vit's mean/std are 0.5/0.5: values lie in [-1, 1]
        assert x.min() >= -1.0 - 1e-5 and x.max() <= 1.0 + 1e-5
    with torch.no_grad():
        assert model.eval()(x[None]).shape == (1, 2)
    # a head that does not match the data's classes is refused before any image is read
    with pytest.raises(DataError, match="2 classes but the model's head has 1000 outputs"):
        build_dataset(f"imagefolder:{root}", "test", timm.create_model("test_vit", pretrained=False))


def test_imagefolder_train_val_subfolders_and_limit(tmp_path):
    _make_imagefolder(tmp_path / "ds" / "train", per_class=3)
    _make_imagefolder(tmp_path / "ds" / "val", per_class=1)
    model = timm.create_model("test_vit", pretrained=False, num_classes=2)
    assert len(build_dataset(f"imagefolder:{tmp_path / 'ds'}", "train", model, train=True)) == 6
    assert len(build_dataset(f"imagefolder:{tmp_path / 'ds'}", "test", model)) == 2
    assert len(build_dataset(f"imagefolder:{tmp_path / 'ds'}", "train", model, limit=4)) == 4


def test_imagefolder_errors(tmp_path):
    model = timm.create_model("test_vit", pretrained=False)
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(f"imagefolder:{tmp_path / 'missing'}", "test", model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        build_dataset(f"imagefolder:{tmp_path / 'empty'}", "test", model)
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    (tmp_path / "noimg" / "cat" / "readme.txt").write_text("not an image")
    with pytest.raises(DataError):
        build_dataset(f"imagefolder:{tmp_path / 'noimg'}", "test", model)
