#!/usr/bin/env bash
# The issue-17 H200 runs of examples/train_lm.py, one device call per part (each fits 10 minutes):
#   bash benchmarks/train_lm_h200.sh n2048 OUT     # softmax and alpha = 1.5 at N = 2048 (+ capture, + stages)
#   bash benchmarks/train_lm_h200.sh learned OUT   # learned alpha per head at N = 2048 (+ capture)
#   bash benchmarks/train_lm_h200.sh backends OUT  # alpha = 1.5, N = 512: the Triton and torch backends agree
#   bash benchmarks/train_lm_h200.sh n8192 OUT     # step time and peak memory at N = 8192
#   bash benchmarks/train_lm_h200.sh variants OUT  # alpha = 1.5 with scores x 2, alpha = 1.25 (two runs at once)
#   bash benchmarks/train_lm_h200.sh schedule OUT  # alpha = 1.5 warmed up from 1.25 and from 1.1 over 2500 steps
#                                                  # (two runs at once; validation at the alpha in force)
#   bash benchmarks/train_lm_h200.sh learned-init OUT  # learned alpha per head and per layer, both started
#                                                  # at 1.1 (near softmax) instead of 1.5 (two runs at once)
# Each run writes OUT/NAME/{config.json,metrics.jsonl,summary.json} and OUT/NAME.log;
# examples/plot_train_lm.py then compares the run folders (it needs matplotlib for the PNG).
set -euo pipefail
part=${1:?n2048, learned, backends, n8192, variants, schedule or learned-init}
out=${2:?output folder}
mkdir -p "$out"
run() {  # NAME ARGS...: one training run, its log kept whole, its tail shown
  local name=$1; shift
  python3 examples/train_lm.py --out "$out/$name" --overwrite "$@" > "$out/$name.log" 2>&1 || echo "$name failed: $?"
  tail -n 22 "$out/$name.log"
}
case "$part" in
  n2048)
    run sdpa --attention sdpa
    run alpha1.5 --attention adasplash --alpha 1.5 --capture "$out/capture-alpha1.5"
    files=$(ls "$out"/capture-alpha1.5/layer*.safetensors | sed 's/^/captured:/' | paste -sd, -)
    python3 benchmarks/bench_stages.py --problems 1,4,2048,64,causal --families "$files" --time-budget 90 \
      --out "$out/stages-captured-alpha1.5.json" > "$out/stages.log" 2>&1 || echo "stages failed: $?"
    tail -n 30 "$out/stages.log"
    ;;
  learned)
    # one attention call per head (24 per step): 5000 steps need ~300 s; the 2026-12-02 run had 240 s
    run alpha-learned --attention adasplash --alpha learned --alpha-init 1.5 --time-budget 330 --capture "$out/capture-alpha-learned"
    ;;
  backends)
    small=(--seq-len 512 --batch 8 --steps 300 --time-budget 100 --eval-every 50)
    run backend-triton --attention adasplash --alpha 1.5 --backend triton "${small[@]}"
    run backend-torch --attention adasplash --alpha 1.5 --backend torch "${small[@]}"
    ;;
  n8192)
    n8k=(--seq-len 8192 --batch 2 --steps 12 --time-budget 240)
    run n8192-sdpa --attention sdpa "${n8k[@]}"
    run n8192-alpha1.5 --attention adasplash --alpha 1.5 "${n8k[@]}"
    run n8192-alpha-learned --attention adasplash --alpha learned --alpha-init 1.5 "${n8k[@]}"
    ;;
  variants)  # both on the GPU at once: their losses are as alone, their step times are not
    run alpha1.5-scale2 --attention adasplash --alpha 1.5 --score-scale 2 --time-budget 0 &
    run alpha1.25 --attention adasplash --alpha 1.25 --time-budget 0 &
    wait
    ;;
  schedule)  # both on the GPU at once, as variants; alpha reaches 1.5 at step 2500 and stays for the rest
    run alpha1.5-from1.25 --attention adasplash --alpha 1.5 --alpha-start 1.25 --alpha-warmup 2500 --time-budget 0 &
    run alpha1.5-from1.1 --attention adasplash --alpha 1.5 --alpha-start 1.1 --alpha-warmup 2500 --time-budget 0 &
    wait
    ;;
  learned-init)  # both on the GPU at once, as variants; all 5000 steps (no time budget)
    run alpha-learned-from1.1 --attention adasplash --alpha learned --alpha-init 1.1 --time-budget 0 &
    run alpha-learned-layer-from1.1 --attention adasplash --alpha learned --alpha-per layer --alpha-init 1.1 \
      --time-budget 0 &
    wait
    ;;
  *) echo "unknown part: $part" >&2; exit 2 ;;
esac
