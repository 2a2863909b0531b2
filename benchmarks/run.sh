#!/usr/bin/env bash
# The full benchmark of docs/benchmarks.md: `dispatchkit bench` into bench-out/, then the
# pipeline benchmark into bench-out/pipeline/. Inputs are generated once into
# bench-out/data/ and shared. Extra arguments go to `dispatchkit bench`, e.g.
#   benchmarks/run.sh --memory-scale 20000000     # also the 20M-row memory comparison
#   benchmarks/run.sh --quick --no-kafka          # a smoke test
# Without DISPATCHKIT_BOOTSTRAP_SERVERS the Kafka variants start (and stop) a local broker
# with scripts/kafka. Set PIPELINE=0 to skip the pipeline benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
dispatchkit bench --out "$OUT" --data-dir "$OUT/data" "$@"
if [ "${PIPELINE:-1}" != 0 ]; then
  python benchmarks/pipeline.py --out "$OUT/pipeline" --data-dir "$OUT/data"
fi
