"""`make demo-archive`: an archive in the loop, on this machine, in one command.

Starts Orthanc with its DICOMweb plugin (a temporary storage), `radserve serve` and `radserve bridge` between them,
stores a synthetic chest CT with planted nodules into Orthanc through its REST API (as a modality would), waits for
the bridge to store the AI's SR and SEG into the same study, and prints the Orthanc URL where they now sit beside
the images, with the planted nodules next to the findings read back from the archived SR. Ctrl-C stops all three.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inference.bridge.orthanc import OrthancProcess, free_port  # noqa: E402
from inference.phantoms import make_chest_ct, write_dicom_series  # noqa: E402
from inference.serverproc import ServerProcess  # noqa: E402


def series_in(dicomweb, study_uid: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for series in dicomweb.search_for_series(study_uid):
        found.setdefault(series["00080060"]["Value"][0], []).append(series["0020000E"]["Value"][0])
    return found


def sr_findings(dicomweb, study_uid: str, series_uid: str) -> list[tuple[list[float], float]]:
    """(center_mm, diameter_mm) of each finding of the archived SR: its 3-D center (TID 1411, a SCOORD3D point)
    and the diameter measured on its outline (TID 1410), matched by tracking identifier."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    (sr,) = dicomweb.retrieve_series(study_uid, series_uid)
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    found: dict[str, list] = {}
    for group in report.content.get_volumetric_roi_measurement_groups():
        if group.reference_type != codes.DCM.ReferencedSegment:
            found.setdefault(group.tracking_identifier, [None, float("nan")])[0] = list(group.roi.graphic_data[0])
    for group in report.content.get_planar_roi_measurement_groups():
        for measurement in group.get_measurements(name=codes.SCT.Diameter):
            found.setdefault(group.tracking_identifier, [None, float("nan")])[1] = float(measurement.value)
    return [(center, diameter) for center, diameter in found.values() if center is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models", help="radserve's model repository")
    parser.add_argument("--orthanc-port", type=int, default=None, help="Orthanc's HTTP port (default: a free one)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep Orthanc's storage and the state here")
    parser.add_argument("--seed", type=int, default=20261128)
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--exit", action="store_true", help="stop everything once the results are stored")
    args = parser.parse_args(argv)

    from dicomweb_client import DICOMwebClient

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="radserve-demo-archive-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"working directory: {workdir} (removed at the end unless given with --workdir)")
    orthanc = OrthancProcess(workdir / "orthanc", port=args.orthanc_port)
    server = ServerProcess(models=args.models, device="auto", log_path=workdir / "radserve.log")
    bridge: subprocess.Popen[bytes] | None = None
    try:
        orthanc.start()
        print(f"Orthanc (DICOMweb {orthanc.dicomweb_url}) is up; starting radserve (warming up its models) ...")
        server.start(timeout_s=args.timeout_s)
        with open(workdir / "bridge.log", "ab") as log:
            bridge = subprocess.Popen(
                [sys.executable, "-m", "inference.cli", "bridge", "--dicomweb", orthanc.dicomweb_url,
                 "--server", server.target, "--state", str(workdir / "bridge-state"), "--poll-s", "1",
                 "--stable-s", "3", "--metrics-port", str(free_port())],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            )  # fmt: skip

        phantom = make_chest_ct(
            np.random.default_rng(args.seed),
            shape=(192, 192, 72),
            pixel_spacing_mm=0.9,
            slice_spacing_mm=2.5,
            n_nodules=3,
            nodule_diameters_mm=(9.0, 14.0, 24.0),
        )
        files = write_dicom_series(phantom, workdir / "study")
        import pydicom

        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        orthanc.upload(files)
        print(f"stored a synthetic chest CT ({len(files)} images, {len(phantom.lesions)} planted nodules) in Orthanc")

        dicomweb = DICOMwebClient(orthanc.dicomweb_url)
        started = time.monotonic()
        while not {"SR", "SEG"} <= set(series := series_in(dicomweb, study_uid)):
            if time.monotonic() - started > args.timeout_s:
                print(f"error: no SR and SEG in the study after {args.timeout_s:.0f} s; see {workdir}/bridge.log")
                return 1
            if bridge.poll() is not None:
                print(f"error: the bridge exited with code {bridge.returncode}; see {workdir}/bridge.log")
                return 1
            time.sleep(0.5)
        print(f"the bridge stored the SR and SEG {time.monotonic() - started:.1f} s after the upload\n")

        print(f"  the study in Orthanc:   {orthanc.url}/app/explorer.html#study?uuid={orthanc.study_id(study_uid)}")
        print(f"  its series (DICOMweb):  {orthanc.dicomweb_url}/studies/{study_uid}/series")
        print("  series: " + ", ".join(f"{modality} x{len(uids)}" for modality, uids in sorted(series.items())))
        print("\n  planted nodule (LPS mm, diameter)        finding in the archived SR")
        findings = sr_findings(dicomweb, study_uid, series["SR"][0])
        for lesion in phantom.lesions:
            nearest = min(findings, key=lambda f: np.linalg.norm(np.subtract(f[0], lesion.center_mm)), default=None)
            planted = f"[{', '.join(f'{v:7.1f}' for v in lesion.center_mm)}] {lesion.diameter_mm:4.1f} mm"
            found = f"[{', '.join(f'{v:7.1f}' for v in nearest[0])}] {nearest[1]:4.1f} mm" if nearest else "(none)"
            print(f"  {planted}   {found}")
        if args.exit:
            return 0
        print("\nCtrl-C stops Orthanc, radserve and the bridge.")
        while bridge.poll() is None:
            time.sleep(1)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if bridge is not None and bridge.poll() is None:
            bridge.terminate()
            bridge.wait(60)
        server.stop()
        orthanc.stop()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
