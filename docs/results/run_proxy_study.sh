#!/usr/bin/env bash
# The CPU proxy study of docs/results.md: every proxy_* variant x seed on full CIFAR-100, LANES runs
# at a time with one torch thread each (on 2 cores two one-thread runs train ~20% more images/s than
# one two-thread run). Each finished run's results.json and per-epoch metrics.csv are copied to
# $DEST/<variant>/seed<k>/; a run already there is skipped, so the study can be stopped and relaunched.
#   make proxy-study                      # or: LANES=1 SEEDS="0" docs/results/run_proxy_study.sh
#   OVERRIDES="trainer.max_epochs=15" DEST=docs/results/proxy_15_epochs OUT=outputs/proxy_15_epochs \
#     VARIANTS="proxy_mcl_okd proxy_independent" SEEDS=0 docs/results/run_proxy_study.sh   # a variation
#   python -m mcl_lightning.report docs/results/proxy --out docs/results/proxy_report
set -euo pipefail
export PY="${PY:-.venv/bin/python}"
export DATA_ROOT="${DATA_ROOT:-${MCL_DATA_ROOT:-../shared/data}}"
export OUT="${OUT:-outputs/proxy}" DEST="${DEST:-docs/results/proxy}" OVERRIDES="${OVERRIDES:-}"
LANES="${LANES:-2}"
SEEDS="${SEEDS:-0 1 2}"
VARIANTS="${VARIANTS:-proxy_mcl_okd proxy_dml proxy_independent proxy_mcl_okd_no_teacher proxy_mcl_okd_no_contrast proxy_single proxy_shared_trunk}"

run_one() {
  local variant=$1 seed=$2 run_dir="$OUT/$1/seed$2" dest="$DEST/$1/seed$2"
  if [[ -f "$dest/results.json" ]]; then echo "skip $variant seed $seed (in $dest)"; return 0; fi
  rm -rf "$run_dir" && mkdir -p "$OUT/$variant"
  echo "$(date +%H:%M:%S) start $variant seed $seed"
  if OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE "$PY" -m mcl_lightning.train "experiment=cifar100/$variant" "seed=$seed" \
      "data.root=$DATA_ROOT" trainer.enable_progress_bar=false "hydra.run.dir=$run_dir" $OVERRIDES > "$run_dir.log" 2>&1; then
    mkdir -p "$dest" && cp "$run_dir/results.json" "$dest/" && cp "$run_dir/csv/metrics.csv" "$dest/"
    echo "$(date +%H:%M:%S) done  $variant seed $seed -> $dest"
  else
    echo "$(date +%H:%M:%S) FAILED $variant seed $seed: see $run_dir.log"; return 1
  fi
}
export -f run_one

# Seed-major order: if the study is cut short, every variant has the same number of seeds.
for seed in $SEEDS; do for variant in $VARIANTS; do echo "$variant $seed"; done; done \
  | xargs -P "$LANES" -L 1 bash -c 'run_one "$@"' _
