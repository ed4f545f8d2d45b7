"""The registry of distillation methods: one name each, the loss terms it builds and the options it reads.

| method    | loss (added to ``ce_weight`` x cross-entropy)                         | default weights            |
|-----------|------------------------------------------------------------------------|----------------------------|
| `none`    | none                                                                   | CE 1                       |
| `kd`      | ``T^2 KL`` of softened logits, T = 4                                   | CE 0.1, KD 0.9             |
| `kd-proj` | the same through a ``Linear(K, K)`` on the student's logits            | CE 0.1, KD 0.9             |
| `proj`    | ``1 - cos`` through one ``Linear`` on the pre-logits features          | CE 1, feature 25           |
| `pefd`    | ``1 - cos`` through the average of ``n`` Linear + ReLU projectors      | CE 1, feature 25, n = 3    |

Defaults are the authors' (chenyd7/PEFD, ``scripts/run_cifar.sh``): PEFD with ``-a 0 -b 25`` (no logit KD, feature
weight 25); KD and KD with a logit projector with ``-r 0.1 -a 0 -b 0.9`` (CE 0.1, KL 0.9, ``kd_T`` 4).

``proj``: the authors' repository has no single-projector branch; the paper's one-projector ablation keeps PEFD's
cosine loss, and so does ``proj``, so that ``proj`` against ``pefd`` measures the ensemble and ReLU alone (FitNet's
L2 on unnormalised features would change the loss too). ``pefd`` with ``projectors=1`` is one Linear + ReLU.

ReLU and ViT teachers: PEFD's ReLU suits the authors' CNN teachers, whose pooled features follow a ReLU and are
non-negative. A ViT's pre-logits features are LayerNorm outputs, about half of them negative, which an average of
ReLU outputs cannot point towards: the best cosine is ``||max(t, 0)|| / ||t||``, 0.71 for ``leanvit_vit_fm_teacher``
on Fashion-MNIST test images (a loss floor of 0.29). ``pefd`` keeps the authors' ReLU by default; ``relu=False``
(``leanvit distill --no-projector-relu``) removes it.

A new method is one decorated builder: ``@register_method("name", "help", options={...})``. Names are unique;
registering a name twice is an error, never a silent overwrite.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Callable, Mapping

from torch import nn

from ..engine.losses import LogitKDTerm, LossTerm, ProjectedFeatureTerm, ProjectedLogitKDTerm
from ..models.factory import check_reads_input
from ..models.projectors import ProjectorEnsemble
from ..errors import ConfigError
from ..options import Option, check_options as check_schema


@dataclass(frozen=True)
class Method:
    """A distillation method.

    Attributes:
        name: its name (``--method``).
        help: one line for ``leanvit distill --help``.
        build: ``build(student, teacher, **options) -> list[LossTerm]``; ``teacher`` is None when not needed.
        options: the options ``build`` takes, with their defaults.
        ce_weight: default weight of cross-entropy on the labels.
        needs_teacher: False for a method that learns from the labels alone.
    """

    name: str
    help: str
    build: Callable[..., list[LossTerm]]
    options: Mapping[str, Any] = field(default_factory=dict)
    ce_weight: float = 1.0
    needs_teacher: bool = True

    def describe(self) -> str:
        """``help (defaults: CE 1, weight 25, ...)``, for command-line help."""
        defaults = ", ".join([f"ce_weight {self.ce_weight:g}", *(f"{k} {v}" for k, v in self.options.items())])
        return f"{self.help} (defaults: {defaults})"


METHODS: dict[str, Method] = {}


def register_method(name: str, help: str, options: Mapping[str, Any] | None = None, ce_weight: float = 1.0,
                    needs_teacher: bool = True) -> Callable[[Callable[..., list[LossTerm]]], Callable]:
    """Decorator that registers a builder under ``name`` in :data:`METHODS`.

    Raises:
        ValueError: ``name`` is already registered, or an option is not one :func:`check_options` knows.
    """
    unknown = sorted(set(options or {}) - set(OPTIONS))
    if unknown:
        raise ValueError(f"method '{name}' declares unknown options {unknown}; known: {', '.join(OPTIONS)}")

    def register(build: Callable[..., list[LossTerm]]) -> Callable[..., list[LossTerm]]:
        if name in METHODS:
            raise ValueError(f"distillation method '{name}' is already registered")
        METHODS[name] = Method(name, help, build, MappingProxyType(dict(options or {})), ce_weight, needs_teacher)
        return build

    return register


@dataclass
class Distillation:
    """What :func:`build_terms` returns: the loss terms to pass to the trainer with their cross-entropy weight.

    Attributes:
        method: the method's name.
        terms: loss terms (``Trainer(loss_terms=...)``); they own the projectors.
        ce_weight: weight of cross-entropy on the labels (``Trainer(ce_weight=...)``).
        options: the method's resolved options (defaults filled in), for run logs.
    """

    method: str
    terms: list[LossTerm]
    ce_weight: float
    options: dict[str, Any]


# every option a method may declare, with its type and range (checked by the one validator, leanvit.options)
OPTIONS: dict[str, Option] = {
    "weight": Option((float,), low=0.0),  # weight of the method's distillation term
    "temperature": Option((float,), low=0.0, low_open=True),  # KD softmax temperature
    "projectors": Option((int,), low=1),  # number of projectors in the ensemble
    "relu": Option((bool,)),  # ReLU after each projector
}
_CE_WEIGHT = Option((float,), low=0.0)


def get_method(name: str) -> Method:
    """The registered method ``name``; a :class:`ConfigError` listing the valid names otherwise."""
    if name not in METHODS:
        raise ConfigError(f"unknown distillation method '{name}'; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def check_options(method: str, has_teacher: bool, ce_weight: float | None = None,
                  **options: Any) -> tuple[float, dict[str, Any]]:
    """Validate a method's options without building anything (the CLI calls it before loading any model).

    Args:
        method: a name in :data:`METHODS`.
        has_teacher: whether a teacher is given.
        ce_weight: weight of cross-entropy; None for the method's default.
        options: the method's options; None values mean the method's default.

    Returns:
        ``(ce_weight, options)`` with defaults filled in.

    Raises:
        ConfigError: unknown method, an option the method does not take, a value out of range, a missing teacher
            (or a teacher given to ``none``), or no loss at all.
    """
    m = get_method(method)
    given = {k: v for k, v in options.items() if v is not None}
    for key in given:
        if key not in m.options:
            users = [n for n, other in METHODS.items() if key in other.options]
            where = f"{key} applies to {', '.join(users)}" if users else f"known options: {', '.join(OPTIONS)}"
            raise ConfigError(f"method '{method}' has no option '{key}' ({where})")
    schema = {k: replace(OPTIONS[k], default=default) for k, default in m.options.items()}
    resolved = check_schema(method, schema, given, defaults=True)
    ce = _CE_WEIGHT.check(method, "ce_weight", m.ce_weight if ce_weight is None else ce_weight)
    if m.needs_teacher and not has_teacher:
        raise ConfigError(f"method '{method}' needs a teacher (--teacher)")
    if not m.needs_teacher and has_teacher:
        raise ConfigError(f"method '{method}' learns from the labels alone; drop the teacher")
    if ce == 0 and resolved.get("weight", 0.0) == 0:
        raise ConfigError(f"method '{method}' has nothing to train on: the cross-entropy weight and the "
                          f"distillation weight are both 0")
    return ce, resolved


def build_terms(method: str, student: nn.Module, teacher: nn.Module | None = None, ce_weight: float | None = None,
                **options: Any) -> Distillation:
    """The loss terms of ``method`` for this student / teacher pair, with projectors sized to their features.

    Feature widths and class counts are read by a dry forward pass of two blank images of the student's input
    size through each model (:func:`~leanvit.models.factory.check_reads_input`), which also checks that the teacher
    accepts the student's input: during training it sees the student's (augmented) images.

    Example::

        d = build_terms("pefd", student, teacher, projectors=3)
        Trainer(student, train_set, val_set, cfg, "runs/pefd", loss_terms=d.terms, teacher=teacher,
                ce_weight=d.ce_weight).fit()
    """
    ce, resolved = check_options(method, teacher is not None, ce_weight, **options)
    terms = get_method(method).build(student, teacher, **resolved)
    return Distillation(method, terms, ce, resolved)


def _widths(student: nn.Module, teacher: nn.Module) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((student features, student classes), (teacher features, teacher classes))``: the one input check every
    verb shares (:func:`leanvit.models.factory.check_reads_input`)."""
    return check_reads_input(teacher, student)


