#!/usr/bin/env bash
# The whole GPU record in one call of the device tool, under one deadline: a preflight, configs/gpu.yaml's
# ensemble through Ray (python -m ensemble.run), then the GPU benchmark with the time left. Run from the
# repository root, with .carry/ holding ../shared/gpu/pydeps-py312-x86_64.tar.xz (Ray, Keras and the rest the
# GPU machine lacks) and the gzipped Kaggle CSVs (../shared/gpu/README.md says how to make them):
#     run(command="bash benchmarks/on_gpu.sh", carry=[".carry"], timeout_s=600)
# Without the bundle in .carry/ it runs in the Python environment it finds, and without the gzipped CSVs it
# reads DATA_DIR: tests/test_on_gpu_script.py runs it so on a CPU at a toy size.
#
# It writes at most 7 files under $OUT (the device tool brings back 8): summary.txt (the key lines, also printed
# last), report.json and submission.csv of the run, bench-gpu.json (rewritten after every row, so a benchmark
# cut short keeps what it measured), and logs.tar.gz (both commands and their output, the benchmark's table,
# report.html, nvidia-smi sampled every second, the preflight, Ray's session logs).
#
# Sizing, from the H200's one-member rate before groups (38,000 img/s): gpu.yaml's 30 epochs of 10 members are
# some 10.8 M images, 280 s of training alone, which with Ray's start, compiling and checkpoints would not fit
# its share of the call; the run trains EPOCHS (12) of them instead, and the summary says so.
# Knobs: EPOCHS, RUN_ARGS and BENCH_ARGS (more arguments for the two commands), DEADLINE (seconds for it all,
# 575 of the call's 600), RUN_LIMIT (300), PYTHON (python3), CARRY (.carry), DATA_DIR.
set -uo pipefail
: "${OUT:?set OUT to the folder to write into}"
DEADLINE=${DEADLINE:-575}
RUN_LIMIT=${RUN_LIMIT:-300}
EPOCHS=${EPOCHS:-12}
PYTHON=${PYTHON:-python3}
CARRY=${CARRY:-.carry}
started=$(date +%s)
work=$(mktemp -d)
sampler="" session=""
# However the script ends (a step's error, the tool's own limit): no sampler or step left running, no scratch.
trap 'kill $sampler 2>/dev/null; [ -n "$session" ] && pkill -KILL -s "$session" 2>/dev/null; rm -rf "$work"' EXIT
logs=$work/logs
mkdir -p "$logs" "$OUT"
summary=$OUT/summary.txt
: > "$summary"

say() { echo "$*" | tee -a "$summary"; }

seconds_left() { echo $((started + DEADLINE - $(date +%s))); }

# step NAME LIMIT COMMAND...: run COMMAND in a session of its own, its output in $logs/NAME.log, for at most
# LIMIT seconds and never past the deadline (less 15 s to pack up); then end whatever it left running (a local
# Ray's processes), by its session (kept in $session while it runs, for the exit trap).
step() {
    local name=$1 limit=$2 left began code
    shift 2
    left=$(($(seconds_left) - 15))
    ((limit > left)) && limit=$left
    if ((limit < 20)); then
        say "$name: not run, $left s left before the deadline"
        return 124
    fi
    echo "$*" >> "$logs/commands.txt"
    began=$(date +%s.%N)
    setsid timeout -k 10 "$limit" "$@" > "$logs/$name.log" 2>&1 &
    session=$!
    wait "$session"
    code=$?
    pkill -KILL -s "$session" 2>/dev/null
    session=""
    say "$name: exit $code after $(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $began}") s (limit $limit s)"
    if ((code != 0)); then  # why, in the summary: a traceback's or an error line's end
        tail -n 3 "$logs/$name.log" | cut -c1-300 | sed "s/^/  $name log: /" | tee -a "$summary"
    fi
    return "$code"
}

# The environment: the bundle unpacked onto PYTHONPATH where it was carried, and the data.
if [ -f "$CARRY/pydeps-py312-x86_64.tar.xz" ]; then
    mkdir -p "$work/deps" && tar -xJf "$CARRY/pydeps-py312-x86_64.tar.xz" -C "$work/deps"
    # shellcheck disable=SC1091
    . "$work/deps/pydeps/env.sh"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RAY_TMPDIR="$work/ray"
