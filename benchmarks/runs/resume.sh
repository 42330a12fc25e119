#!/usr/bin/env bash
# Start (or resume) the long benchmark runs in the background, one process per core, each
# holding a lock so that running this twice starts nothing new. See benchmarks/runs/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=benchmarks/runs
lane() {  # lane NAME COMMAND...: run COMMAND under NAME's lock, output in NAME.log
    local name=$1
    shift
    (setsid nohup flock -n "$runs/.$name.lock" "$@" >>"$runs/.$name.log" 2>&1 &)
}
common=(--first-image 401 --images 100 --threads 1 --time-images 5 --chunk-size 4 --quiet)
lane validation-100 python -m benchmarks.run "${common[@]}" --methods all \
    --metrics notebook,pointing,adcc --seed 0 --output "$runs/validation-100"
lane paper-100 python -m benchmarks.paper_analyses "${common[@]}" \
    --output "$runs/paper-100" --figures "$runs/paper-100/paper"
