"""Write phantoms to disk in real vendor formats, with their truth and a manifest.

For a phantom named ``NAME`` in ``OUT``:

=========================  =========================================================
``OUT/NAME.vol``           Heidelberg raw export (HSF-OCT-103), linear floats, ILM/BM
``OUT/NAME.dcm``           DICOM Ophthalmic Tomography, 8-bit display domain
``OUT/NAME.nii.gz``        NIfTI, float32 display domain, affine in mm
``OUT/NAME_png/``          8-bit PNG B-scans, display domain
``OUT/NAME_truth.npz``     ``surfaces``, ``ilm``, ``bm``, ``lesion_mask``
``OUT/NAME_truth.json``    lesion list, types, healthy/diseased, geometry
``OUT/manifest.csv``       one row per phantom (written by :func:`write_cohort`)
=========================  =========================================================

The display domain is the log mapping of :mod:`octpipe.preprocess.intensity`. Only a
pseudonym (``NAME``) is written as the patient id.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from octpipe.errors import OctpipeError
from octpipe.preprocess.intensity import linear_to_display
from octpipe.testing.phantoms import Phantom

__all__ = ["PHANTOM_FORMATS", "write_phantom_files", "write_cohort", "MANIFEST_COLUMNS"]

PHANTOM_FORMATS = ("vol", "dicom", "nifti", "png")
MANIFEST_COLUMNS = ("name", "laterality", "diseased", "lesion_types", "n_lesions", "shape", "spacing_mm",
                    "vol", "dicom", "nifti", "png", "truth_npz", "truth_json")


def _check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    formats = tuple(f.strip().lower() for f in formats if f.strip())
    unknown = sorted(set(formats) - set(PHANTOM_FORMATS))
    if unknown:
        raise ValueError(f"unknown phantom format(s) {unknown}; choose from {', '.join(PHANTOM_FORMATS)}")
    return formats


def write_phantom_files(phantom: Phantom, out_dir: str | Path, *, formats: Sequence[str] = PHANTOM_FORMATS,
                        overwrite: bool = False) -> dict[str, str]:
    """Write one phantom in the requested formats plus its truth sidecars.

    Parameters
    ----------
    phantom : Phantom
        From :func:`octpipe.testing.phantoms.make_phantom`.
    out_dir : str or Path
        Folder, created when missing.
    formats : sequence of {"vol", "dicom", "nifti", "png"}
        Which files to write.
    overwrite : bool
        Replace existing files; otherwise an existing output raises OctpipeError.

    Returns
    -------
    dict
        Format name (and ``truth_npz``/``truth_json``) to the written path.
    """
    formats = _check_formats(formats)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = phantom.name
    display = linear_to_display(phantom.data)
    display_u8 = np.round(display * 255).astype(np.uint8)
    written: dict[str, str] = {}
    if "vol" in formats:
        from octpipe.io.writers.heyex_vol import write_heyex_vol

        written["vol"] = str(write_heyex_vol(
            out / f"{name}.vol", phantom.data, spacing_mm=phantom.spacing_mm, laterality=phantom.laterality,
            layers={"ILM": phantom.ilm, "BM": phantom.bm}, scan_pattern=3 if phantom.data.shape[0] > 1 else 1,
            patient_id=name, overwrite=overwrite))
    if "dicom" in formats:
        from octpipe.io.writers.dicom import write_dicom_opt

        written["dicom"] = str(write_dicom_opt(
            out / f"{name}.dcm", display_u8, spacing_mm=phantom.spacing_mm, laterality=phantom.laterality,
            patient_id=name, overwrite=overwrite))
    if "nifti" in formats:
        from octpipe.io.nifti import write_nifti

        written["nifti"] = str(write_nifti(out / f"{name}.nii.gz", display, spacing_mm=phantom.spacing_mm,
                                           overwrite=overwrite, description=f"octpipe phantom {name}"))
    if "png" in formats:
        from octpipe.io.writers.images import write_bscan_folder

        written["png"] = str(write_bscan_folder(out / f"{name}_png", display_u8, overwrite=overwrite))
    npz = out / f"{name}_truth.npz"
    js = out / f"{name}_truth.json"
    for path in (npz, js):
        if path.exists() and not overwrite:
            raise OctpipeError("output exists; pass --overwrite to replace it", path)
    tmp = out / f".{name}_truth.tmp.npz"
    np.savez_compressed(tmp, surfaces=phantom.surfaces, ilm=phantom.ilm, bm=phantom.bm,
                        lesion_mask=phantom.lesion_mask)
    os.replace(tmp, npz)
    truth = phantom.truth()
    truth["display_transform"] = "log"
    truth["files"] = {k: Path(v).name for k, v in written.items()}
    js.write_text(json.dumps(truth, indent=2))
    written["truth_npz"] = str(npz)
    written["truth_json"] = str(js)
    return written


def write_cohort(phantoms: Iterable[Phantom], out_dir: str | Path, *, formats: Sequence[str] = PHANTOM_FORMATS,
                 overwrite: bool = False, progress: bool = False) -> Path:
    """Write every phantom and a ``manifest.csv`` with one row per phantom.

    Returns
    -------
    Path
        The manifest.
    """
    formats = _check_formats(formats)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    if manifest.exists() and not overwrite:
        raise OctpipeError("holds an earlier cohort; pass --overwrite to replace it", out)
    rows = []
    items = phantoms
    if progress:
        from rich.progress import track

        items = track(list(phantoms), description="phantoms")
    for ph in items:
        files = write_phantom_files(ph, out, formats=formats, overwrite=overwrite)
        rows.append({
            "name": ph.name,
            "laterality": ph.laterality,
            "diseased": int(ph.diseased),
            "lesion_types": "+".join(ph.lesion_types),
            "n_lesions": len(ph.lesions),
            "shape": "x".join(map(str, ph.data.shape)),
            "spacing_mm": ";".join(f"{s:g}" for s in ph.spacing_mm),
            **{k: os.path.relpath(files[k], out) if k in files else "" for k in MANIFEST_COLUMNS[7:]},
        })
    tmp = out / ".manifest.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, manifest)
    return manifest
