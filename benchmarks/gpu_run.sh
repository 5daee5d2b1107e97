#!/usr/bin/env bash
# The GPU benchmark in one script, for one H100 or H200 (about 6 minutes; under 10):
#   1. the packages the GPU image lacks, from .whl/ into .site/ (no network there; see "Wheels" below);
#   2. the CUDA tests (tests/benchmarks/test_gpu_pipeline.py and every other test marked cuda);
#   3. the GPU benchmark profile: CT 512x512x300 (DICOM, and shared memory) and X-ray 512x512 and 2048x2048 16-bit
#      DX at concurrency 1 and 8 (and more), the direct and naive baselines, ingest, memory, torch.compile check.
# Results: $OUT/gpu.json and $OUT/gpu.md (the table for BENCHMARKS.md), $OUT/cuda-tests.txt, $OUT/server.log.
#
# Usage (from the project root):  benchmarks/gpu_run.sh            # OUT defaults to runs/bench-gpu
#                                 benchmarks/gpu_run.sh --dry-run  # any machine, CPU: tiny profile, same steps
#
# Wheels: on a machine with network, before the GPU session (keep .whl/ out of git; it is in .gitignore):
#   ../shared/device/fetch-wheels.sh PyYAML==6.0.3 protobuf==7.36.2 grpcio==1.84.0 jsonschema==4.25.1 \
#       jsonschema-specifications referencing rpds-py attrs pyjpegls==1.5.1 prometheus-client==0.26.0
# then carry .whl/ to the GPU machine. The preflight below names whatever is still missing.
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; fi
OUT=${OUT:-runs/bench-gpu}
mkdir -p "$OUT"
started=$(date +%s)
say() { echo "[gpu_run $(($(date +%s) - started))s] $*" >&2; }

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi

# 1. Dependencies: what the image lacks comes from .whl/ (pip --no-index: nothing is downloaded here).
preflight() {
  "$PY" - <<'EOF'
import importlib, sys
missing = []
for module in ("torch", "torchvision", "numpy", "scipy", "grpc", "google.protobuf", "yaml", "monai", "pydicom",
               "nibabel", "highdicom", "grpc_health.v1.health", "grpc_reflection.v1alpha.reflection",
               "prometheus_client", "jsonschema", "pytest", "inference.api.server", "benchmarks.run"):
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or the generated stubs' protobuf / grpcio version checks
        missing.append(f"{module}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
print("\n".join(missing))
sys.exit(1 if missing else 0)
EOF
}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -d .site ]]; then export PYTHONPATH="$PWD/.site:$PYTHONPATH"; fi
if ! preflight >/dev/null 2>&1; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    say "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into .site/"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl
    export PYTHONPATH="$PWD/.site:$PYTHONPATH"
  fi
fi
if ! missing=$(preflight); then
  say "missing or too old on this machine:"; echo "$missing" >&2
  say "fetch their wheels into .whl/ on a machine with network (see the header of this script) and rerun"
  exit 2
fi
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" >&2
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2; fi

# 2. The CUDA tests (skipped, and reported as such, without a GPU).
say "CUDA tests"
set +e
timeout 150 "$PY" -m pytest -q -rs -m cuda -p no:cacheprovider -o addopts="" tests 2>&1 | tee "$OUT/cuda-tests.txt" | tail -20 >&2
tests_status=${PIPESTATUS[0]}
set -e

# 3. The benchmark.
if [[ $dry_run == 1 ]]; then
  say "dry run: the tiny profile on the CPU"
  "$PY" -m benchmarks.run --profile tiny --device cpu --out "$OUT" | tee "$OUT/table.txt"
else
  io_threads=$(( $(nproc) / 2 )); if (( io_threads > 8 )); then io_threads=8; fi
  say "GPU benchmark (io_threads $io_threads)"
  timeout 390 "$PY" -m benchmarks.run --profile gpu --device cuda --io-threads "$io_threads" --out "$OUT" \
    | tee "$OUT/table.txt"
fi
say "done: CUDA tests exit status $tests_status; results in $OUT (gpu.json / gpu.md, or tiny.* for a dry run)"
exit $(( tests_status == 5 ? 0 : tests_status ))
