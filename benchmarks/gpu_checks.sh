#!/usr/bin/env bash
# The GPU checks and throughput numbers of docs/benchmarks.md, in one command (an estimated 8 minutes on one H100;
# it has not run on one yet).
# Run from the repository root on a machine with one CUDA GPU and PyTorch installed (on this project's lent
# machines, carry .whl from benchmarks/gpu_wheels.sh: their image lacks pydantic):
#   bash benchmarks/gpu_checks.sh [OUT_DIR]
# Each table is printed and saved under OUT_DIR (default: $OUT, else bench-out/), with the operators that
# take the most GPU time in the ResNet-18 step (r18_cifar_ops.txt).
set -uo pipefail
out="${1:-${OUT:-bench-out}}"
mkdir -p "$out"
. "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"  # slimssl from src/, carried wheels of what the machine lacks (carry .whl)

step() { echo; echo "== $1"; }
step "environment"
"${PYTHON:-python3}" - <<'PY' | tee "$out/environment.txt"
import platform, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, python {platform.python_version()}")
print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
PY

step "GPU tests: no host sync in the step, bf16, compiled steps"
"${PYTHON:-python3}" -m pytest -q tests/test_cuda.py 2>&1 | tail -5 | tee "$out/test_cuda.txt"

bench() {  # name, then slimssl bench arguments
    local name="$1"; shift
    step "bench $name"
    echo "== $name" >>"$out/bench.log"
    slimssl bench --device cuda "$@" 2>>"$out/bench.log" | tee "$out/$name.md"
}
# at most 8 files come back from a lent machine's $OUT: one log for all benches
bench r18_cifar_eager --config cifar10_r18_dspnet_byol --steps 30 --warmup 5 --profile "$out/r18_cifar_ops.txt"
bench r18_cifar_compiled --config cifar10_r18_dspnet_byol --steps 30 --warmup 5 --set train.compile=reduce-overhead
bench r50_224_eager --config imagenet_r50_dspnet_byol --steps 10 --warmup 3 --batch-size 128