export RAY_DASHBOARD_STARTUP_TIMEOUT_S=600 DIGIT_ENSEMBLE_CACHE="$work/cache"
mkdir -p "$RAY_TMPDIR"
if [ -f "$CARRY/train.csv.gz" ]; then
    DATA_DIR=$work/data && mkdir -p "$DATA_DIR"
    gunzip -c "$CARRY/train.csv.gz" > "$DATA_DIR/train.csv" && gunzip -c "$CARRY/test.csv.gz" > "$DATA_DIR/test.csv"
fi
: "${DATA_DIR:?no $CARRY/train.csv.gz: set DATA_DIR to a folder holding train.csv and test.csv}"

nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw,clocks.sm --format=csv -l 1 \
    > "$logs/nvidia-smi.csv" 2>&1 &
sampler=$!

# 1. Preflight: what the machine is, and what JAX and NVML (through which Ray counts GPUs) see of it.
device=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
say "device: ${device:-none (no nvidia-smi)}"
say "machine: $(nproc) CPUs, $(free -g | awk '/Mem:/ {print $2}') GiB, /dev/shm $(df -h /dev/shm | awk 'NR==2 {print $2}')"
XLA_PYTHON_CLIENT_PREALLOCATE=false step preflight 60 "$PYTHON" -c '
import platform, jax, keras, ray
print("versions: python", platform.python_version(), "jax", jax.__version__, "keras", keras.__version__, "ray",
      ray.__version__)
print("jax devices:", jax.devices())
try:
    import pynvml
    pynvml.nvmlInit()
    print("nvml GPUs:", pynvml.nvmlDeviceGetCount())
except Exception as error:
    print("nvml GPUs: none,", type(error).__name__, error)'
grep -E "^(versions|jax devices|nvml GPUs)" "$logs/preflight.log" | tee -a "$summary"

# 2. gpu.yaml through Ray. It stops in seconds, with one line, where Ray sees no GPU on a machine that has one.
run_dir=$work/gpu-run
say "run: configs/gpu.yaml with train.max_epochs=$EPOCHS (gpu.yaml: 30) ${RUN_ARGS:-}"
# shellcheck disable=SC2086
step run "$RUN_LIMIT" "$PYTHON" -m ensemble.run --config configs/gpu.yaml --data-dir "$DATA_DIR" \
    --output-dir "$run_dir" --set "train.max_epochs=$EPOCHS" ${RUN_ARGS:-}
cp "$run_dir/report.json" "$run_dir/submission.csv" "$OUT/" 2>/dev/null
cp "$run_dir/report.html" "$logs/" 2>/dev/null
grep -E "^(error|members train|ensemble|member-[0-9]+ .*%|wrote )" "$logs/run.log" | tee -a "$summary"

# 3. The benchmark, with what time is left, once the run's processes have let go of the GPU.
for _ in $(seq 30); do
    [ -z "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null)" ] && break
    sleep 1
done
# shellcheck disable=SC2086
step bench "$(seconds_left)" "$PYTHON" -m benchmarks.gpu --backends jax --data-dir "$DATA_DIR" --json "$OUT/bench-gpu.json" \
    --only groups,settings,profile --groups 1,2,4,10 ${BENCH_ARGS:-}

# Pack up: the logs in one file, then the summary.
kill "$sampler" 2>/dev/null
grep -v "^\[benchmarks" "$logs/bench.log" > "$logs/bench-table.txt"
mkdir -p "$logs/ray-logs"
for file in "$RAY_TMPDIR"/ray/session_latest/logs/*; do  # the last megabyte of each: the tool takes 16 MiB a file
    [ -f "$file" ] && tail -c 1000000 "$file" > "$logs/ray-logs/$(basename "$file")"
done
tar -czf "$OUT/logs.tar.gz" -C "$work" logs
"$PYTHON" - "$OUT" <<'EOF' | tee -a "$summary"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
if (out / "report.json").is_file():
    report = json.loads((out / "report.json").read_text())
    ensemble = report["ensemble"]
    print(f"run: ensemble holdout {ensemble['holdout_accuracy']} {ensemble['holdout_interval']} of "
          f"{ensemble['holdout_size']} images; timings {report['timings']}")
if (out / "bench-gpu.json").is_file():
    bench = json.loads((out / "bench-gpu.json").read_text())
    print(f"bench: {len(bench['rows'])} rows, finished: {bench['finished']}")
    for row in bench["rows"]:
        ratio = "" if row["ratio"] is None else f" ({row['ratio']:.2f}x)"
        compiling = row["extra"].get("compile_seconds", "")
        print(f"  {row['name']}: {row['measured']} {row['unit']} vs {row['baseline']}{ratio} {compiling}")
EOF
say "files: $(ls "$OUT" | tr '\n' ' ')in $(($(date +%s) - started)) s"
