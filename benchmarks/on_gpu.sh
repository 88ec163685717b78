#!/usr/bin/env bash
# The whole GPU check in one call of the device tool (the GPU machine has JAX but no Ray, Keras or TensorFlow,
# and no network): gpu.yaml's ensemble through Ray (python -m ensemble.run), then the GPU benchmark. Run from the
# repository root there, with .carry/ holding ../shared/gpu/pydeps-py312-x86_64.tar.xz and the gzipped Kaggle
# CSVs (../shared/gpu/README.md says how to make them), for example:
#     run(command="bash benchmarks/on_gpu.sh", carry=[".carry"], timeout_s=600)
# It writes under $OUT what benchmarks/records/ keeps: the device and versions, the run's command line, its
# wall time, report.json, submission.csv and log, and the benchmark's table and JSON (not the checkpoints).
# Each step has its own time limit, so that a slow one still leaves the others' results. RUN_ARGS and BENCH_ARGS
# add arguments to the two commands: a CPU machine with Python 3.12 tries the whole script at a toy size with
#     RUN_ARGS="--set train.max_epochs=1 ..." BENCH_ARGS=--quick OUT=/tmp/out bash benchmarks/on_gpu.sh
set -uo pipefail
: "${OUT:?set OUT to the folder to write into}"
RUN_LIMIT=${RUN_LIMIT:-330}
BENCH_LIMIT=${BENCH_LIMIT:-240}
work=$(mktemp -d)
mkdir -p "$work/deps" "$work/data" "$OUT/gpu-run"
tar -xJf .carry/pydeps-py312-x86_64.tar.xz -C "$work/deps"
# shellcheck disable=SC1091
. "$work/deps/pydeps/env.sh"
export PYTHONPATH="$PWD:$PYTHONPATH" RAY_DASHBOARD_STARTUP_TIMEOUT_S=600
gunzip -c .carry/train.csv.gz > "$work/data/train.csv"
gunzip -c .carry/test.csv.gz > "$work/data/test.csv"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/device.csv" 2>&1
python3 -c "import jax, keras, ray; print('jax', jax.__version__, 'keras', keras.__version__, 'ray', ray.__version__,
jax.devices())" > "$OUT/versions.txt" 2>&1

command=(python3 -m ensemble.run --config configs/gpu.yaml --data-dir "$work/data" --output-dir "$work/gpu-run"
    ${RUN_ARGS:-})
echo "${command[*]}" > "$OUT/gpu-run/command.txt"
started=$(date +%s.%N)
timeout "$RUN_LIMIT" "${command[@]}" > "$OUT/gpu-run/run.log" 2>&1
echo "exit $? after $(python3 -c "print(round($(date +%s.%N) - $started, 1))") s (command to the last file written)" \
    >> "$OUT/gpu-run/command.txt"
cp "$work/gpu-run/report.json" "$work/gpu-run/submission.csv" "$work/gpu-run/report.html" "$OUT/gpu-run/" 2>/dev/null

timeout "$BENCH_LIMIT" python3 -m benchmarks.gpu --backends jax --data-dir "$work/data" --json "$OUT/bench-gpu.json" \
    ${BENCH_ARGS:-} > "$OUT/bench-gpu.txt" 2> "$OUT/bench-gpu.log"
echo "benchmark exit $?" >> "$OUT/bench-gpu.log"
