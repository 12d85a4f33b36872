#!/bin/bash
# The benchmark suite on one GPU host, in bounded stages (docs/benchmarks.md, "GPU"), the stages that decide
# open questions first:
#   1. MAML and MD on shapes a, b, c (is MD's step within 1.3x MAML's?);
#   2. MAML and MD on ResNet-12 (r), MD with md.group_cost_max 1.5 (the default) and 2 (fewer kernels for
#      more FLOPs: which is faster where launches cost most?);
#   3. every other method on shape a;  4. K = 50 with and without remat (MAML, MD, shape a);
#   5. bf16 compute (MAML, MD, shape b).
# Each stage writes <OUT>/<stage>.json and appends its output to <OUT>/gpu_benchmark.log (7 files in all: the
# device tool returns at most 8); a stage cut by its timeout keeps the rows it finished. Usage:
#   OUT=gpu_bench bash experiments/studies/gpu_benchmark.sh [timeout scale in percent, default 100]
set -u
OUT=${OUT:-gpu_bench}
S=${1:-100}   # time scale of the stage timeouts, percent
mkdir -p "$OUT" /tmp/gpu_bench
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PEAK=${PEAK:-66900}   # H100/H200 SXM fp32 (non-tensor-core) peak, GFLOP/s
stage() {  # stage NAME SECONDS ARGS...
  local name=$1 secs=$(( $2 * S / 100 > 0 ? $2 * S / 100 : 1 )); shift 2   # timeout 0 would mean none
  echo "== stage $name" | tee -a "$OUT/gpu_benchmark.log"
  timeout $secs python3 -m experiments.benchmark --peak_gflops=$PEAK --flops=false \
      --out_dir=/tmp/gpu_bench/$name "$@" 2>&1 | grep -v '^[IW][0-9]\{4\} ' | tee -a "$OUT/gpu_benchmark.log"
  cp /tmp/gpu_bench/$name/results.json "$OUT/$name.json" 2>/dev/null || echo "stage $name: no results" | tee -a "$OUT/gpu_benchmark.log"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
stage core 170 --methods=maml,md --shapes=a,b,c --repeats=20
stage resnet 120 --methods=maml,md --shapes=r --repeats=10
stage resnet_gcm2 80 --methods=md --shapes=r --repeats=10 --set=md.group_cost_max=2
stage others 90 --methods=metasgd,metacurvature,tnet,mtnet,warpgrad,metakfo,ecml --shapes=a --repeats=10
stage remat 50 --methods=maml --shapes=a --repeats=5 --curves=K --curve_K=50 --curve_methods=maml,md
stage bf16 40 --methods=maml,md --shapes=b --repeats=20 --set=meta.compute_dtype=bfloat16
