#!/usr/bin/env bash
# One part of the GPU checks, on a host with its own CUDA torch and no package index (the lent
# GPU machine): installs the wheels of bench/offline_wheels.py from .whl/ (once per machine),
# then runs the part. Its log, rows and profiles go to $OUT/<part>, else bench/results/<part>
# (at most six files: the lent machine sends back eight). Each part fits one 10-minute command;
# run them in this order, the first on a fresh machine:
#
#   bash bench/gpu_host.sh qwen     # issue 20: the continuous decoder, profiled (~8 min)
#   bash bench/gpu_host.sh tests    # the GPU tests of the decoder (~2 min)
#   bash bench/gpu_host.sh schnell  # issue 22: FLUX.1-schnell, lossless and over HTTP, no fp8
#   bash bench/gpu_host.sh flux     # issue 22: FLUX.1-dev's step experiments (needs more time)
#
# Arguments after the part go to bench/gpu.py (e.g. `--device cpu --tiny` to try it here).
# A machine still warm from an earlier call keeps /tmp/site: `rm -rf /tmp/site` first if the
# wheels changed since.
set -uo pipefail
part=${1:?usage: gpu_host.sh qwen|tests|schnell|flux [bench/gpu.py options]}
shift
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null && [ ! -d /tmp/site/diffusers ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
case "$part" in
  qwen) command=(bench/gpu.py --quick --profile --only qwen-concurrency --budget-s 420) ;;
  tests) command=(-m pytest -m gpu -p no:cacheprovider tests/gpu/test_continuous_gpu.py
    "tests/gpu/test_cuda.py::test_qwen_normalises_images_on_the_gpu_as_the_cpu_would"
    tests/e2e/test_decode_layer.py) ;;
  schnell) command=(bench/gpu.py --quick --only flux-schnell --skip fp8 --budget-s 420) ;;
  flux) command=(bench/gpu.py --only flux-dev --budget-s 540) ;;
  *)
    echo "unknown part '$part': qwen, tests, schnell or flux" >&2
    exit 2 ;;
esac
out=${OUT:-bench/results}/$part
mkdir -p "$out"
[ "$part" = tests ] || command+=(--out "$out" "$@")
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  "$python" "${command[@]}"
} 2>&1 | tee "$out/run.log"
