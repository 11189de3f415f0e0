#!/usr/bin/env bash
# One call of the CIFAR-10 reproduction (docs/results.md) on a lent GPU machine whose commands are limited
# to 10 minutes and whose disk is lost when the session ends. Run the same command again until it exits 0:
#
#   bash benchmarks/reproduce_gpu.sh [REPRODUCE OPTIONS]   # e.g. --recipes cifar10_r18_dspnet_byol
#
# Expects .data/cifar10.zip (copied from ../shared/data) and .whl (benchmarks/gpu_wheels.sh), both carried to
# the machine. Runs live in .runs/repro.
# First, a tiny reproduction on fake images (seconds) runs the whole path on the device (bf16, channels_last,
# kNN, probe, report): a failure there exits 5 before the real reproduction starts, not minutes into it.
# Every call leaves in $OUT (default repro-out/) the reproduction's small files, without checkpoints:
# finished runs are complete in it, so a later session continues from it when it is committed as
# docs/results/repro-results.tgz (or carried as .runs/repro-results.tgz); an unfinished run, whose checkpoint
# cannot travel, starts again.
# Environment: DEADLINE (seconds from the start of this script at which the reproduction is sent SIGTERM,
# saves and stops, default 560: it must end before the lent machine's 600-second limit kills the call, or no
# results come back), BUDGET (seconds after which no new epoch or probe starts; default: until 15 s before
# the deadline, since a run stopped early cannot be continued by a later session anyway), DEVICE (default cuda),
# PREFLIGHT=0 (skip the tiny reproduction once a session has seen the path pass on the GPU).
set -uo pipefail
deadline="${DEADLINE:-560}"
out="${OUT:-repro-out}"
mkdir -p "$out" .data .runs
if [ ! -d .data/cifar10/train ]; then
    # Python's zipfile, since a lent machine need not have unzip
    python -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" .data/cifar10.zip .data/cifar10 \
        || { echo "need .data/cifar10.zip (a zip of train/ and test/)"; exit 2; }
fi
# results of earlier sessions: carried as .runs/repro-results.tgz, or committed as docs/results/repro-results.tgz
for earlier in .runs/repro-results.tgz docs/results/repro-results.tgz; do
    if [ ! -d .runs/repro ] && [ -f "$earlier" ]; then
        tar xzf "$earlier" -C .runs && echo "continuing from $earlier"
    fi
done
. "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"  # slimssl from src/, carried wheels of what the machine lacks

if [ "${PREFLIGHT:-1}" != 0 ]; then  # the given options first: the tiny settings after them win
    preflight="$(mktemp -d)" preflight_start=$SECONDS
    if timeout 180 python -m slimssl reproduce --data fake --out "$preflight/repro" --device "${DEVICE:-cuda}" "$@" \
        --epochs 1 --batch-size 128 --probe-epochs 1 --set data.fake_size=256 data.resolution=16 model.base_width=8 \
        "model.depths=[1,1,1,1]" method.proj_hidden=32 method.proj_dim=16 method.pred_hidden=32 eval.knn_k=5 \
        eval.batch_size=64 train.compile=off >"$preflight/log" 2>&1; then  # compiling every tiny run: minutes
        echo "preflight: a tiny reproduction on fake images passed on ${DEVICE:-cuda} in $((SECONDS - preflight_start)) s"
        rm -rf "$preflight"
    else
        tail -30 "$preflight/log"
        echo "preflight failed (above): the tiny reproduction on fake images did not finish on ${DEVICE:-cuda}, so" \
             "the real one was not started (PREFLIGHT=0 skips this check)"
        exit 5
    fi
fi

# SIGTERM at the deadline: the step in flight finishes, the run saves, and the results below are still packed
left=$((deadline - SECONDS)); [ "$left" -gt 10 ] || left=10
budget="${BUDGET:-$((left > 15 ? left - 15 : 0))}"
timeout --preserve-status -s TERM -k 30 "$left" \
    python -m slimssl reproduce --data .data/cifar10 --out .runs/repro --device "${DEVICE:-cuda}" --time-budget "$budget" \
    "$@" 2> >(grep -v "step/s" | tail -40 >&2)
status=$?

tar czf "$out/repro-results.tgz" --exclude=checkpoints -C .runs repro
python - <<'PY'
import json, pathlib, statistics
for timing in sorted(pathlib.Path(".runs/repro").glob("*/*/timing.json")):
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
[ "$status" -eq 0 ] && [ -f .runs/repro/reproduction.md ] && cp .runs/repro/reproduction.md .runs/repro/*.png "$out"/ 2>/dev/null
echo "exit $status (0: done; 4, or 3 at the deadline: run this again; 5: the preflight failed)"
exit $status
