#!/usr/bin/env bash
# A CPU rehearsal of the GPU run: benchmarks/gpu_run.sh --dry-run, on the CPU, in what the GPU machine will have.
#   1. a Python 3.12 virtual environment with only the GPU image's packages (benchmarks/gpu_image.txt: torch 2.11.0
#      as the image has it, a CUDA build that runs on the CPU; grpcio and protobuf older than radserve needs), made
#      once in $REHEARSAL_VENV (default ~/.cache/radserve/gpu-image-py312; about 5 GB and a few minutes from PyPI);
#   2. the carried wheels (benchmarks/fetch_gpu_wheels.sh into .whl/, unless .whl/ already holds them);
#   3. what the device tool sends: the files git tracks or would track (untracked, not ignored) plus .whl/, copied
#      into a fresh folder (no .venv, no .site, no caches), whose size is checked against the tool's 64 MiB;
#   4. there, benchmarks/gpu_run.sh --dry-run with that Python; then the checks of what it left in $OUT: at most 6
#      small files, the table, the cuda tests collected (and skipped: no GPU), the compile step's figures.
# Output: the run's summary on stdout; the copy and $OUT stay in $REHEARSAL_DIR (printed) for a look.
#
# Usage (from the project root):  benchmarks/rehearse_gpu_image.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY312=${PY312:-$(command -v python3.12 || echo /root/.pyenv/versions/3.12.1/bin/python)}
VENV=${REHEARSAL_VENV:-$HOME/.cache/radserve/gpu-image-py312}
DIR=${REHEARSAL_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/radserve-rehearsal.XXXXXX")}
LIMIT_BYTES=$(( 64 * 1024 * 1024 ))
say() { echo "[rehearse] $*" >&2; }

# 1. The image's packages, exactly.
mapfile -t image < <(grep -v '^\s*#' benchmarks/gpu_image.txt | grep -v '^\s*$')
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  say "creating $VENV from $PY312 with ${image[*]}"
  "$PY312" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "${image[@]}"
fi
"$VENV/bin/python" - "${image[@]}" <<'EOF'
import importlib.metadata as md, importlib.util, sys
for pin in sys.argv[1:]:
    name, version = pin.split("==")
    have = md.version(name)
    assert have.split("+")[0] == version, f"{name} {have} in the rehearsal venv, {version} in benchmarks/gpu_image.txt"
radserve_only = ("monai", "pydicom", "nibabel", "highdicom", "yaml", "jsonschema", "grpc_health", "prometheus_client")
present = [m for m in radserve_only if importlib.util.find_spec(m) is not None]
assert not present, f"the rehearsal venv has what the GPU image lacks: {present}"
EOF

# 2. The carried wheels.
wanted=$(grep -cv '^\s*#\|^\s*$' benchmarks/gpu_wheels.txt)
if [[ $(find .whl -maxdepth 1 -type f -name '*.whl' 2>/dev/null | wc -l) != "$wanted" ]]; then
  benchmarks/fetch_gpu_wheels.sh
fi

# 3. What the device tool would send.
mkdir -p "$DIR/tree"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  if [[ -e $f && ! -L $f ]]; then mkdir -p "$DIR/tree/$(dirname "$f")" && cp -p "$f" "$DIR/tree/$f"; fi
done
cp -r .whl "$DIR/tree/.whl"
tree_bytes=$(du -sb --exclude=.whl "$DIR/tree" | cut -f1)
wheel_bytes=$(du -sb "$DIR/tree/.whl" | cut -f1)
say "the GPU run would send $(( (tree_bytes + wheel_bytes) / 1024 / 1024 )) MiB: tree $(( tree_bytes / 1024 / 1024 )) MiB," \
  "wheels $(( wheel_bytes / 1024 / 1024 )) MiB (the device tool's limit: 64 MiB)"
if (( tree_bytes + wheel_bytes > LIMIT_BYTES )); then
  say "over the device tool's limit"
  exit 1
fi

# 4. The dry run, there.
out="$DIR/out"
say "benchmarks/gpu_run.sh --dry-run in $DIR/tree with $("$VENV/bin/python" --version), OUT=$out"
set +e
commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!.whl' || echo "-dirty")
(cd "$DIR/tree" && env -u PYTHONPATH PYTHON="$VENV/bin/python" OUT="$out" BENCH_CACHE="$DIR/cache" \
  RADSERVE_COMMIT="$commit" benchmarks/gpu_run.sh --dry-run)
status=$?
set -e
say "gpu_run.sh --dry-run exit status $status; results in $out:"
ls -l "$out" >&2
files=$(find "$out" -type f | wc -l)
biggest=$(find "$out" -type f -printf '%s\n' | sort -n | tail -1)
checks=0
if (( files > 6 )); then say "FAIL: $files files in \$OUT, at most 6"; checks=1; fi
if (( biggest > 16 * 1024 * 1024 )); then say "FAIL: a result file of $biggest bytes (16 MiB come back at most)"; checks=1; fi
"$VENV/bin/python" - "$out" <<'EOF' || checks=1
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
report = json.loads((out / "tiny.json").read_text())
tests = report["cuda_tests"]
assert tests.get("collected", 0) > 0, f"no cuda test collected: {tests}"
assert tests["failed"] == 0, f"cuda tests failed to collect or run: {tests}"
assert set(report["workloads"]) == {"ct", "dx-256", "mr"}, sorted(report["workloads"])
assert all(r["reads_ok"] and not r["errors"] for e in report["workloads"].values() for r in e["service"])
assert report["compile"] and all("error" not in e for e in report["compile"].values()), report["compile"]
assert "memory" in report and "ingest" in report
print(f"[rehearse] checks passed: {tests['collected']} cuda tests collected (skipped without a GPU), "
      f"{len(report['workloads'])} workloads, compile figures for {sorted(report['compile'])}", file=sys.stderr)
EOF
exit $(( status || checks ))
