"""The newer verbs (distill, finetune, analyze, vis) held to the older verbs' standard: a resume that would change
what a run optimises is refused in one line naming the setting, a teacher that cannot read the data is refused
before any work, ``--limit`` bounds every split a verb reads, a patched model's teacher is its dense self, both
exported weight files carry the run's metadata, pretrained weights are never fetched unasked, library warnings
that leanvit triggers on purpose stay out of the output, and token maps number blocks as the rest of leanvit."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open

import leanvit
from leanvit.cli.main import main
from leanvit.io import save_weights

STUDENT = "leanvit_vit_fm_student"
QUICK = ("--data", "synthetic:16", "--val-split", "none", "--epochs", "1", "--batch-size", "16", "--no-progress",
         "--threads", "1")


def _one_line_error(code: int, err: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("leanvit: error: "), err


def _records(out: Path) -> dict[str, bytes]:
    """The files a resume must leave as they are when it is refused or has nothing to do."""
    return {name: (out / name).read_bytes() for name in ("last.pt", "config.yaml", "command.txt")}


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


# ---------------------------------------------------------------- 1. a resume keeps the run's loss
def _distill(out, method: str, **flags: str) -> list[str]:
    argv = ["distill", "--student", STUDENT, "--teacher", STUDENT, "--method", method, *QUICK, "-o", str(out)]
    for flag, value in flags.items():
        argv += [flag] if value == "" else [flag, value]
    return argv


def _train(out, **flags: str) -> list[str]:
    argv = ["train", "-m", STUDENT, "--teacher", STUDENT, "--kd-weight", "0.5", *QUICK, "-o", str(out)]
    for flag, value in flags.items():
        argv += [flag] if value == "" else [flag, value]
    return argv


def _finetune(out, **flags: str) -> list[str]:
    argv = ["finetune", STUDENT, "--method", "evit", "--keep", "0.7", *QUICK, "-o", str(out)]
    for flag, value in flags.items():
        argv += [flag] if value == "" else [flag, value]
    return argv


BASE = {"kd": (_distill, ("kd",), {}), "pefd": (_distill, ("pefd",), {"--projectors": "2"}),
        "train": (_train, (), {}), "finetune": (_finetune, (), {})}


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory) -> dict[str, Path]:
    """One finished one-step run per verb (distill kd and pefd, train with KD, finetune), started once."""
    runs = {}
    for name, (argv, pos, flags) in BASE.items():
        out = tmp_path_factory.mktemp("runs") / name
        assert main(argv(out, *pos, **flags)) == 0
        runs[name] = out
    return runs


@pytest.mark.parametrize("run, flags, recorded, given", [
    ("kd", {"--kd-temperature": "2"}, "kd_temperature=4.0", "kd_temperature=2.0"),
    ("kd", {"--ce-weight": "0.5"}, "ce_weight=0.1", "ce_weight=0.5"),
    ("kd", {"--distill-weight": "0.3"}, "distill_weight=0.9", "distill_weight=0.3"),
    ("pefd", {"--projectors": "2", "--no-projector-relu": ""}, "projector_relu=True", "projector_relu=False"),
    ("pefd", {"--projectors": "3"}, "projectors=2", "projectors=3"),
    ("train", {"--kd-temperature": "2"}, "kd_temperature=4.0", "kd_temperature=2.0"),
    ("train", {"--label-smoothing": "0.2"}, "label_smoothing=0.1", "label_smoothing=0.2"),
    ("train", {"--mixup": "0.2"}, "mixup=0.0", "mixup=0.2"),
    ("train", {"--lr": "0.01"}, "lr=0.001", "lr=0.01"),
    ("finetune", {"--sd-logits-weight": "5"}, "sd_logits_weight=10.0", "sd_logits_weight=5.0"),
    ("finetune", {"--frozen": "cls_token"}, "frozen=['cls_token', 'pos_embed']", "frozen=['cls_token']"),
])
def test_resume_with_another_loss_setting_is_refused(finished_runs, run_cli, run, flags, recorded, given):
    """Continuing with another loss would train a run that no command describes, and config.yaml would claim that
    the whole run used the new value: the resume is refused in one line naming the setting and both values."""
    out = finished_runs[run]
    argv, pos, base = BASE[run]
    before = _records(out)
    code, _, err = run_cli(*argv(out, *pos, **{**base, **flags}), "--resume")
    _one_line_error(code, err)
    assert "cannot resume" in err and recorded in err and given in err, err
    assert "size mismatch" not in err and "state_dict" not in err, err  # never the raw torch message
    assert _records(out) == before


def test_resume_of_a_finished_run_rewrites_no_record(finished_runs, run_cli):
    """A resume with nothing left to do ran nothing: config.yaml, command.txt and the weights' metadata must go on
    describing the command that trained the run, not flags that never ran."""
    out = finished_runs["kd"]
    before, meta = _records(out), _metadata(out / "model.safetensors")
    code, stdout, err = run_cli(*_distill(out, "kd", **{"--checkpoint-steps": "7", "--workers": "0"}), "--resume")
    assert code == 0, err
    assert "nothing to do" in stdout
    assert _records(out) == before
    assert _metadata(out / "model.safetensors") == meta


# ---------------------------------------------------------------- 2. one model/data compatibility check
@pytest.fixture(scope="module")
def rgb_teachers(tmp_path_factory) -> dict[str, Path]:
    """Weights of timm models that expect 3-channel input (a CNN) or 32x32 input (a ViT), not 1x28x28."""
    root = tmp_path_factory.mktemp("teachers")
    files = {}
    for name in ("resnet10t", "test_vit"):
        torch.manual_seed(0)
        files[name] = root / f"{name}.safetensors"
        save_weights(timm.create_model(name), files[name])
    return files


@pytest.mark.parametrize("teacher", ["resnet10t", "test_vit"])
def test_analyze_refuses_a_teacher_that_cannot_read_the_data(tmp_path, run_cli, rgb_teachers, teacher):
    """analyze feeds the teacher the model's images: a teacher that cannot read them is refused in one line, as
    distill refuses the same pair, before any data is read (the data path here does not even exist)."""
    code, _, err = run_cli("analyze", "-m", STUDENT, "--teacher", teacher, "--teacher-weights",
                           rgb_teachers[teacher], "--data", f"fmnist:{tmp_path / 'missing'}", "--no-progress")
    _one_line_error(code, err)
    assert "the teacher cannot read the model's 1x28x28 input" in err


def test_train_refuses_a_kd_teacher_that_cannot_read_the_data(tmp_path, run_cli, rgb_teachers):
    """train's logit KD runs the teacher on the student's images: the same one-line refusal, not a torch error
    in the first step."""
    code, _, err = run_cli(*_train(tmp_path / "run", **{"--teacher": "resnet10t",
                                                         "--teacher-weights": str(rgb_teachers["resnet10t"])}))
    _one_line_error(code, err)
    assert "the teacher cannot read the student's 1x28x28 input" in err


# ---------------------------------------------------------------- 3. --limit bounds every split
def test_analyze_limit_bounds_the_train_split_too(tmp_path, run_cli, fmnist_dir):
    """``--limit 12`` is a quick look: the train-test gap must not read the whole training split."""
    out = tmp_path / "a.json"
    code, _, err = run_cli("analyze", "-m", STUDENT, "--data", f"fmnist:{fmnist_dir}", "--limit", "12",
                           "--train-split", "trainval", "--no-progress", "--threads", "1", "--json", out)
    assert code == 0, err
    row = json.loads(out.read_text())
    assert row["n"] == 12 and row["train_n"] == 12
    from leanvit.cli.main import build_parser
    from leanvit.cli.parsing import _subparser

    limit = next(a for a in _subparser(build_parser(), "analyze")._actions if a.dest == "limit")
    assert "every split" in limit.help


@pytest.mark.parametrize("argv", [["--limit", "2"], ["--limit", "1"], ["--limit-train", "5"]])
def test_analyze_refuses_too_few_images(tmp_path, run_cli, argv):
    """CKA of two images is 1.0 for any two models and an ECE of a handful of images is noise: refused up front,
    with the minimum and the reason."""
    code, _, err = run_cli("analyze", "--teacher", "leanvit_vit_fm_teacher", "--data",
                           f"fmnist:{tmp_path / 'missing'}", *argv)
    _one_line_error(code, err)
    assert "at least 10" in err and "CKA" in err


# ---------------------------------------------------------------- 4. the teacher of a patched model is dense
def test_finetune_of_a_patched_model_distils_from_its_dense_self(tmp_path, run_cli, monkeypatch):
    """A model created patched (the idle70 zoo model) keeps its patch in a deep copy: the teacher must be the
    unpatched model, or the student would learn from an idling teacher."""
    from leanvit.cli import finetune

    teachers = []
    original = finetune._patch_and_terms

    def spy(*args, **kwargs):
        terms, teacher, ce = original(*args, **kwargs)
        teachers.append(teacher)
        return terms, teacher, ce

    monkeypatch.setattr(finetune, "_patch_and_terms", spy)
    code, stdout, err = run_cli("finetune", "leanvit_vit_fm_teacher_idle70", "--method", "evit", "--keep", "0.5",
                                *QUICK, "-o", tmp_path / "run")
    assert code == 0, err
    assert leanvit.get_reducer(teachers[0]) is None
    assert "created patched (idle" in stdout and "unpatched" in stdout


# ---------------------------------------------------------------- 5. the same metadata on both weight files
def test_best_weights_carry_the_patch_metadata(tmp_path, run_cli):
    """best.safetensors is the file one would ship: it must say which patch it was fine-tuned with."""
    out = tmp_path / "run"
    code, _, err = run_cli(*_finetune(out, **{"--val-split": "val", "--limit-val": "16"}))
    assert code == 0, err
    best, last = _metadata(out / "best.safetensors"), _metadata(out / "model.safetensors")
    assert json.loads(best["patch"])["method"] == "evit"
    assert best == last


# ---------------------------------------------------------------- 6. model names and weights checked offline
@pytest.mark.parametrize("argv, flag", [
    (["distill", "--teacher", "resnet18"], "--teacher-weights"),
    (["train", "--teacher", "resnet18", "--kd-weight", "0.5"], "--teacher-weights"),
    (["analyze", "--teacher", "resnet18"], "--teacher-weights"),
    (["finetune", "deit_tiny_patch16_224", "--method", "evit", "--keep", "0.7"], "--weights"),
])
def test_hub_weights_are_not_fetched_unasked(tmp_path, run_cli, argv, flag):
    """Weights that only the hub has are refused at once, naming the flags that give them (a file, or --download
    to fetch), instead of minutes of retries on a machine without network or an unasked download."""
    t0 = time.perf_counter()
    out = [] if argv[0] == "analyze" else ["-o", tmp_path / "run"]
    code, stdout, err = run_cli(*argv, "--data", f"fmnist:{tmp_path / 'missing'}", *out)
    _one_line_error(code, err)
    assert "Hugging Face hub" in err and flag in err and "--download" in err
    assert "Retrying" not in stdout + err and time.perf_counter() - t0 < 20
    assert not (tmp_path / "run").exists()


def test_download_is_only_refused_when_not_asked_for():
    from leanvit.errors import ConfigError
    from leanvit.models.factory import check_pretrained

    check_pretrained("resnet18", download=True)  # asked for: left to timm
    check_pretrained("leanvit_vit_fm_teacher", download=False)  # shipped: nothing to fetch
    with pytest.raises(ConfigError, match="Hugging Face hub"):
        check_pretrained("resnet18", download=False)


@pytest.mark.parametrize("verb", [["train", "--kd-weight", "0.5"], ["distill"]])
def test_unknown_teacher_is_refused_before_any_work(tmp_path, run_cli, verb):
    code, _, err = run_cli(*verb, "--teacher", "leanvit_vit_fm_teachr", "--data", f"fmnist:{tmp_path / 'missing'}",
                           "-o", tmp_path / "run")
    _one_line_error(code, err)
    assert "unknown model 'leanvit_vit_fm_teachr'" in err and "Did you mean: leanvit_vit_fm_teacher" in err
    assert not (tmp_path / "run").exists()


def test_model_without_shipped_weights_names_the_flags(tmp_path, run_cli):
    """The command line has no pretrained=False: the message names the flags that the user can give."""
    code, _, err = run_cli("eval", "-m", "leanvit_shuffle_fm_a32", "--data", "synthetic:4", "--no-progress")
    _one_line_error(code, err)
    assert "--no-pretrained" in err and "--weights" in err and "pretrained=False" not in err
    code, _, err = run_cli("distill", "--teacher", "leanvit_shuffle_fm_a32", "--data", "synthetic:4",
                           "-o", tmp_path / "run")
    _one_line_error(code, err)
    assert "--teacher-weights" in err and "pretrained=False" not in err and "--no-pretrained" not in err


# ---------------------------------------------------------------- 7. no library warning in the output
@pytest.mark.parametrize("make_argv", [_train, _finetune])
def test_one_step_cosine_schedule_is_quiet(tmp_path, run_cli, caplog, make_argv):
    """A run whose cosine spans one step after warm-up (a one- or two-step run: tests, smoke runs) makes timm log
    that the cosine 'will have no effect'; leanvit chose that schedule, so the line is noise for its users. The
    filter is local: timm's logger has none left afterwards."""
    caplog.set_level(logging.WARNING)
    code, stdout, err = run_cli(*make_argv(tmp_path / "run"))
    assert code == 0, err
    text = stdout + err + "\n".join(r.getMessage() for r in caplog.records)
    assert "Cosine annealing" not in text
    assert not logging.getLogger("timm.scheduler.cosine_lr").filters


