# Sourced by the GPU scripts on a lent machine (PyTorch installed, no network): makes slimssl runnable from
# this checkout without pip reaching an index. slimssl runs from src/ as `python3 -m slimssl` ($PYTHON), so no editable
# install (whose build would ask the index for setuptools) is needed. If it does not import, the wheels
# carried in .whl/ (benchmarks/gpu_wheels.sh: what the machine's image lacks) go to a folder of their own,
# first on PYTHONPATH.
slimssl_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$slimssl_root/src${PYTHONPATH:+:$PYTHONPATH}"
slimssl() { "${PYTHON:-python3}" -m slimssl "$@"; }
# what a run needs (the command line alone imports no dependency: it answers --help without them)
slimssl_imports="import slimssl.config, slimssl.export.files, slimssl.train.loop"
if ! "${PYTHON:-python3}" -c "$slimssl_imports" 2>/dev/null && compgen -G "$slimssl_root/.whl/*.whl" >/dev/null; then
    "${PYTHON:-python3}" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/slimssl-site "$slimssl_root"/.whl/*.whl || { echo "installing the carried wheels in .whl failed"; exit 2; }
    export PYTHONPATH="/tmp/slimssl-site:$PYTHONPATH"
fi
import_error="$(mktemp)"
if ! "${PYTHON:-python3}" -c "$slimssl_imports" 2>"$import_error"; then
    tail -3 "$import_error"
    rm -f "$import_error"
    echo "slimssl does not import on this machine: run benchmarks/gpu_wheels.sh here and carry .whl"
    exit 2
fi
rm -f "$import_error"
