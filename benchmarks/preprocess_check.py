"""Preprocessing before and after the fused float32 resampling (docs/decisions.md, "Preprocessing memory").

``before``: MONAI's eager ``Orientation`` then ``Spacing`` with its default float64 computation (radserve's
preprocessing until this change); ``after``: :func:`inference.tasks.preprocess.preprocess` (lazy Orientation +
Spacing fused into one float32 resampling). Each variant runs in its own process on the same synthetic CT
(``--shape``, ``--spacing``): wall time and peak RSS above the process's RSS with the input volume loaded.

    python -m benchmarks.preprocess_check --shape 512x512x300 --spacing 0.7,1.0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _rss_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _one(variant: str, shape: tuple[int, int, int], spacing: tuple[float, float], device: str) -> dict:
    import numpy as np
    import torch

    from inference.io.volume import LPS_TO_RAS, Volume
    from inference.modelrepo.schema import PreprocessConfig
    from inference.tasks.preprocess import preprocess

    cfg = PreprocessConfig(spacing_mm=(1.5, 1.5, 1.5))
    rng = np.random.default_rng(0)
    voxels = rng.normal(-500, 300, size=shape).astype(np.float32)
    volume = Volume(voxels, np.diag([spacing[0], spacing[0], spacing[1], 1.0]), "CT")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _rss_mb("VmRSS")
    start = time.perf_counter()
    if variant == "before":
        from monai.data import MetaTensor
        from monai.transforms import Orientation, ScaleIntensityRange, Spacing

        image = MetaTensor(
            torch.as_tensor(volume.voxels)[None].to(device),
            affine=torch.as_tensor(LPS_TO_RAS @ volume.affine, dtype=torch.float64),
        )
        image = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(image)
        image = Spacing(pixdim=cfg.spacing_mm, mode="bilinear", padding_mode="border")(image)
        out = ScaleIntensityRange(cfg.a_min, cfg.a_max, cfg.b_min, cfg.b_max, clip=cfg.clip)(image).as_tensor()
    else:
        out = preprocess(volume, cfg, device).image
    elapsed = time.perf_counter() - start
    return {
        "variant": variant,
        "output_shape": list(out.shape[1:]),
        "time_s": round(elapsed, 3),
        "peak_above_input_mb": round(_rss_mb("VmHWM") - base, 1),
        "input_float32_mb": round(voxels.nbytes / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="512x512x300")
    parser.add_argument("--spacing", default="0.7,1.0", help="pixel,slice mm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variant", choices=["before", "after"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split("x"))
    spacing = tuple(float(v) for v in args.spacing.split(","))
    if args.variant:
        print(json.dumps(_one(args.variant, shape, spacing, args.device)))  # type: ignore[arg-type]
        return 0
    rows = []
    for _ in range(args.repeats):
        for variant in ("before", "after"):
            cmd = [sys.executable, "-m", "benchmarks.preprocess_check", "--variant", variant]
            cmd += ["--shape", args.shape, "--spacing", args.spacing, "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    for variant in ("before", "after"):
        mine = [r for r in rows if r["variant"] == variant]
        print(
            f"preprocess {variant:<6} CT {args.shape} at {args.spacing} mm -> {mine[0]['output_shape']}: "
            f"{min(r['time_s'] for r in mine):.2f} s, peak {min(r['peak_above_input_mb'] for r in mine):.0f} MB "
            f"above the {mine[0]['input_float32_mb']:.0f} MB float32 input (best of {len(mine)})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