# ---------------------------------------------------------------- 8. token maps: blocks from 1, a legend
def test_token_maps_number_blocks_from_one_and_have_a_legend(tmp_path, monkeypatch):
    """analyze and the README count blocks from 1; vis must too, and say what its colours mean."""
    from leanvit.reduce.types import IDLE, KEPT, REACTIVATED
    from leanvit.vis import tokens

    figures = []
    save = tokens.save_figure
    monkeypatch.setattr(tokens, "save_figure", lambda fig, path: (figures.append(fig), save(fig, path))[1])
    n = 16
    state = torch.full((1, n), KEPT, dtype=torch.uint8)
    state[0, :3], state[0, 3] = IDLE, REACTIVATED
    entry = {"block": torch.tensor(0), "tokens": torch.tensor(13), "source": torch.eye(n, dtype=torch.bool)[None],
             "state": state}
    tokens.plot_token_maps(torch.rand(1, 32, 32), {"idle": [entry, {**entry, "block": torch.tensor(1)}]}, (4, 4),
                           tmp_path / "maps.png")
    titles = [ax.get_title() for ax in figures[0].axes]
    assert "block 1: 13 tok" in titles and "block 2: 13 tok" in titles and not any("block 0" in t for t in titles)
    legends = [*figures[0].legends, *(ax.get_legend() for ax in figures[0].axes if ax.get_legend())]
    labels = {t.get_text() for legend in legends for t in legend.get_texts()}
    assert {"removed", "merged (a colour per token)", "idle", "re-activated", "lost"} <= labels, labels
