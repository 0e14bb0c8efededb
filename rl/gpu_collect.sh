#!/usr/bin/env bash
# Copy what a GPU session has produced so far into DEST (a device call's $OUT), small files only, so that every
# polling call brings results back: a machine that goes back takes runs/ with it (the first RL run lost its
# after-RL eval that way, eval/results/rl_testbed.md).
#   bash rl/gpu_collect.sh runs/gpu "$OUT"
set -uo pipefail
RUN=${1:?run folder (e.g. runs/gpu)}
DEST=${2:?destination folder, the $OUT of a device call}
mkdir -p "$DEST"
[ -d "$RUN" ] || { echo "no $RUN yet"; exit 0; }
cp "$RUN"/*.png "$RUN"/comparison.md "$DEST"/ 2>/dev/null
# logs, summaries, stats, records, reports; no images, weights, optimiser states or checkpoints
tar czf "$DEST/$(basename "$RUN")_small.tgz" -C "$RUN" \
  --exclude='images' --exclude='checkpoint-*' --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' \
  --exclude='sft_policy' --exclude='policy' --exclude='init_policy' --exclude='traces.jsonl' . && \
  ls -la "$DEST"
