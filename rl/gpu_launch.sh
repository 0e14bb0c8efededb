#!/usr/bin/env bash
# One self-sufficient device call (issue #7, run 2): a machine left idle for 30 s is gone, so the call that starts
# the pipeline carries everything it needs in CARRY (default runs/carry, an ignored folder, ≤ 64 MiB with the tree):
#   CARRY/qzoom.tar.xz   the shipped heads, xz (57.7 -> 42.5 MB)      } both built by `bash rl/pack_carry.sh`
#   CARRY/whl/*.whl      rl/gpu_wheels.txt without transformers      } (the device's transformers 5.17 works)
# The tracked weights (107 MiB) must stay out of the call's tree: untrack them for the call and restore after
# (rl/README.md, "What the first GPU run taught").
# It installs, unpacks, optionally dry-runs the pipeline on tiny-random (DRY=1), launches rl/gpu_session.sh detached
# (WHICH: ours | deepeyes | both; knobs pass through the environment), and polls (rl/gpu_poll.sh) until
# POLL_UNTIL seconds after its start.
#   run(command="WHICH=ours RL_MINUTES=5 bash rl/gpu_launch.sh", carry=["runs/carry"])
# Later calls poll: `bash rl/gpu_poll.sh` (exits 3 at once if the machine is a fresh one: the run is gone).
set -u
T0=$(date +%s)
CARRY=${CARRY:-runs/carry}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$CARRY"/whl/*.whl > /tmp/pip.log 2>&1; echo "pip $?"
export PYTHONPATH=/tmp/site PY=python3
python3 -c "import trl, transformers; print('trl', trl.__version__, 'transformers', transformers.__version__)"
mkdir -p runs/keep && tar xJf "$CARRY/qzoom.tar.xz" -C runs/keep
export QZOOM_TESTBED_QZOOM=$PWD/runs/keep/qzoom QZOOM_TESTBED_WEIGHTS=$PWD/runs/keep/weights
if [ "${DRY:-0}" = 1 ]; then
  MODEL=tiny-random N_TRACES=4 SFT_HEAD_STEPS=2 SFT_STEPS=2 RL_STEPS=1 EVAL_LIMIT=1 BUDGET=64 \
    TRACE_FLAGS="--needs_hr_budget 256 --workers 2" RL_FLAGS="--use_cpu true --bf16 false \
    --per_device_train_batch_size 4 --per_device_eval_batch_size 4 --num_generations 2 --budget_tokens 64 \
    --needs_hr_budget 256 --dataloader_num_workers 0" bash rl/gpu_session.sh /tmp/dry ours > /tmp/dry.log 2>&1
  cat /tmp/dry.log
  grep -q "ours: done" /tmp/dry.log || { tail -n 30 /tmp/dry/ours/*.log; exit 1; }
fi
mkdir -p runs/gpu && : > runs/gpu.log  # exists before the first poll looks for it
GPU_OURS=${GPU_OURS:-0} GPU_DEEPEYES=${GPU_DEEPEYES:-0} N_TRACES=${N_TRACES:-1000} \
  SFT_HEAD_STEPS=${SFT_HEAD_STEPS:-60} SFT_STEPS=${SFT_STEPS:-300} RL_STEPS=${RL_STEPS:-400} \
  RL_MINUTES=${RL_MINUTES:-6} EVAL_LIMIT=${EVAL_LIMIT:-50} TRACE_FLAGS=${TRACE_FLAGS:-"--workers 3"} \
  setsid nohup bash rl/gpu_session.sh runs/gpu "${WHICH:-both}" > runs/gpu.log 2>&1 < /dev/null &
POLL_UNTIL=$(( ${POLL_UNTIL:-575} - ($(date +%s) - T0) )) bash rl/gpu_poll.sh runs/gpu "$OUT"
for f in runs/gpu/*/sft.log; do echo "== $f"; grep -v Loading "$f" | tail -n 4 | cut -c1-1500; done
