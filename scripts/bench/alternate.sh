#!/usr/bin/env bash
# Two or more `fathom` binaries (say, before and after a change) timed in turn on one
# configuration, so that a slow spell of a shared machine falls on all of them:
#
#   scripts/bench/alternate.sh small 5 /tmp/fathom-before target/release/fathom
#   PRECISION=fp32 scripts/bench/alternate.sh medium 3 /tmp/a /tmp/b
#
# Each round runs every binary once (`fathom bench` with FATHOM_PROFILE=1) and keeps the
# compiled training program's time per run (forward, loss, backward; the optimizer is not in
# it). Prints each binary's times sorted: compare the best and the medians, never single runs.
# Weights come from `fathom init` into $WEIGHTS/<config> (made once, by the first binary).
set -euo pipefail

if [ $# -lt 3 ]; then
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
config=$1
rounds=$2
shift 2
precision=${PRECISION:-bf16}
weights=${WEIGHTS:-/tmp/fathom-weights}/$config
case $config in
  small) shape=(--batch 4 --seq 256 --steps 8) ;;
  medium) shape=(--batch 2 --seq 512 --steps 3) ;;
  *) echo "alternate.sh: unknown configuration '$config' (small or medium)" >&2; exit 2 ;;
esac
here=$(cd "$(dirname "$0")/../.." && pwd)
if [ ! -d "$weights" ]; then
  "$1" init --config "$here/benches/configs/$config.json" --seed 0 --out "$weights" >/dev/null
fi

declare -A times
for _ in $(seq "$rounds"); do
  for binary in "$@"; do
    ms=$(FATHOM_PROFILE=1 "$binary" bench --config "$here/benches/configs/$config.json" \
      --weights "$weights" "${shape[@]}" --threads 2 --precision "$precision" 2>&1 |
      sed -n 's/^FATHOM_PROFILE deepseek_v3_train: .*, \([0-9.]*\) ms per run$/\1/p')
    if [ -z "$ms" ]; then
      echo "alternate.sh: $binary printed no training program time" >&2
      exit 1
    fi
    times[$binary]="${times[$binary]:-} $ms"
  done
done
echo "$config, $precision: training program ms per run, each binary's rounds sorted"
for binary in "$@"; do
  echo "  $binary:$(tr ' ' '\n' <<<"${times[$binary]}" | sort -n | tr '\n' ' ')"
done
