#!/usr/bin/env bash
# One polling call of a detached GPU run (rl/gpu_launch.sh started it): wait until RUN.log says "all done" or
# POLL_UNTIL seconds pass, print the log, and pack the small outputs into DEST (the call's $OUT).
#   run(command="bash rl/gpu_poll.sh")                 # runs/gpu.log, runs/gpu, $OUT, 560 s
# A machine left idle for 30 s between calls is given back, and the next call lands on a bare one. Then there is
# nothing to wait for: exit 3 at once instead of spending the whole poll on an empty folder (the sixth session's
# second call spent 560 s of device budget that way).
set -u
RUN=${1:-runs/gpu}
DEST=${2:-${OUT:?give DEST or run inside a device call}}
POLL_UNTIL=${POLL_UNTIL:-560}
LOG="$RUN.log"
if [ ! -f "$LOG" ]; then
  echo "no $LOG: this is a fresh machine, so the run that wrote it is gone; launch again (rl/gpu_launch.sh)"
  exit 3
fi
T0=$(date +%s)
while [ $(( $(date +%s) - T0 )) -lt "$POLL_UNTIL" ]; do
  grep -q "all done" "$LOG" && break
  sleep 10
done
cat "$LOG"
bash "$(dirname "$0")/gpu_collect.sh" "$RUN" "$DEST" > /dev/null
