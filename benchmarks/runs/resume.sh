#!/usr/bin/env bash
# Start (or resume) the long benchmark runs in the background, one process per core (lanes a
# and b), each holding a lock so that running this twice starts nothing new. Each lane runs
# its commands in order; a finished command redoes nothing when run again. See README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=benchmarks/runs
python=${PYTHON:-python}  # the environment the project is installed in
lane() {  # lane NAME SCRIPT: run the bash SCRIPT under NAME's lock, output in .NAME.log
    (setsid nohup flock -n "$runs/.$1.lock" bash -ec "$2" >>"$runs/.$1.log" 2>&1 &)
}
run="$python -m benchmarks.run --threads 1 --quiet --metrics notebook,pointing,adcc --seed 0"
# the five peers of the 500-image table and GradMask m = 4: their 100-image rows come from the
# 500-image stores (compare matches images by file); libragrad-fullgrad is libragrad's alias
peers_a=gradmask-m4,libragrad,attnlrp,chefer-gae
peers_b=tis,vit-reciprocam
others=gradmask-m1,gradmask-mheads,gradmask-fast,gradmask-libragrad,saliency,input-x-gradient
others+=,integrated-gradients,gradient-shap,smoothgrad,occlusion,feature-ablation,kernel-shap
others+=,layer-gradcam,rollout,vit-reciprocam-1x1,libragrad-ixg,libragrad-ig,rise,diffmask
lane a "
$run --first-image 401 --images 100 --chunk-size 4 --methods $others --output $runs/validation-100
$run --first-image 1 --images 500 --chunk-size 10 --methods $peers_a --output $runs/bench-500-a
"
lane b "
$python -m benchmarks.paper_analyses --first-image 401 --images 100 --threads 1 --time-images 5 \
    --chunk-size 4 --quiet --output $runs/paper-100 --figures $runs/paper-100/paper
$run --first-image 1 --images 500 --chunk-size 10 --methods $peers_b --output $runs/bench-500-b
"
