#!/usr/bin/env bash
# The H200 tuning campaign that made adasplash_tune/cache/shipped/nvidia-h200.sqlite.
# Run on a 4-GPU H200 host from the repository root; every phase resumes from $CAMPAIGN (the
# cache and the Optuna studies), so a phase cut short is finished by running it again.
#   benchmarks/campaign_h200.sh grid      # the main grid (48 problems, forward+backward)
#   benchmarks/campaign_h200.sh extras    # fp16, alpha 1.333, GQA 4:1
#   benchmarks/campaign_h200.sh entmax    # the standalone entmax, rows of 1k-32k
#   benchmarks/campaign_h200.sh offgrid   # N = 3000 and 12000 tuned exactly (separate cache)
#   benchmarks/campaign_h200.sh export    # the shipped file from the campaign cache
set -euo pipefail
CAMPAIGN=${CAMPAIGN:-campaign}
GPUS=${GPUS:-0,1,2,3}
BUDGET=${BUDGET:-430}          # seconds per phase (tune --time-budget)
mkdir -p "$CAMPAIGN"
TUNE=(python3 -m adasplash_tune tune --gpus "$GPUS" --compile-workers 0 --seed 2026
      --cache "$CAMPAIGN/cache.sqlite" --storage "sqlite:///$PWD/$CAMPAIGN/studies.sqlite")
# Bounded space: tiles 64/128, 4 or 8 warps, 2 or 3 stages, a few iteration caps and early-exit
# steps; the block-mask tile stays at 64x64 (random inputs are not block-sparse, so timing them
# cannot rank mask granularities).
SPACE=(--space tau_block_m=64,128 --space tau_block_n=64,128 --space tau_warps=4,8
       --space tau_stages=2,3 --space niter=3,4,8 --space tau_tol=auto,0.3 --space tau_init=mid
       --space mask_m=64 --space mask_n=64 --space mask_source=max
       --space fwd_block_m=64,128 --space fwd_block_n=64,128 --space fwd_warps=4,8 --space fwd_stages=2,3
       --space bwd_block_m=64,128 --space bwd_block_n=64,128 --space bwd_warps=4,8 --space bwd_stages=2,3
       --space bwd_q_block_m=64,128 --space bwd_q_block_n=64,128 --space bwd_q_warps=4,8
       --space bwd_q_stages=2,3)
case "${1:-grid}" in
  grid)
    "${TUNE[@]}" "${SPACE[@]}" --trials 24 --time-budget "$BUDGET" --dtype bfloat16 --batch 4 --heads 16 \
      --seq-len 1024,2048,4096,8192,16384,32768 --head-dim 64,128 --alpha 1.5,2 --both ;;
  extras)
    share=$((BUDGET / 4))
    "${TUNE[@]}" "${SPACE[@]}" --trials 18 --time-budget "$share" --dtype float16 --batch 4 --heads 16 \
      --seq-len 4096,16384 --head-dim 64 --alpha 1.5 --both
    "${TUNE[@]}" "${SPACE[@]}" --trials 18 --time-budget "$share" --dtype bfloat16 --batch 4 --heads 16 \
      --seq-len 4096,16384 --head-dim 64 --alpha 1.333 --both
    "${TUNE[@]}" "${SPACE[@]}" --trials 18 --time-budget "$share" --dtype bfloat16 --batch 1 --heads 16 \
      --kv-heads 4 --seq-len 4096,16384 --head-dim 128 --alpha 1.5 --both ;;
  entmax)
    python3 -m adasplash_tune tune --gpus "$GPUS" --compile-workers 0 --seed 2026 \
      --cache "$CAMPAIGN/entmax.sqlite" --storage "sqlite:///$PWD/$CAMPAIGN/studies-entmax.sqlite" \
      --kernel entmax --trials 16 --time-budget "$BUDGET" --dtype bfloat16 --rows 4096 \
      --cols 1024,2048,4096,8192,16384,32768 --alpha 1.5,2 \
      --space block_n=1024,2048,4096,8192,16384 --space niter=3,4,6,10 ;;
  offgrid)
    python3 -m adasplash_tune tune --gpus "$GPUS" --compile-workers 0 --seed 2026 \
      --cache "$CAMPAIGN/exact.sqlite" --storage "sqlite:///$PWD/$CAMPAIGN/studies-exact.sqlite" \
      "${SPACE[@]}" --trials 24 --time-budget "$BUDGET" --dtype bfloat16 --batch 4 --heads 16 \
      --seq-len 3000,12000 --head-dim 64 --alpha 1.5 --both ;;
  export)  # attention from the campaign cache, entmax from its own (timed with the spin-ahead timer)
    rm -f "$CAMPAIGN/ship.sqlite" adasplash_tune/cache/shipped/nvidia-h200.sqlite
    python3 -m adasplash_tune export --cache "$CAMPAIGN/cache.sqlite" --kernel adasplash "$CAMPAIGN/attention.json"
    python3 -m adasplash_tune import --cache "$CAMPAIGN/ship.sqlite" "$CAMPAIGN/attention.json"
    if [ -f "$CAMPAIGN/entmax.sqlite" ]; then
      python3 -m adasplash_tune export --cache "$CAMPAIGN/entmax.sqlite" --kernel entmax "$CAMPAIGN/entmax.json"
      python3 -m adasplash_tune import --cache "$CAMPAIGN/ship.sqlite" "$CAMPAIGN/entmax.json"
    fi
    python3 -m adasplash_tune export --cache "$CAMPAIGN/ship.sqlite" --device "NVIDIA H200" \
      adasplash_tune/cache/shipped/nvidia-h200.sqlite ;;
  *) echo "unknown phase $1 (grid, extras, entmax, offgrid, export)" >&2; exit 2 ;;
esac
