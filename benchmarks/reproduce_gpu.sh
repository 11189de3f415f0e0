#!/usr/bin/env bash
# One call of the CIFAR-10 reproduction (docs/results.md) on a lent GPU machine whose commands are limited
# to 10 minutes and whose disk is lost when the session ends. Run the same command again until it exits 0:
#
#   bash benchmarks/reproduce_gpu.sh [REPRODUCE OPTIONS]   # e.g. --recipes cifar10_r18_dspnet_byol
#
# Expects .data/cifar10.zip (copied from ../shared/data) and .whl (benchmarks/gpu_wheels.sh), both carried to
# the machine. Runs live in $RUNS (default .runs/repro); the options take no --out or --data.
# First, a tiny reproduction on fake images (seconds) runs the whole path on the device (bf16, channels_last,
# kNN, probe, report): a failure there exits 5 before the real reproduction starts, not minutes into it.
# What comes back, in $OUT (default repro-out/), even from a call killed at the machine's limit: the log as it is
# written (repro.log, preflight.log) and repro-results.tgz, the runs' small files without checkpoints, packed
# every minute (PACK_EVERY seconds) and at the end. Finished runs are complete in it, so a later session continues from it when it
# is committed as docs/results/repro-results.tgz (or carried as .runs/repro-results.tgz); an unfinished run,
# whose checkpoint cannot travel, starts again.
# Environment: DEADLINE (whole seconds from the start of this script at which the reproduction is sent SIGTERM,
# saves and stops, default 560: it must end before the lent machine's limit kills the call; SIGKILL follows
# 10 s later), BUDGET (seconds after which no new epoch or probe starts; default: until 15 s before the
# deadline, since a run stopped early cannot be continued by a later session anyway), DEVICE (default cuda),
# PREFLIGHT=0 (skip the tiny reproduction once a session has seen the path pass on the GPU), PYTHON (python3).
set -uo pipefail
py="${PYTHON:-python3}"
deadline="${DEADLINE:-560}"
deadline="${deadline%%.*}"  # budget_left_s - 50 may have decimals
out="${OUT:-repro-out}"
runs="${RUNS:-.runs/repro}"
case "$deadline" in ''|*[!0-9]*) echo "DEADLINE must be a number of seconds, got '${DEADLINE}'"; exit 2 ;; esac
for arg in "$@"; do
    case "$arg" in --out|--out=*|--data|--data=*)
        echo "give no $arg: the runs go to \$RUNS (now $runs), the data is .data/cifar10.zip"; exit 2 ;;
    --time-budget|--time-budget=*)
        echo "give no $arg: the budget follows DEADLINE (set BUDGET to choose it)"; exit 2 ;;
    esac
done
mkdir -p "$out" .data "$(dirname "$runs")"

# unpacked again when the zip is another one than the folder came from (a fake tree left by a CPU check)
zip_size="$("$py" -c "import os, sys; print(os.path.getsize(sys.argv[1]))" .data/cifar10.zip 2>/dev/null)" \
    || { echo "need .data/cifar10.zip (a zip of train/ and test/)"; exit 2; }
if [ ! -d .data/cifar10/train ] || [ "$(cat .data/cifar10.unpacked 2>/dev/null)" != "$zip_size" ]; then
    rm -rf .data/cifar10 .data/cifar10.unpacked
    # Python's zipfile, since a lent machine need not have unzip
    "$py" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" .data/cifar10.zip .data/cifar10 \
        || { echo "could not unpack .data/cifar10.zip (a zip of train/ and test/)"; exit 2; }
    echo "$zip_size" > .data/cifar10.unpacked
fi
# results of earlier sessions: carried as .runs/repro-results.tgz, or committed as docs/results/repro-results.tgz
for earlier in .runs/repro-results.tgz docs/results/repro-results.tgz; do
    if [ ! -d "$runs" ] && [ -f "$earlier" ]; then
        tar xzf "$earlier" -C "$(dirname "$runs")" && [ -d "$runs" ] && echo "continuing from $earlier"
    fi
done
. "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"  # slimssl from src/, carried wheels of what the machine lacks

