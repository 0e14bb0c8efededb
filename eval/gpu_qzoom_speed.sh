#!/usr/bin/env bash
# Issue #5's speed bar on an unshared GPU: the v2 eval shared its H100 with two RL runs, so its samples/s were not
# comparable. One device call: unpack the shipped heads (carried as xz, the tracked weights kept out of the tree, as
# rl/gpu_launch.sh), run the accuracy/speed methods twice (the first pass warms the GPU), score the second.
#   run(command="bash eval/gpu_qzoom_speed.sh", carry=["runs/carry_h"])   # runs/carry_h/qzoom.tar.xz
set -u
CARRY=${CARRY:-runs/carry_h}
mkdir -p runs/keep && tar xJf "$CARRY/qzoom.tar.xz" -C runs/keep
export QZOOM_TESTBED_QZOOM=$PWD/runs/keep/qzoom QZOOM_TESTBED_WEIGHTS=$PWD/runs/keep/weights HF_HUB_OFFLINE=1
METHODS=${METHODS:-base@256,base@576,base@1024,base@2304,qzoom@256,qzoom@576,qzoom@1024}
SUBSETS=${SUBSETS:-attr-cue,fsp-4k,coarse}
nvidia-smi --query-gpu=name,utilization.gpu,memory.used --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
for pass in 1 2; do
  python3 eval/run_eval.py --model testbed-qzoom --split test --subsets "$SUBSETS" --limit 32 --n_candidates 1 \
    --methods "$METHODS" --batch_size 32 --device cuda --out "runs/speed$pass" > "runs/speed$pass.log" 2>&1
  echo "pass $pass rc $?"; tail -n 3 "runs/speed$pass.log"
done
python3 eval/qzoom_bars.py runs/speed2/records.jsonl --subsets attr-cue,fsp-4k --summary runs/speed2/report/summary.json \
  --out "$OUT/speed_bars.json"
python3 - <<'PY'
import json
for p in (1, 2):
    s = json.load(open(f"runs/speed{p}/report/summary.json"))["runs"]
    print(p, {k: round(v.get("samples_per_s") or 0, 2) for k, v in s.items()})
PY
for p in 1 2; do mkdir -p "$OUT/speed$p"; cp runs/speed$p/report/summary.json runs/speed$p/report/report.md runs/speed$p.log "$OUT/speed$p/" 2>/dev/null; done
