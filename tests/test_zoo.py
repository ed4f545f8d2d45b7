"""The shipped reference models: they load offline through timm and reach their accuracy targets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from torch.utils.data import DataLoader

import leanvit
from leanvit.data import build_dataset
from leanvit.data.fashion_mnist import DEFAULT_ROOT
from leanvit.engine import evaluate
from leanvit.models.shuffle_zoo import SHUFFLE_ARCHS
from leanvit.zoo import RUNS_DIR, has_weights

TARGETS = {"leanvit_vit_fm_teacher": 90.0, "leanvit_vit_fm_student": 88.0}
SHIPPED = [m for m in TARGETS if has_weights(m)]
FINETUNED = ["leanvit_vit_fm_teacher_idle70", "leanvit_vit_fm_teacher_idle50", "leanvit_vit_fm_teacher_evit50"]
# other shipped models: the CNN teacher (cross-architecture distillation), the distilled students, the trained
# channel-shuffle students
OTHERS = ["leanvit_resnet_fm_teacher", "leanvit_vit_fm_student_pefd", "leanvit_vit_fm_student_proj",
          *(n for n, a in SHUFFLE_ARCHS.items() if a.geometry == "fm")]


def test_reference_models_registered():
    assert set(TARGETS) <= set(leanvit.list_models())
    for name in TARGETS:
        cfg = timm.create_model(name, pretrained=False).pretrained_cfg
        assert cfg["input_size"] == (1, 28, 28) and len(cfg["mean"]) == 1 and len(cfg["std"]) == 1


def test_distilled_students_are_the_student_architecture():
    from leanvit.models.reference import DISTILLED_ARCHS

    for name, (arch, method) in DISTILLED_ARCHS.items():
        assert method in name and name in leanvit.list_models()
        model, base = timm.create_model(name), timm.create_model(arch)
        assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}


def test_cnn_teacher_keeps_small_images_large():
    """leanvit_resnet_fm_teacher: a timm ResNet whose stages see 28, 14, 7 and 4 pixels (not timm's 7 to 1)."""
    from timm.models.resnet import ResNet

    from leanvit.models.features import block_features, pooled_features

    torch.manual_seed(0)
    model = timm.create_model("leanvit_resnet_fm_teacher").eval()
    assert isinstance(model, ResNet) and model.pretrained_cfg["input_size"] == (1, 28, 28)
    x = torch.randn(2, 1, 28, 28)
    _, inter = model.forward_intermediates(x)
    assert [t.shape[-1] for t in inter[1:]] == [28, 14, 7, 4]
    assert [i["reduction"] for i in model.feature_info][1:] == [1, 2, 4, 8]
    pre, logits = pooled_features(model, x)
    assert pre.shape == (2, 256) and logits.shape == (2, 10)
    assert len(block_features(model, x)[0]) == len(inter)


def test_student_is_a_third_of_the_teacher():
    from leanvit.analysis import count_macs

    t = count_macs(timm.create_model("leanvit_vit_fm_teacher")).macs
    s = count_macs(timm.create_model("leanvit_vit_fm_student")).macs
    assert 0.25 < s / t < 0.4


@pytest.mark.parametrize("name", SHIPPED + [m for m in FINETUNED + OTHERS if has_weights(m)])
def test_shipped_run_is_documented(name):
    run = RUNS_DIR / name
    for f in ("config.yaml", "command.txt", "log.csv", "eval.json"):
        assert (run / f).is_file(), f"{run / f} missing"
    assert any(f"leanvit {verb}" in (run / "command.txt").read_text() for verb in ("train", "distill", "finetune"))


@pytest.mark.slow  # the whole test set, about a minute per model on 2 cores: the 1,000-image check below runs by default
@pytest.mark.skipif(not Path(DEFAULT_ROOT).is_dir(), reason="needs apt-get install -y dataset-fashion-mnist")
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_meets_target(name):
    torch.set_num_threads(2)
    model = timm.create_model(name, pretrained=True).eval()
    res = evaluate(model, DataLoader(build_dataset("fmnist", "test", model), batch_size=500), progress=False)
    recorded = json.loads((RUNS_DIR / name / "eval.json").read_text())
    assert res.n == 10_000
    assert abs(res.top1 - recorded["top1"]) < 0.02  # the shipped file is the one that was measured
    assert res.top1 >= TARGETS[name]


def test_list_models_pretrained_lists_shipped_ones():
    shipped = leanvit.list_models(pretrained=True)
    assert set(SHIPPED) <= set(shipped) and all(has_weights(n) for n in shipped)
    assert set(shipped) < set(leanvit.list_models())


@pytest.mark.parametrize("name", ["leanvit_vit_fm_teacher_idle70", "leanvit_vit_fm_teacher_idle50",
                                  "leanvit_vit_fm_teacher_evit50"])
def test_fine_tuned_reduction_models_come_patched(name):
    from leanvit.models.reference import REDUCED_ARCHS

    arch, method, keep = REDUCED_ARCHS[name]
    assert method in name and name in leanvit.list_models()
    model = timm.create_model(name, pretrained=has_weights(name))
    red = leanvit.get_reducer(model)
    assert red is not None and red.name == method and red.report["keep"] == keep
    base = timm.create_model(arch)
    assert model.state_dict().keys() == base.state_dict().keys()  # the teacher's weights, fine-tuned
    if has_weights(name):
        import yaml

        cfg = yaml.safe_load((RUNS_DIR / name / "config.yaml").read_text())
        assert cfg["patch"]["method"] == method and cfg["patch"]["keep"] == keep  # shipped as it was fine-tuned


@pytest.mark.skipif(not Path(DEFAULT_ROOT).is_dir(), reason="needs apt-get install -y dataset-fashion-mnist")
@pytest.mark.parametrize("name", [m for m in SHIPPED + FINETUNED + OTHERS if has_weights(m)])
def test_shipped_model_gives_its_recorded_accuracy(name):
    """Every shipped file (the reference teacher and student, fine-tuned, distilled, CNN or channel-shuffle),
    created as registered, gives the accuracy recorded in its eval_1000.json on the first 1,000 test images (the
    whole test set, recorded in eval.json, is the slow test above)."""
    torch.set_num_threads(2)
    model = timm.create_model(name, pretrained=True).eval()
    ds = build_dataset("fmnist", "test", model, limit=1000)
    res = evaluate(model, DataLoader(ds, batch_size=250), progress=False)
    recorded = json.loads((RUNS_DIR / name / "eval_1000.json").read_text())
    assert res.n == 1000 and abs(res.top1 - recorded["top1"]) < 0.02
    assert json.loads((RUNS_DIR / name / "eval.json").read_text())["n"] == 10_000
