#!/usr/bin/env bash
# Download the wheels of benchmarks/gpu_wheels.txt for the GPU machine (Python 3.12, x86-64) into .whl/, replacing
# what is there (two versions of one package would stop the install there). Run it where PyPI can be reached,
# before a GPU session; .whl/ is gitignored and travels with `carry: [".whl"]` (benchmarks/README.md).
# Equivalent to the workplace's shared/device/fetch-wheels.sh with this project's pins and nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${WHL_DIR:-.whl}
python=${PYTHON:-python3}
rm -rf "$dest"
mkdir -p "$dest"
mapfile -t pins < <(grep -v '^\s*#' benchmarks/gpu_wheels.txt | grep -v '^\s*$')
# pip matches each manylinux tag exactly: name every glibc level the image's (2.39) can run.
platforms=(--platform any --platform manylinux1_x86_64 --platform manylinux2014_x86_64)
for n in $(seq 17 39); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" "${pins[@]}"
count=$(find "$dest" -type f -name '*.whl' | wc -l)
if (( count != ${#pins[@]} )); then
  echo "fetch_gpu_wheels: expected ${#pins[@]} wheels, got $count in $dest" >&2
  exit 1
fi
echo "fetch_gpu_wheels: $count wheels, $(du -sh "$dest" | cut -f1) in $dest"
