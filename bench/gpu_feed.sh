#!/usr/bin/env bash
# Every GPU number for the GPU-feed work in one run (docs/benchmarks.md): the scene op's batch
# sweep, MFU, eager/compiled plain loops, the op and the Ray pipeline, then the CLIP + safety
# scorers' batch sweep. Writes JSON and logs to ${OUT:-bench/results}.
#
#   OUT=/tmp/gpu bash bench/gpu_feed.sh
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# A node-local compile cache, empty at the start: the first compile is cold, every later
# one in this run (the op, the pipeline's actor) is the warm-node case.
export SKUSTUDIO_COMPILE_CACHE=${SKUSTUDIO_COMPILE_CACHE:-/tmp/skustudio-compile}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, diffusers, ray, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'ray', ray.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
timeout "${SCENE_TIMEOUT:-430}" python3 bench/gpu_scene.py --images 48 --sweep 4 8 16 32 --pipeline-images 96 --json "$OUT/gpu_scene.json" 2>&1 | tee "$OUT/gpu_scene.log" | grep -v -i 'warn'
timeout "${CLIP_TIMEOUT:-100}" python3 bench/clip_scores.py --images 256 --gpu-sweep 8 16 32 64 --json "$OUT/clip_scores.json" 2>&1 | tail -8
