"""Assemble BENCHMARKS.md from the sections the benchmark scripts wrote to benchmarks/results/*.md.

    python benchmarks/report.py
"""
from __future__ import annotations

import argparse

from common import RESULTS, ROOT

SECTIONS = [
    ("reference_models", "Reference models (Fashion-MNIST)",
     "The shipped models, evaluated with `leanvit eval` semantics. Script: `benchmarks/reference_models.py`."),
    ("compare_fmnist", "Token reduction on the reference model: accuracy vs MACs (no fine-tuning)",
     "`leanvit compare` on the shipped model and the Fashion-MNIST test set. At a budget every method meets the "
     "same measured MACs; a method whose own work costs MACs (ToMe's matching, GTP's semantic graph) removes a few "
     "more tokens to pay for it. Script: `benchmarks/compare_fmnist.py`."),
    ("demo_time", "The main job's wall time (`make demo`)",
     "The README's first command, timed end to end with its output sent to a pipe (as in CI or `make demo > log`). "
     "Script: `benchmarks/demo_time.py`."),
    ("tune_gtp", "GTP settings chosen on the held-out split",
     "GTP's alpha and graph were chosen on the 5,000 held-out training images (`--split val`), never on the test "
     "set. Script: `benchmarks/tune_gtp.py`."),
    ("gtp_scores", "GTP selection scores on the held-out split",
     "Which tokens GTP propagates away, scored six ways. Script: `benchmarks/ablate_gtp_score.py`."),
    ("gtp_nolost", "GTP that loses no removed token (`orphans`)",
     "GTP's `orphans` option: what becomes of a removed token with no kept neighbour in the graph (`drop`, as "
     "published; `nearest`, a fallback edge to its most similar kept token; `merge`, merged into that token). "
     "Settings chosen on the held-out split of the teacher; the comparison on the test set of both shipped models. "
     "Script: `benchmarks/gtp_nolost.py`."),
    ("speed_deit", "Token reduction speed on DeiT-S / DeiT-B at 224 (CPU)",
     "Script: `benchmarks/speed_deit.py`."),
    ("speed_deit_recheck", "Token reduction speed on DeiT-S after the restructuring (CPU)",
     "The same command on DeiT-S at batch 32 only (3 rounds), rerun on 2026-12-06 after the reducers were rebuilt on "
     "attention building blocks, per-thread state and adapters. The absolute speed-ups are at or above the table "
     "above for every method (GTP 1.448 against 1.409, EViT 1.436 against 1.364, ToMe 1.325 against 1.318); the "
     "ideal row ran faster in this run's median (1.513 against 1.420), so the efficiencies of the median run are "
     "lower, and median and best runs disagree by up to 0.2: the shared 2-core host was noisy, and this run is no "
     "evidence of a change in speed. Script: `benchmarks/speed_deit.py --name speed_deit_recheck`."),
    ("speed_deit_compiled", "Token reduction speed on DeiT-S with torch.compile (CPU)",
     "The same rows on DeiT-S at batch 32 and 1, every model (dense and ideal included) compiled with "
     "`torch.compile(fullgraph=True)` before timing, run with `TORCHINDUCTOR_COMPILE_THREADS=1` and an empty "
     "`TORCHINDUCTOR_CACHE_DIR` in the environment (no background compile workers, no kernels from earlier runs). "
     "Compilation removes the per-op dispatch cost that a reducer's small bookkeeping ops pay in eager mode. "
     "Script: `benchmarks/speed_deit.py --compile`."),
    ("compile_time", "Compile time of each method against the dense model (CPU)",
     "How long `torch.compile` takes on a patched DeiT-S, and where the time goes. Script: "
     "`benchmarks/compile_time.py`."),
    ("compile_time_cpp_wrapper", "Compile time with inductor's cpp_wrapper (CPU)",
     "The same measurement with `torch._inductor.config.cpp_wrapper = True`, which builds the graph's wrapper and "
     "all its kernels as one C++ module. Script: `benchmarks/compile_time.py --cpp-wrapper`."),
    ("gtp_overhead", "GTP overhead profile", "Script: `benchmarks/gtp_overhead.py`."),
    ("gtp_overhead_b1", "GTP overhead profile at batch 1", "Script: `benchmarks/gtp_overhead.py`."),
    ("idle_finetune", "IdleViT against EViT on the reference teacher, with and without fine-tuning",
     "`leanvit finetune` (IdleViT's recipe, shortened as stated) on the shipped teacher, then `leanvit eval` on the "
     "test set: the dense model, each method at keep 0.7 and 0.5 patched into the dense weights (no fine-tuning) and "
     "after fine-tuning (last epoch's weights and their EMA; mean ± std over seeds). Script: "
     "`benchmarks/idle_finetune.py`."),
    ("speed_idle", "IdleViT against EViT: speed on DeiT-S at 224 (CPU)",
     "Each method beside its zero-overhead ideal (the same token counts by plain truncation), all rows in one "
     "interleaved run. Script: `benchmarks/speed_idle.py`."),
    ("ablate_shuffle", "Channel-shuffle ViT: design ablation on Fashion-MNIST",
     "Every registered `leanvit_shuffle_fm_*` variant and its vanilla partner (the reference student's "
     "architecture, MACs within 3%), trained from scratch with the student's recipe on the schedule stated, then "
     "evaluated on the test set. Script: `benchmarks/ablate_shuffle.py`."),
    ("ablate_shuffle_seeds", "Channel-shuffle ViT: seed spread of the ablation schedule",
     "The default design, two of the best in the table above (expansion 3, an MLP per group) and the partner on the "
     "ablation's schedule with two seeds (seed 0 is the run in the table above): the noise floor of that table. "
     "Script: `benchmarks/ablate_shuffle.py --seeds 0 1`."),
    ("shuffle_final", "Channel-shuffle ViT against the shipped student (full recipe)",
     "The chosen design trained with exactly the reference student's recipe, two seeds. Script: "
     "`benchmarks/ablate_shuffle.py` (full schedule)."),
    ("speed_shuffle", "Channel-shuffle ViT: CPU speed against the vanilla partner",
     "Each shuffle model and its vanilla partner (MACs within 3%) timed in one interleaved run per batch size. "
     "Script: `benchmarks/speed_shuffle.py`."),
    ("speed_shuffle_final", "Channel-shuffle ViT: CPU speed of the default and the chosen design",
     "The default and the chosen (an MLP per group) design against their vanilla partners on Fashion-MNIST and at "
     "DeiT-Tiny geometry, more rounds than the table above. Script: `benchmarks/speed_shuffle.py`."),
    ("distill_fmnist", "Distillation on Fashion-MNIST: PEFD, projectors and KD (full recipe)",
     "The shipped teacher (and the CNN teacher for `pefd-cnn`) into the reference student's architecture under the "
     "student's recipe plus the distillation term; `leanvit analyze` on each result. Script: "
     "`benchmarks/distill_fmnist.py`."),
    ("distill_fmnist_e3_n20000", "Distillation: number of PEFD projectors and a CNN teacher (shorter schedule)",
     "The n sweep, the CNN teacher into the ViT student (`pefd-cnn`) and no distillation, on a shorter schedule "
     "(stated in the table). Script: `benchmarks/distill_fmnist.py --epochs 3 --limit 20000 --train-limit 10000`."),
    ("distill_cost", "Distillation: cost of the projectors in a training step",
     "Script: `benchmarks/distill_cost.py`."),
    ("design_measurements", "Design measurements behind code defaults",
     "Figures that once lived in docstrings and comments, where they explained a default; the code keeps the "
     "reason and points here. Each was measured on the project's 2-core AMD EPYC host (torch 2.14.1) on the date "
     "given; values that depend on the host are marked so. Written by hand from the measurements named in each "
     "row."),
    ("findings", "What the figures say (and what they do not yet)", ""),
]


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    parts = ["# Benchmarks\n",
             "Every figure here is written by a script in `benchmarks/` (each section names its command, machine and "
             "date); `python benchmarks/report.py` rebuilds this file from `benchmarks/results/`. Speed figures on "
             "the shared 2-core machine are noisy: compare ratios within one run, not absolute numbers across runs.\n"]
    for name, title, intro in SECTIONS:
        f = RESULTS / f"{name}.md"
        if f.is_file():
            parts.append(f"## {title}\n\n{intro}\n\n{f.read_text().strip()}\n")
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts))
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
