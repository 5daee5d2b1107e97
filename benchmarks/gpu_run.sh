#!/usr/bin/env bash
# The GPU session in one script, for one H100 or H200 (no network, one short lease): it returns figures whatever
# happens, within a time budget (default 470 s, under 8 minutes with the installs), in these steps:
#   1. wheels:    the packages the GPU image lacks, from .whl/ into .site/ (benchmarks/gpu_wheels.txt); then a
#                 preflight that imports every module the steps need and names what is missing;
#   2. cuda tests: only the tests marked cuda (modules needing packages the image lacks skip themselves), each at
#                 most 90 s (pytest-timeout);
#   3. benchmark: run.py --profile gpu (CT 512x512x300, brain MR 256x256x160, X-ray 512x512 and 2048x2048 DX,
#                 direct and naive baselines, shared memory, ingest, memory), with its own --budget-s;
#   3b. progressive: benchmarks/progressive.py, a CT 512x512x300 uploaded at 10 and 50 MB/s (its rows go into the
#                 summary, not a file of their own);
#   4. compile:   benchmarks/compile_check.py, eager vs torch.compile per model, smallest first;
#   5. summary:   benchmarks/gpu_summary.py: the table with the CUDA test counts, the progressive rows and the
#                 compile figures.
# Each step runs under its own `timeout`, in its own process group, at most its cap and what the budget leaves
# (less a reserve for the summary); whatever a step leaves running (a server) is ended with its group, and the
# step's failure is recorded, not fatal. The benchmark and the compile check rewrite their JSON after every row or
# model (and on SIGTERM), so a step cut short keeps what it measured.
#
# Results, at most 6 small files in $OUT (default runs/bench-gpu): gpu.json and gpu.md (the table for
# BENCHMARKS.md; tiny.* for a dry run), compile.json, cuda-tests.txt (pytest's report), server.log (the benchmark
# server's, its last MB) and bench.log (everything this script wrote on stderr). The study cache (668 MB for the
# gpu profile) and pytest's temporary files live outside $OUT ($BENCH_CACHE, default $TMPDIR/radserve-bench-cache).
#
# Exit status: 0 all steps passed; 1 a step failed or a read failed; 2 the preflight failed (nothing ran) or CUDA
# is missing without --dry-run; 3 CUDA is present and no cuda test ran (or all were skipped).
#
# Usage (from the project root):
#   RADSERVE_COMMIT=abc1234 benchmarks/gpu_run.sh   # on the GPU machine (its tree comes without .git)
#   benchmarks/gpu_run.sh --dry-run            # any machine, on the CPU: tiny profile, same steps (the rehearsal,
#                                              # benchmarks/rehearse_gpu_image.sh, runs it in a copy of the GPU image)
#   benchmarks/gpu_run.sh --budget-s 400       # a tighter budget
# How the GPU session calls it (device tool, wheels carried): benchmarks/README.md, "The GPU run".
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
BUDGET_S=${BUDGET_S:-}
while (($#)); do
  case $1 in
    --dry-run) dry_run=1 ;;
    --budget-s) BUDGET_S=$2; shift ;;
    *) echo "usage: $0 [--dry-run] [--budget-s S]" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z $BUDGET_S ]]; then BUDGET_S=$(( dry_run ? 900 : 470 )); fi
RESERVE_S=25     # kept for the summary (its own timeout)
KILL_GRACE_S=10  # timeout's SIGTERM -> SIGKILL grace, counted in each step's share
OUT=${OUT:-runs/bench-gpu}
BENCH_CACHE=${BENCH_CACHE:-${TMPDIR:-/tmp}/radserve-bench-cache}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/radserve-gpu-run.XXXXXX")  # pytest's junit report and temporary files
mkdir -p "$OUT"
exec 2> >(tee -a "$OUT/bench.log" >&2)
started=$(date +%s)
say() { echo "[gpu_run $(($(date +%s) - started))s] $*" >&2; }
budget_left() { echo $(( BUDGET_S - ($(date +%s) - started) )); }

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONPATH="$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

