#!/usr/bin/env bash
# Run HERE (a machine with PyPI), before calling a lent GPU machine: downloads into .whl/ (ignored by git)
# the wheels of slimssl's dependencies that the lent machine's image lacks, for its Python 3.12 on x86-64.
# Carry .whl with the call; benchmarks/gpu_env.sh installs them there. The image has torch, torchvision,
# numpy, pillow, pyyaml, safetensors, scikit-learn, tqdm, tensorboard and matplotlib, but not pydantic
# (the device tool's KINDS.md lists the image's packages). Versions: the ones slimssl is tested with here.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0)
rm -rf .whl && mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${wheels[@]}"
ls -l .whl
echo "carry .whl (and .data) in the device call"
