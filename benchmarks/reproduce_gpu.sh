#!/usr/bin/env bash
# One call of the CIFAR-10 reproduction (docs/results.md) on a lent GPU machine whose commands are limited
# to 10 minutes and whose disk is lost when the session ends. Run the same command again until it exits 0:
#
#   bash benchmarks/reproduce_gpu.sh [REPRODUCE OPTIONS]   # e.g. --recipes cifar10_r18_dspnet_byol
#
# Expects .data/cifar10.zip (copied from ../shared/data) and .whl (benchmarks/gpu_wheels.sh), both carried to
# the machine. Runs live in .runs/repro.
# Every call leaves in $OUT (default repro-out/) the reproduction's small files, without checkpoints:
# finished runs are complete in it, so a later session continues from it when it is committed as
# docs/results/repro-results.tgz (or carried as .runs/repro-results.tgz); an unfinished run, whose checkpoint
# cannot travel, starts again.
# Environment: DEADLINE (seconds from the start of this script at which the reproduction is sent SIGTERM,
# saves and stops, default 560: it must end before the lent machine's 600-second limit kills the call, or no
# results come back), BUDGET (seconds after which no new epoch or probe starts; default: until 15 s before
# the deadline, since a run stopped early cannot be continued by a later session anyway), DEVICE (default cuda).
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
echo "exit $status (0: done; 4, or 3 at the deadline: run this again)"
exit $status
