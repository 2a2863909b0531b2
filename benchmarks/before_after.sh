#!/usr/bin/env bash
# Whole `dispatchkit run` commands of two checkouts, interleaved, on one input.
#
#   benchmarks/before_after.sh BEFORE_DIR AFTER_DIR INPUT BOOTSTRAP [REPEATS]
#
# BEFORE_DIR and AFTER_DIR are checkouts (e.g. `git worktree add --detach ../before
# <commit>`); each runs with its own src/ first on PYTHONPATH and this repository's
# .venv. Prints one line per command: repeat, checkout, variant, seconds. Variants:
# embedded (--no-report), embedded with the report, and --broker kafka (BOOTSTRAP,
# a fresh topic prefix per command). Compare medians; run both in one invocation.
set -u
before=$1 after=$2 input=$3 bootstrap=$4 repeats=${5:-3}
python=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
for i in $(seq 1 "$repeats"); do
  for tree in "$before" "$after"; do
    for variant in embedded embedded-report kafka; do
      out=$(mktemp -d)
      extra=(--no-report)
      [ "$variant" = embedded-report ] && extra=()
      [ "$variant" = kafka ] && extra=(--no-report --broker kafka -b "$bootstrap" --topic-prefix "ba$RANDOM$i")
      start=$(date +%s.%N)
      if ! PYTHONPATH="$tree/src" "$python" -m dispatchkit run "$input" --out "$out" -q \
        --workers 2 "${extra[@]}" > /dev/null 2> "$out.err"; then
        echo "FAILED $tree $variant: $(tail -1 "$out.err")" >&2
      fi
      end=$(date +%s.%N)
      echo "$i $(basename "$tree") $variant $(echo "$end - $start" | bc)"
      rm -rf "$out" "$out.err"
    done
  done
done
