#!/bin/sh
# One command on a GPU machine: every figure into the JSON at $1 (benchmarks/accelerator.py); more flags after it.
out="${1:?usage: benchmarks/accelerator.sh OUT.json [flags]}"; shift
exec python "$(dirname "$0")/accelerator.py" --out="$out" "$@"
