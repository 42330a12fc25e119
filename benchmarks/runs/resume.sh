#!/usr/bin/env bash
# Start (or resume) the long benchmark runs in the background: two lanes, one process and one
# core each, share one list of units (a unit: one method's store in a run folder, or one
# configuration of the paper's analyses). Lane a takes the units in order and lane b from the
# end, so they meet wherever the work splits evenly; a unit's lock keeps the other lane off
# it, and a finished unit redoes nothing, so running this again resumes. See README.md.
#
#   bash benchmarks/runs/resume.sh            # start both lanes (logs .a.log, .b.log)
#   bash benchmarks/runs/resume.sh --lane a   # run lane a in the foreground
set -euo pipefail
script=$(realpath "$0")
cd "$(dirname "$script")/../.."
runs=benchmarks/runs
python=${PYTHON:-python}  # the environment the project is installed in

# metric batches of 16: on the 2-core AMD EPYC (AVX2) one thread runs ViT-Tiny about 25 % faster
# per image in batches of 8-16 than of 64; batch sizes change no setting a store checks
batch="--metric-perturbations-per-eval 16"
run="$python -m benchmarks.run --threads 1 --quiet --metrics notebook,pointing,adcc --seed 0 $batch"
validation="$run --first-image 401 --images 100 --chunk-size 4 --score-every 4 --output $runs/validation-100"
bench_a="$run --first-image 1 --images 500 --chunk-size 10 --score-every 10 --output $runs/bench-500-a"
bench_b="$run --first-image 1 --images 500 --chunk-size 10 --score-every 10 --output $runs/bench-500-b"
paper="$python -m benchmarks.paper_analyses --first-image 401 --images 100 --threads 1 $batch"
paper+=" --chunk-size 4 --quiet --output $runs/paper-100 --figures $runs/paper-100/paper"
# GradMask m = 4 on files 401-500 is in the 500-image store: the sweep pairs with it
paper+=" --reference-store $runs/bench-500-a/stores/gradmask-m4.zarr"

units=()  # "lock name|command", about in order of cost
# every method but the six of the 500-image table (compare takes files 401-500 from their
# stores) and libragrad-fullgrad (libragrad's alias), on files 401-500
for method in gradmask-m1 gradmask-mheads gradmask-fast gradmask-libragrad saliency \
    input-x-gradient integrated-gradients gradient-shap smoothgrad occlusion feature-ablation \
    kernel-shap layer-gradcam rollout vit-reciprocam-1x1 libragrad-ixg libragrad-ig rise \
    diffmask; do
    units+=("validation-100.$method|$validation --methods $method")
done
# GradMask m = 4 and the five peers on files 1-500 (two folders, as the runs began; the
# last two are at the end of the list)
for method in gradmask-m4 libragrad attnlrp; do
    units+=("bench-500-a.$method|$bench_a --methods $method")
done
# the paper's analyses on files 401-500, one configuration a unit (store name: --only name)
paper_configs=(
    "ablation-gradients-alone:gradients alone" "ablation-masks-alone:masks alone"
    "gradmask-m1:m=1" "gradmask-m2:m=2" "gradmask-m4-layers-first6:first 6"
    "gradmask-m4-layers-last6:last 6" "gradmask-m3:m=3" "ablation-random-masks:random masks"
    "gradmask-m4-no-clamp:no clamp" "gradmask-m4-layers-all:all"
    "gradmask-m6:m=6" "gradmask-m8:m=8" "gradmask-m12:m=12" "gradmask-m16:m=16"
    "gradmask-m24:m=24" "gradmask-m48:m=48"
)
paper_locks=()
for entry in "${paper_configs[@]}"; do
    units+=("paper-100.${entry%%:*}|$paper --only '${entry#*:}'")
    paper_locks+=("$runs/.unit.paper-100.${entry%%:*}.lock")
done
# lane b takes these first (from the end): ViT-ReciproCAM and Chefer GAE on lane b while
# lane a runs the other long units, so the 500-image stores are done first and the short
# paper configurations are left for both lanes to finish on
units+=("bench-500-a.chefer-gae|$bench_a --methods chefer-gae")
units+=("bench-500-b.vit-reciprocam|$bench_b --methods vit-reciprocam")
units+=("bench-500-b.tis|$bench_b --methods tis")

lane() {  # lane a|b: every unit once (b from the end), then lane a draws the paper's figures
    local order=("${!units[@]}") i name command code
    if [ "$1" = b ]; then
        mapfile -t order < <(printf '%s\n' "${order[@]}" | tac)
    fi
    for i in "${order[@]}"; do
        name=${units[$i]%%|*} command=${units[$i]#*|}
        code=0
        flock -n -E 75 "$runs/.unit.$name.lock" bash -c "$command" || code=$?
        case $code in
            0) echo "$(date -u +%FT%TZ) done: $name" ;;
            75) echo "$(date -u +%FT%TZ) skipped (the other lane has it): $name" ;;
            *) echo "$(date -u +%FT%TZ) FAILED ($code): $name" ;;
        esac
    done
    if [ "$1" = a ]; then  # every configuration's lock held: compare them all, with costs
        local locked=()
        for lock in "${paper_locks[@]}"; do locked+=(flock "$lock"); done
        "${locked[@]}" bash -c "$paper --time-images 5" && echo "$(date -u +%FT%TZ) done: paper"
    fi
}

if [ "${1:-}" = --lane ]; then
    lane "$2"
    exit
fi
for name in a b; do
    (setsid nohup flock -n "$runs/.$name.lock" bash "$script" --lane "$name" \
        >>"$runs/.$name.log" 2>&1 &)
done
