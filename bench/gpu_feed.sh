#!/usr/bin/env bash
# The GPU-feed numbers (docs/benchmarks.md) in one run: plain loops eager and compiled, the
# op compiled and eager, and the Ray pipeline twice (the first actor fills the node's compile
# cache, the second starts warm; actor start -> first image from Ray's timeline). About 9
# minutes on an H200: give it a whole call. Writes JSON and logs to ${OUT:-bench/results}.
# Diagnostics to add to SCENE_ARGS: --profile (one profiled batch per path), --cpu-load 8,
# --pipeline-concurrency 1 2 (two batches in flight per actor).
#
#   OUT=/tmp/gpu bash bench/gpu_feed.sh
#   SCENE_ARGS="--images 48 --sweep 4 8 16 32 --skip-ray" bash bench/gpu_feed.sh   # the batch sweep
#   CLIP=1 bash bench/gpu_feed.sh                                                    # + CLIP/safety sweep
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# A node-local compile cache, empty at the start: the first compile is cold. NB: on CUDA a
# graph compiled in a plain process was not found by a Ray worker (different cache key;
# bench/compile_cache.py), so the first pipeline's actor compiles once more; the second
# pipeline run (`skustudio_pipeline_again`) is the warm-node start.
export SKUSTUDIO_COMPILE_CACHE=${SKUSTUDIO_COMPILE_CACHE:-/tmp/skustudio-compile}
SCENE_ARGS=${SCENE_ARGS:---images 64 --sweep --batch 16 --skip-default --pipeline-images 160 --pipeline-concurrency 1 1}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, diffusers, ray, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'ray', ray.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
# shellcheck disable=SC2086
timeout "${SCENE_TIMEOUT:-580}" python3 bench/gpu_scene.py $SCENE_ARGS --json "$OUT/gpu_scene.json" 2>&1 | tee "$OUT/gpu_scene.log" | grep -v -i 'warn'
if [ "${CLIP:-0}" = 1 ]; then
  timeout "${CLIP_TIMEOUT:-100}" python3 bench/clip_scores.py --images 256 --gpu-sweep 8 16 32 64 --json "$OUT/clip_scores.json" 2>&1 | tail -8
fi
