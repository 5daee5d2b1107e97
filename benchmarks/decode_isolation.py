"""What decoding in a worker process costs: one DICOM series decoded in this thread and through DecodeWorkers.

    python -m benchmarks.decode_isolation --shape 512x512x300 --repeats 3

Writes a synthetic CT series (int16, explicit VR little endian) to a temporary folder, reads its bytes, then times
``read_dicom_series`` in the calling thread and ``DecodeWorkers.run`` (payload down a pipe, voxels back as raw
bytes) on the same bytes, each the best of ``--repeats``. Prints one line per variant and the ratio. RELIABILITY.md
("Cost of decode isolation") gives the figures with the machine, its load and the commit.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np

from inference.io import read_dicom_series
from inference.io.volume import Volume
from inference.io.workers import DecodeJob, DecodeWorkers
from inference.phantoms import write_dicom_series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="512x512x300", help="columns x rows x slices")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split("x"))
    rng = np.random.default_rng(0)
    volume = Volume(rng.normal(0, 200, size=shape).astype(np.float32), np.diag([0.7, 0.7, 1.0, 1.0]), "CT")
    with tempfile.TemporaryDirectory() as tmp:
        files = [p.read_bytes() for p in write_dicom_series(volume, Path(tmp))]
    payload_mb = sum(map(len, files)) / 1e6

    def best(run) -> float:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    in_thread = best(lambda: read_dicom_series(files))
    workers = DecodeWorkers(1, timeout_s=600)
    workers.start()
    try:
        job = DecodeJob("inference.io.dicom:read_dicom_series", {})
        in_worker = best(lambda: asyncio.run(workers.run(job, files)))
    finally:
        workers.close()
    print(f"DICOM {args.shape} int16 ({len(files)} files, {payload_mb:.0f} MB): thread {in_thread:.2f} s")
    print(f"DICOM {args.shape} int16 ({len(files)} files, {payload_mb:.0f} MB): worker process {in_worker:.2f} s")
    print(f"worker/thread: {in_worker / in_thread:.2f}")


if __name__ == "__main__":
    main()