steps=()          # "name: outcome" per step, for the summary
current_group=""  # the process group of the step running now, ended if this script is
cleanup() {
  if [[ -n $current_group ]]; then kill -KILL -- "-$current_group" 2>/dev/null; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'say "stopped by a signal"; exit 1' TERM INT

# step NAME CAP_S CMD...: run CMD (stdout to $STEP_OUT, default stderr) under `timeout` in its own process group,
# for at most CAP_S and what the budget leaves; end whatever it leaves running; record its outcome in step_status.
step() {
  local name=$1 cap=$2
  shift 2
  local left=$(( $(budget_left) - RESERVE_S - KILL_GRACE_S ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 10 )); then
    say "$name: skipped, the budget of ${BUDGET_S} s is spent"
    steps+=("$name: skipped (budget spent)")
    step_status=124
    return
  fi
  say "$name (at most ${limit} s)"
  local t0
  t0=$(date +%s)
  timeout -k "$KILL_GRACE_S" "$limit" "$@" >>"${STEP_OUT:-/dev/stderr}" &
  current_group=$!  # timeout makes itself a process group leader: the group holds everything the step started
  wait "$current_group"
  step_status=$?
  kill -TERM -- "-$current_group" 2>/dev/null && sleep 2 && kill -KILL -- "-$current_group" 2>/dev/null
  current_group=""
  local outcome="exit $step_status"
  if (( step_status == 124 || step_status == 137 )); then outcome="timed out at ${limit} s"; fi
  steps+=("$name: $outcome after $(( $(date +%s) - t0 )) s")
  say "$name: $outcome"
}

# 1. Wheels and preflight (pip --no-index: nothing is downloaded here).
preflight() {
  "$PY" - <<'EOF'
import importlib, sys
missing = []
for module in ("torch", "torchvision", "numpy", "scipy", "PIL", "grpc", "google.protobuf", "yaml", "monai", "pydicom",
               "nibabel", "highdicom", "pylibjpeg", "grpc_health.v1.health", "grpc_reflection.v1alpha.reflection",
               "prometheus_client", "jsonschema", "pytest", "pytest_timeout", "inference.api.server",
               "benchmarks.run", "benchmarks.compile_check", "benchmarks.gpu_summary"):
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or the generated stubs' protobuf / grpcio version checks
        missing.append(f"{module}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
print("\n".join(missing))
sys.exit(1 if missing else 0)
EOF
}
if compgen -G ".whl/*.whl" >/dev/null; then
  step "wheels ($(ls .whl/*.whl | wc -l) from .whl/ into .site/)" 60 \
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target .site .whl/*.whl
fi
if ! missing=$(preflight 2>&1); then
  say "missing or too old on this machine:"; echo "$missing" >&2
  say "fetch their wheels into .whl/ with benchmarks/fetch_gpu_wheels.sh where PyPI is reachable, carry .whl, rerun"
  exit 2
fi
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" >&2
cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2; fi
if (( cuda == 0 && dry_run == 0 )); then
  say "CUDA is not available here: nothing to measure (benchmarks/gpu_run.sh --dry-run rehearses on the CPU)"
  exit 2
fi

# 2. The CUDA tests (on the CPU they are collected and skipped: the rehearsal checks the collection).
STEP_OUT="$OUT/cuda-tests.txt" step "cuda tests" 170 \
  "$PY" -m pytest -m cuda -q -rA -p no:cacheprovider -o addopts="" --timeout 90 --basetemp "$WORK/pytest" \
  --junitxml "$WORK/cuda-junit.xml" tests
tail -5 "$OUT/cuda-tests.txt" >&2 2>/dev/null

# 3. The benchmark.
if (( dry_run )); then
  profile=tiny
  step "benchmark (tiny profile, CPU)" 400 \
    "$PY" -m benchmarks.run --profile tiny --device cpu --out "$OUT" --cache "$BENCH_CACHE"
else
  profile=gpu
  io_threads=$(( $(nproc) / 2 )); if (( io_threads > 8 )); then io_threads=8; fi
  left=$(( $(budget_left) - RESERVE_S - KILL_GRACE_S ))
  cap=$(( left < 190 ? left : 190 ))
  # run.py stops starting rows 25 s before the step's end: time to stop the server and write the table
  step "benchmark (gpu profile, io_threads $io_threads)" "$cap" \
    "$PY" -m benchmarks.run --profile gpu --device cuda --io-threads "$io_threads" --out "$OUT" \
    --cache "$BENCH_CACHE" --budget-s $(( cap > 50 ? cap - 25 : cap / 2 ))
fi

# 3b. Progressive reading: throttled uploads, the time from the last byte to the answer (benchmarks/progressive.py).
if (( dry_run )); then
  step "progressive (CPU rehearsal)" 150 "$PY" -m benchmarks.progressive --studies ct:160x160x100 --rates 50 \
    --device cpu --cache "$BENCH_CACHE" --json "$WORK/progressive.json"
else
  left=$(( $(budget_left) - RESERVE_S - KILL_GRACE_S - 60 ))
  cap=$(( left < 120 ? left : 120 ))
  # --ct-spacing 0.7,1.0: the benchmark's CT 512x512x300, already written in the cache
  step "progressive" "$cap" "$PY" -m benchmarks.progressive --studies ct:512x512x300 --rates 10 50 \
    --ct-spacing 0.7,1.0 --device cuda --cache "$BENCH_CACHE" --json "$WORK/progressive.json"
fi

# 4. The torch.compile check (on the CPU: the smallest model at batch 2, to rehearse the step).
if (( dry_run )); then
  step "compile check (CPU rehearsal)" 300 "$PY" -m benchmarks.compile_check --device cpu --json "$OUT/compile.json" \
    --only chest_xray --max-batch 2 --timing-s 0.5
else
  left=$(( $(budget_left) - RESERVE_S - KILL_GRACE_S ))
  cap=$(( left < 100 ? left : 100 ))
  # no model starts in the last 30 s of the step (compiling one takes 20-40 s on a GPU machine)
  step "compile check" "$cap" "$PY" -m benchmarks.compile_check --device cuda --json "$OUT/compile.json" \
    --budget-s $(( cap > 60 ? cap - 30 : cap / 2 ))
fi

# 5. The summary: the table, the CUDA tests and the compile figures, in $OUT/$profile.md and .json, and on stdout.
if [[ -f "$OUT/server.log" ]] && (( $(stat -c %s "$OUT/server.log") > 1000000 )); then
  tail -c 1000000 "$OUT/server.log" >"$WORK/server.log" && mv "$WORK/server.log" "$OUT/server.log"
fi
printf '%s\n' "${steps[@]}" >"$WORK/steps.txt"
say "summary (budget ${BUDGET_S} s, $(budget_left) s left)"
timeout "$RESERVE_S" "$PY" -m benchmarks.gpu_summary --out "$OUT" --profile "$profile" --junit "$WORK/cuda-junit.xml" \
  --compile "$OUT/compile.json" --steps "$WORK/steps.txt" --cuda "$cuda" --elapsed-s $(( $(date +%s) - started )) \
  --progressive "$WORK/progressive.json"
status=$?
say "done in $(( $(date +%s) - started )) s, exit status $status; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$status"