# the given options first: the tiny settings after them win. The recipe's own depths are kept (ResNet-18's, left
# unset in the recipe): the preflight opens checkpoints as the real run does
if [ "${PREFLIGHT:-1}" != 0 ]; then
    preflight="$(mktemp -d)" preflight_start=$SECONDS
    if timeout -k 10 180 "$py" -m slimssl reproduce --data fake --out "$preflight/repro" --device "${DEVICE:-cuda}" "$@" \
        --epochs 1 --batch-size 128 --probe-epochs 1 --set data.fake_size=256 data.resolution=16 model.base_width=8 \
        method.proj_hidden=32 method.proj_dim=16 method.pred_hidden=32 eval.knn_k=5 \
        eval.batch_size=64 train.compile=off >"$out/preflight.log" 2>&1; then  # compiling every tiny run: minutes
        echo "preflight: a tiny reproduction on fake images passed on ${DEVICE:-cuda} in $((SECONDS - preflight_start)) s"
        rm -rf "$preflight"
    else
        tail -30 "$out/preflight.log"
        rm -rf "$preflight"
        echo "preflight failed (above): the tiny reproduction on fake images did not finish on ${DEVICE:-cuda}, so" \
             "the real one was not started (PREFLIGHT=0 skips this check)"
        exit 5
    fi
fi

pack() {  # the runs without checkpoints (too large to come back) or TensorBoard logs, replacing the last pack
    [ -d "$runs" ] || return 0
    # written beside its name, then renamed over it: a kill mid-write leaves the last whole pack
    tar czf "$out/.repro-results.tgz.part" --exclude=checkpoints --exclude=tb -C "$(dirname "$runs")" "$(basename "$runs")"
    [ $? -le 1 ] && mv "$out/.repro-results.tgz.part" "$out/repro-results.tgz"  # 1: a file changed while read
}
# what a kill at the machine's limit still returns; stopped with its sleep, holding none of the call's output open
( trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
  while :; do sleep "${PACK_EVERY:-60}" & sleeper=$!; wait "$sleeper"; pack; done ) >/dev/null 2>&1 &
packer=$!

# The progress bars (each redraw ends in "step/s...]") are cut out of the log, not the lines they share with log
# messages. SIGTERM at the deadline: the step in flight finishes, the run saves, and the results below are still packed
left=$((deadline - SECONDS)); [ "$left" -gt 10 ] || left=10
budget="${BUDGET:-$((left > 15 ? left - 15 : 0))}"
timeout --preserve-status -s TERM -k 10 "$left" \
    "$py" -m slimssl reproduce --data .data/cifar10 --out "$runs" --device "${DEVICE:-cuda}" --time-budget "$budget" \
    "$@" 2> >(sed -u -e 's/\r/\n/g' -e 's/[^\n]*step\/s[^]\n]*\]//g' | grep --line-buffered -v '^[[:space:]]*$' \
              | tee "$out/repro.log" | tail -40 >&2)
status=$?
logger=$!  # the log's filter (bash 4.4+ sets $! to a process substitution's pid)
kill "$packer" 2>/dev/null
wait "$packer" 2>/dev/null
[ "$logger" = "$packer" ] || wait "$logger" 2>/dev/null  # its last lines reach repro.log before it is packed
pack

[ "$status" -eq 2 ] || "$py" - "$runs" <<'PY'  # exit 2 refused the call: the runs are an earlier call's
import json, pathlib, statistics, sys
for timing in sorted(pathlib.Path(sys.argv[1]).glob("*/*/timing.json")):
    t = json.loads(timing.read_text())
    results = timing.parent / "results.json"  # done once probed: a run only pretrained loses its checkpoint here
    done = results.is_file() and "linear" in json.loads(results.read_text()).get("protocols", {})
    # the progress bars are filtered out of the log above: their img/s, as metrics.jsonl logged it
    speeds = []
    for line in (timing.parent / "metrics.jsonl").read_text().splitlines() if (timing.parent / "metrics.jsonl").is_file() else []:
        try:
            speeds.append(json.loads(line)["img_per_s"])
        except (ValueError, KeyError, TypeError):
            pass
    speed = f", {statistics.median(speeds):.0f} img/s (median of {len(speeds)} logs)" if speeds else ""
    print(f"{timing.parent.parent.name}/{timing.parent.name}: step {t['step']}, pretrain {t['pretrain_seconds']:.0f} s,"
          f" probe {t['probe_seconds']:.0f} s{speed}{'' if done else ' (in progress)'}")
PY
# the report only when this call completed it (one left from an earlier call would look current)
[ "$status" -eq 0 ] && [ -f "$runs/reproduction.md" ] && cp "$runs/reproduction.md" "$runs"/*.png "$out"/ 2>/dev/null
echo "exit $status (0: done; 4, or 3 at the deadline: run this again; 5: the preflight failed)"
exit $status
