#!/usr/bin/env bash
# Build the folder one device call carries (rl/gpu_launch.sh): the shipped heads as qzoom.tar.xz and the wheels of
# rl/gpu_wheels.txt without transformers (the device's own works), under 64 MiB together with the working tree.
#   bash rl/pack_carry.sh [runs/carry]
set -euo pipefail
CARRY=${1:-runs/carry}
mkdir -p "$CARRY/whl"
if [ ! -s "$CARRY/qzoom.tar.xz" ] || [ -n "$(find qzoom_agent/testbed/qzoom -newer "$CARRY/qzoom.tar.xz")" ]; then
  tar cf - -C qzoom_agent/testbed qzoom | xz -9e -T0 > "$CARRY/qzoom.tar.xz.tmp" && mv "$CARRY/qzoom.tar.xz.tmp" "$CARRY/qzoom.tar.xz"
fi
grep -v '^transformers==' rl/gpu_wheels.txt > "$CARRY/wheels.txt"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$CARRY/whl" -r "$CARRY/wheels.txt"
rm -f "$CARRY"/whl/transformers-*.whl
tree=$(git ls-files -z | grep -zv '^qzoom_agent/testbed/weights/\|^qzoom_agent/testbed/qzoom/' | xargs -0 cat | wc -c)
total=$(( $(du -sb "$CARRY" | cut -f1) + tree ))
echo "$CARRY: $(du -sh "$CARRY" | cut -f1); with the tree $(( total / 1048576 )) MiB (limit 64)"
[ "$total" -lt $(( 64 * 1048576 )) ] || { echo "too big for one call" >&2; exit 1; }
echo "for the call, leave the shipped weights out of the tree (rl/README.md); restore them after"
