#!/bin/bash
# Copy run records (finished) and resumable states (unfinished) of runs/ into train_state/ (see train_state/README.md).
cd "$(dirname "$0")/.."
best_is_last() {  # the run's last epoch has the best validation top-1: its analyze.json stands for both columns
  .venv/bin/python -c "import json, sys; sys.path.insert(0, 'benchmarks'); from distill_fmnist import best_is_last
sys.exit(not best_is_last(json.load(open(sys.argv[1]))))" "$1/log.json"
}
save() {  # $1 = run folder, $2 = destination
  local src=$1 dst=$2
  mkdir -p "$dst"
  if [ -f "$src/model.safetensors" ] && [ -f "$src/analyze.json" ] && { [ -f "$src/analyze_best.json" ] || best_is_last "$src"; }; then
    rm -f "$dst/last.pt" "$dst/best.safetensors" "$dst/model.safetensors"
    for f in command.txt config.yaml log.csv log.json test.json analyze.json analyze_best.json; do
      [ -f "$src/$f" ] && cp "$src/$f" "$dst/"
    done
  elif [ -f "$src/model.safetensors" ]; then  # finished, not analysed yet: keep the weights the analysis reads
    rm -f "$dst/last.pt"
    for f in command.txt config.yaml log.csv log.json model.safetensors best.safetensors analyze.json; do
      [ -f "$src/$f" ] && cp "$src/$f" "$dst/"
    done
  else
    for f in command.txt config.yaml log.csv log.json last.pt best.safetensors analyze.json; do
      [ -f "$src/$f" ] && cp "$src/$f" "$dst/"
    done
  fi
}
for d in runs/distill_fmnist/*/; do
  n=$(basename $d)
  [ "$n" = teacher_cache ] && continue
  [ -f "$d/last.pt" ] || [ -f "$d/model.safetensors" ] || [ -f "$d/analyze.json" ] || continue
  save "$d" "train_state/distill_fmnist/$n"
done
cp runs/distill_fmnist/teacher_*.json train_state/distill_fmnist/ 2>/dev/null
if [ -f runs/leanvit_resnet_fm_teacher/last.pt ] && [ ! -f runs/leanvit_resnet_fm_teacher/model.safetensors ]; then
  mkdir -p train_state/leanvit_resnet_fm_teacher
  cp runs/leanvit_resnet_fm_teacher/{command.txt,config.yaml,log.csv,log.json,last.pt,best.safetensors} train_state/leanvit_resnet_fm_teacher/ 2>/dev/null
fi
du -sh train_state
