#!/usr/bin/env bash
# Run leanvit's equivalence tests against the OLDEST timm that pyproject.toml allows (the `timm>=X` floor), so the
# floor stays true. The venv keeps its own (newest) timm: the floor release is installed, without dependencies,
# into .timm-floor/ in the checkout and put first on PYTHONPATH, where it shadows the venv's copy.
#
# The floor is read from pyproject.toml (its single source of truth). Why it is what it is (found by installing
# each timm release and running these tests): timm.layers.Attention and VisionTransformer.pool_include_prefix
# appear in 1.0.16 (`import leanvit` fails before); device=/dtype= on timm's layers in 1.0.21 and the block index
# (depth=) passed to blocks in 1.0.23 (the channel-shuffle blocks need both); Attention.forward(is_causal=) in
# 1.0.26 (the channel-shuffle block forwards it). 1.0.16-1.0.25 pass every plain-timm-ViT test and fail the
# channel-shuffle ones.
#
# Which tests: the ones that compare a patched or re-implemented model with timm's own forward, because they are
# the ones a timm release can break silently (they read timm's Block/Attention internals). Selected by file and by
# name (-k), since there is no marker for them:
#   test_contract.py   test_zero_reduction_is_the_unpatched_model: every method at zero reduction == the unpatched
#                      model, on every timm ViT variant in conftest.VARIANTS (cls / dist / register tokens,
#                      LayerScale, q/k norm, no-cls avg pool, no_embed_class + pre_norm)
#   test_reduce.py     test_r0_equals_dense(_cuda), test_r0_on_dynamic_img_size_*, test_dynamic_img_size_*_native_size,
#                      test_attention_pool_head_*: r=0 == dense; test_unpatch_restores_exactly;
#                      test_gtp_*matches_reference: GTP == the paper's rule written out on timm's sub-modules
#   test_tome_exact.py test_tome_*authors_rules, test_tome_documented_extension, test_tome_r0_is_dense
#   test_gtp_coverage.py  test_r0_equals_dense
#   test_idle.py, test_idle_pyramid.py  test_keep_one_equals_dense, *gather_path* (timm ViT and PVT-v2)
#   test_shuffle.py    test_block_matches_plain_reference (channel-shuffle block == its plain reference built from
#                      timm layers), test_patch_r0_equals_unpatched
# A listed file that no longer exists makes pytest fail (it does not skip it); if tests are renamed, update -k.
#
# Usage: bash scripts/test_timm_floor.sh [extra pytest args]     (or `make test-timm-floor`)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
FLOOR_DIR="$PWD/.timm-floor"

FLOOR=$(sed -nE 's/^[[:space:]]*"timm>=([0-9][0-9.]*)".*/\1/p' pyproject.toml | head -n 1)
if [ -z "$FLOOR" ]; then
  echo "error: no \"timm>=X\" requirement found in pyproject.toml" >&2
  exit 2
fi

if [ -f "$FLOOR_DIR/timm/__init__.py" ] && [ -d "$FLOOR_DIR/timm-$FLOOR.dist-info" ]; then
  echo "timm $FLOOR already in .timm-floor/"
else
  echo "installing timm==$FLOOR (no dependencies) into .timm-floor/"
  rm -rf "$FLOOR_DIR"
  "$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$FLOOR_DIR" "timm==$FLOOR"
fi

FILES=(tests/test_contract.py tests/test_reduce.py tests/test_tome_exact.py tests/test_gtp_coverage.py
       tests/test_idle.py tests/test_idle_pyramid.py tests/test_shuffle.py)
K="zero_reduction_is_the_unpatched_model or r0_equals or r0_is_dense or r0_on_dynamic or native_size"
K="$K or attention_pool_head or restores_exactly or matches_reference or matches_authors_rules"
K="$K or documented_extension or matches_plain_reference or keep_one_equals_dense or equals_gather_path"

start=$(date +%s)
# One process: check which timm is imported (version and location), then run pytest in that same process, so the
# tests provably run on the timm that was checked. (Importing timm first imports anyio, whose pytest plugin pytest then
# cannot assertion-rewrite: that warning is expected here and silenced.)
export LEANVIT_EXPECT_TIMM="$FLOOR"
PYTHONPATH="$FLOOR_DIR${PYTHONPATH:+:$PYTHONPATH}" "$PY" - -q -p no:cacheprovider -W ignore::pytest.PytestAssertRewriteWarning -k "$K" "${FILES[@]}" "$@" <<'EOF'
import os, sys
import timm
want, where = os.environ["LEANVIT_EXPECT_TIMM"], os.path.dirname(os.path.dirname(timm.__file__))
print(f"timm {timm.__version__} from {where}", flush=True)
if timm.__version__ != want or os.path.realpath(where) != os.path.realpath(".timm-floor"):
    sys.exit(f"error: expected timm {want} from .timm-floor, got {timm.__version__} from {where}")
import pytest
sys.exit(pytest.main(sys.argv[1:]))
EOF
echo "timm floor $FLOOR: equivalence tests passed in $(( $(date +%s) - start )) s"
