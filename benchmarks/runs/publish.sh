#!/usr/bin/env bash
# Publish the finished runs: the two compare tables (with their cost tables) into
# docs/benchmarks/, the paper's analyses into docs/paper/, and refresh the tables the docs
# paste from them (benchmarks/sync_docs.py). The cost tables time every method,
# so run this on a quiet machine, after both lanes of resume.sh have stopped. See README.md.
#
#   PYTHON=.venv/bin/python bash benchmarks/runs/publish.sh            # everything
#   PYTHON=.venv/bin/python bash benchmarks/runs/publish.sh benchmark  # the two compare tables
#   PYTHON=.venv/bin/python bash benchmarks/runs/publish.sh paper      # the paper's analyses
#
# (The benchmark's stores are done before the paper's configurations: stop the lanes, publish
# the benchmark, and resume them for the paper.)
set -euo pipefail
script=$(realpath "$0")
cd "$(dirname "$script")/../.."
runs=benchmarks/runs
python=${PYTHON:-python}
phase=${1:-all}
case $phase in
    all | benchmark | paper) ;;
    *)
        echo "publish.sh: unknown part '$phase' (all, benchmark or paper)" >&2
        exit 2
        ;;
esac

for lane in a b; do
    if ! flock -n "$runs/.$lane.lock" true; then
        echo "lane $lane of resume.sh is still running: publish when it has stopped" >&2
        exit 1
    fi
done
if [ "$phase" != benchmark ]; then  # lane a's last step times every configuration
    for analysis in masks-per-layer layers ablation; do
        if [ ! -f "$runs/paper-100/paper/$analysis/cost.md" ]; then
            echo "$runs/paper-100/paper/$analysis/cost.md is missing: lane a compares the" \
                "paper's configurations, with their costs, once every one is done" >&2
            exit 1
        fi
    done
fi

v=$runs/validation-100/stores a=$runs/bench-500-a/stores b=$runs/bench-500-b/stores
every=(  # GradMask m = 4 (the reference) first, then the registry's order; the six
    # 500-image stores give their files 401-500
    "$a/gradmask-m4.zarr" "$v/gradmask-m1.zarr" "$v/gradmask-mheads.zarr"
    "$v/gradmask-fast.zarr" "$v/gradmask-libragrad.zarr" "$v/saliency.zarr"
    "$v/input-x-gradient.zarr" "$v/integrated-gradients.zarr" "$v/gradient-shap.zarr"
    "$v/smoothgrad.zarr" "$v/occlusion.zarr" "$v/feature-ablation.zarr" "$v/kernel-shap.zarr"
    "$v/layer-gradcam.zarr" "$v/rollout.zarr" "$a/chefer-gae.zarr" "$b/vit-reciprocam.zarr"
    "$v/vit-reciprocam-1x1.zarr" "$a/libragrad.zarr" "$v/libragrad-ixg.zarr"
    "$v/libragrad-ig.zarr" "$a/attnlrp.zarr" "$v/rise.zarr" "$b/tis.zarr" "$v/diffmask.zarr"
)
six=(
    "$a/gradmask-m4.zarr" "$a/libragrad.zarr" "$a/attnlrp.zarr" "$b/tis.zarr"
    "$b/vit-reciprocam.zarr" "$a/chefer-gae.zarr"
)
groups=notebook,pointing,adcc
if [ "$phase" = paper ]; then
    every=() six=()
fi

# every store explained and scored by every group on every image (compare would otherwise
# leave the missing images out of every row without stopping)
"$python" - "$groups" "${every[@]}" <<'EOF'
import sys

from captum_gradmask.store import open_maps

groups, stores = sys.argv[1].split(","), sys.argv[2:]
missing = []
for store in stores:
    try:
        maps = open_maps(store)
    except FileNotFoundError:
        missing.append(f"{store}: not started")
        continue
    wanted = maps.done[:] & ~maps.skipped()
    if not maps.done[:].all():
        missing.append(f"{store}: {int((~maps.done[:]).sum())} images not explained")
    for group in groups:
        scored = maps.evaluated([group])
        if (wanted & ~scored).any():
            missing.append(f"{store}: {int((wanted & ~scored).sum())} images not scored by {group}")
if missing:
    sys.exit("not finished:\n" + "\n".join(missing))
EOF

if [ "$phase" != paper ]; then
    compare=("$python" -m captum_gradmask compare --name "$groups" --time-images 5 --threads 1)
    "${compare[@]}" "${every[@]}" --out docs/benchmarks/files-401-500
    "${compare[@]}" "${six[@]}" --out docs/benchmarks/files-1-500
    echo "published: docs/benchmarks/files-401-500, docs/benchmarks/files-1-500"
fi
if [ "$phase" != benchmark ]; then
    rm -rf docs/paper
    cp -r "$runs/paper-100/paper" docs/paper
    echo "published: docs/paper"
fi
"$python" -m benchmarks.sync_docs docs/benchmarks.md docs/reproducing-the-paper.md
