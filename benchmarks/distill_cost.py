"""What distillation adds to a training step: the projectors' own share (target: under 1%) and the teacher's.

    python benchmarks/distill_cost.py --threads 2

On the reference pair (leanvit_vit_fm_teacher -> leanvit_vit_fm_student) with PEFD's three projectors, times
(medians of interleaved runs):

* a whole PEFD training step: student forward + backward, teacher forward (no gradients), projectors, AdamW step;
* the projectors alone: forward + backward of the ensemble and its loss on features of the step's shape, plus
  their AdamW update;
* the teacher's forward alone;
* the whole step with the teacher's outputs read from a teacher cache (``leanvit distill --teacher-cache``: a run
  on the same batches as an earlier one), hashing of the batch included;

and counts the MACs of each (forward + backward taken as 3x the forward).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import leanvit
from leanvit.analysis import count_macs, default_input_size, threads_phrase
from leanvit.distill import build_terms
from leanvit.engine.losses import cosine_distance
from leanvit.engine.teacher import TeacherCache, batch_key
from leanvit.engine import CrossEntropyTerm, StepContext

from common import add_threads, parse_args, table, write


def _median_ms(fns: dict, runs: int, warmup: int) -> dict[str, float]:
    """Interleaved timing: every round runs each function once, so drifts of a shared machine hit all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(1e3 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="leanvit_vit_fm_student")
    p.add_argument("--teacher", default="leanvit_vit_fm_teacher")
    p.add_argument("--projectors", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    add_threads(p)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--name", default="distill_cost")
    p.add_argument("--note", default="", help="a sentence on the machine's state, added to the caption")
    args = parse_args(p)
    torch.manual_seed(0)

    student = leanvit.create_model(args.student).train()
    teacher = leanvit.create_model(args.teacher, pretrained=True).eval().requires_grad_(False)
    d = build_terms("pefd", student, teacher, projectors=args.projectors)
    (term,) = d.terms
    ce = CrossEntropyTerm(d.ce_weight)
    params = [*student.parameters(), *term.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    proj_opt = torch.optim.AdamW(term.parameters(), lr=1e-4)
    size = default_input_size(student)
    x = torch.randn(args.batch_size, *size)
    y = torch.randint(0, 10, (args.batch_size,))
    with torch.no_grad():
        t_feat = teacher.forward_head(teacher.forward_features(x), pre_logits=True)
    s_feat = torch.randn(args.batch_size, term.projector.linear.in_features)

    cache = TeacherCache(tempfile.mkdtemp(), teacher)
    cache.begin_epoch(0)
    cache.store(batch_key(x), t_feat, teacher.forward_head(teacher.forward_features(x)).detach())

    def step(teacher_cache: TeacherCache | None = None) -> None:  # the trainer's step module, plus the optimiser
        f = student.forward_features(x)
        ctx = StepContext(student, x, y, student.forward_head(f), student.forward_head(f, pre_logits=True), teacher,
                          teacher_cache=teacher_cache)
        loss = ce.weight * ce(ctx) + term.weight * term(ctx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def projectors() -> None:
        feat = s_feat.clone().requires_grad_(True)
        loss = term.weight * cosine_distance(term.projector(feat), t_feat)
        proj_opt.zero_grad(set_to_none=True)
        loss.backward()
        proj_opt.step()

    def teacher_forward() -> None:
        with torch.no_grad():
            teacher.forward_head(teacher.forward_features(x), pre_logits=True)

    ms = _median_ms({"step": step, "projectors": projectors, "teacher": teacher_forward,
                     "step, teacher cached": lambda: step(cache)}, args.runs, warmup=2)
    assert cache.hits > 0 and cache.misses == 0
    b = args.batch_size
    lin = term.projector.linear
    macs = {"student": 3 * b * count_macs(student).macs, "teacher": b * count_macs(teacher).macs,
            "projectors": 3 * b * lin.in_features * lin.out_features}
    macs["step"] = sum(macs.values())
    macs["step, teacher cached"] = macs["step"] - macs["teacher"]
    rows = [{"part": k, "ms": ms[k], "time_share": ms[k] / ms["step"], "gmacs": macs[k] / 1e9,
             "macs_share": macs[k] / macs["step"]} for k in ("step", "teacher", "projectors", "step, teacher cached")]
    md = [f"PEFD training step, {args.teacher} -> {args.student}, {args.projectors} projectors "
          f"({sum(p.numel() for p in term.parameters()):,} parameters), batch {b}, "
          f"{threads_phrase(args.threads)}; median of {args.runs} interleaved runs. MACs: forward + backward = "
          f"3 x forward for trained parts. {args.note}\n",
          *table(["part", "ms", "share of the step (time)", "GMACs", "share of the step (MACs)"],
                 ([r["part"], f"{r['ms']:.2f}", f"{100 * r['time_share']:.3f}%", f"{r['gmacs']:.3f}",
                   f"{100 * r['macs_share']:.3f}%"] for r in rows))]
    write(args.name, {"rows": rows, "args": vars(args)}, "\n".join(md))


if __name__ == "__main__":
    main()