def _classes(method: str, student: nn.Module, teacher: nn.Module) -> int:
    (_, k_s), (_, k_t) = _widths(student, teacher)
    if k_s != k_t:
        raise ConfigError(f"{method} compares logits, but the student has {k_s} classes and the teacher {k_t}")
    return k_s


@register_method("none", "cross-entropy on the labels alone (the baseline)", needs_teacher=False)
def _none(student: nn.Module, teacher: None) -> list[LossTerm]:
    return []


@register_method("kd", "Hinton KD: T^2 KL(teacher || student) on softened logits",
                 options={"weight": 0.9, "temperature": 4.0}, ce_weight=0.1)
def _kd(student: nn.Module, teacher: nn.Module, weight: float, temperature: float) -> list[LossTerm]:
    _classes("kd", student, teacher)
    return [LogitKDTerm(weight, temperature)]


@register_method("kd-proj", "KD through a trainable Linear(K, K) on the student's logits (extended PEFD)",
                 options={"weight": 0.9, "temperature": 4.0}, ce_weight=0.1)
def _kd_proj(student: nn.Module, teacher: nn.Module, weight: float, temperature: float) -> list[LossTerm]:
    return [ProjectedLogitKDTerm(_classes("kd-proj", student, teacher), weight, temperature)]


@register_method("proj", "1 - cos between one Linear projection of the student's features and the teacher's",
                 options={"weight": 25.0})
def _proj(student: nn.Module, teacher: nn.Module, weight: float) -> list[LossTerm]:
    (d_s, _), (d_t, _) = _widths(student, teacher)
    return [ProjectedFeatureTerm(ProjectorEnsemble(d_s, d_t, n=1, relu=False), weight, name="proj")]


@register_method("pefd", "PEFD: 1 - cos between the average of n Linear+ReLU projections and the teacher's features",
                 options={"weight": 25.0, "projectors": 3, "relu": True})
def _pefd(student: nn.Module, teacher: nn.Module, weight: float, projectors: int, relu: bool) -> list[LossTerm]:
    (d_s, _), (d_t, _) = _widths(student, teacher)
    return [ProjectedFeatureTerm(ProjectorEnsemble(d_s, d_t, n=projectors, relu=relu), weight, name="pefd")]
