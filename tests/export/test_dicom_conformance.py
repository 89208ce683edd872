"""Conformance of every kind of DICOM object octpipe writes, checked by three toolkits.

- ``dciodvfy`` (dicom3tools, the reference IOD validator; Debian package ``dicom3tools``):
  no ``Error`` line, validated as the expected IOD. Skipped when the program is absent.
- ``dcmdump`` (dcmtk): parses every file without an error and sees the same UIDs.
  Skipped when the program is absent.
- pydicom (always): references, Frame of Reference, laterality where the IOD wants it, privacy.

One exception is allowed, for the Ophthalmic Tomography files only: dicom3tools applies its
generic Multi-frame Functional Groups rules for concatenations (ConcatenationFrameOffsetNumber
and InConcatenationNumber only with a ConcatenationUID; InConcatenationTotalNumber > 1) on top
of the OPT module, which overrides them with Type 1 values 0, 1, 1 because the OPT IOD permits
no concatenation (PS3.3 C.8.17.7, C.7.6.16). No encoding satisfies both; the files follow the
standard and exactly those three dciodvfy lines are tolerated. Any other error fails.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from octpipe.export.dicom import PM_NAME, SEG_NAME, SOURCE_NAME, write_dicom_exports
from octpipe.testing.phantom_files import write_phantom_files
from tests.conftest import SMALL_SHAPE, SMALL_SPACING, small_phantom

PSEUDONYM = "vol-conformance"
THRESHOLD = 3.0
#: kind of output -> the IOD dciodvfy must recognise it as
IODS = {
    "phantom-opt": "OphthalmicTomographyImage",
    "deid-opt": "OphthalmicTomographyImage",
    "parametric-map": "ParametricMap",
    "segmentation": "Segmentation",
    "secondary-capture": "SCImage",
}
#: dciodvfy's contradiction on OPT concatenation attributes (see the module docstring)
OPT_CONCATENATION_FALSE_POSITIVES = frozenset({
    "Error - Attribute present when condition unsatisfied (which may not be present otherwise) Type 1C "
    "Conditional Element=<ConcatenationFrameOffsetNumber> Module=<MultiFrameFunctionalGroupsCommon>",
    "Error - Attribute present when condition unsatisfied (which may not be present otherwise) Type 1C "
    "Conditional Element=<InConcatenationNumber> Module=<MultiFrameFunctionalGroupsCommon>",
    "Error - Cannot be less than or equal to one since then not a Concatenation - attribute "
    "<InConcatenationTotalNumber>",
})
#: the eye of each kind: the source and its derived objects are OD, the overlays OS
EYE = {"phantom-opt": "R", "deid-opt": "R", "parametric-map": "R", "segmentation": "R", "secondary-capture": "L"}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, list[Path]]:
    """One tiny example of each kind: kind -> its files."""
    root = tmp_path_factory.mktemp("conformance")
    opt = Path(write_phantom_files(small_phantom(0, laterality="OD"), root / "phantom", formats=["dicom"])["dicom"])
    amap = np.zeros(SMALL_SHAPE, np.float32)
    amap[2, 100:130, 60:120] = 2 * THRESHOLD
    derived = write_dicom_exports(root / "pm", anomaly_map=amap, threshold=THRESHOLD, spacing_mm=SMALL_SPACING,
                                  laterality="OD", pseudonym=PSEUDONYM, source_dicom=opt)
    assert derived.kind == "parametric-map", derived.note
    by_name = {p.name: p for p in derived.paths}
    overlays = np.random.default_rng(3).integers(0, 256, size=(2, 40, 48, 3), dtype=np.uint8)
    sc = write_dicom_exports(root / "sc", anomaly_map=amap, threshold=THRESHOLD, spacing_mm=SMALL_SPACING,
                             laterality="OS", pseudonym=PSEUDONYM, overlays=overlays)
    assert sc.kind == "secondary-capture" and len(sc.paths) == 2
    return {"phantom-opt": [opt], "deid-opt": [by_name[SOURCE_NAME]], "parametric-map": [by_name[PM_NAME]],
            "segmentation": [by_name[SEG_NAME]], "secondary-capture": list(sc.paths)}


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60, check=False)


def _source(outputs: dict[str, list[Path]]) -> Dataset:
    """The de-identified source that the map and the segmentation reference."""
    return pydicom.dcmread(outputs["deid-opt"][0], stop_before_pixels=True)


# --------------------------------------------------------------------------- dciodvfy (dicom3tools)


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy not installed (Debian package dicom3tools; .ci/run installs it)")
@pytest.mark.parametrize("kind", list(IODS))
def test_dciodvfy_reports_no_error(outputs, kind):
    for path in outputs[kind]:
        result = _run("dciodvfy", path)
        lines = (result.stdout + result.stderr).splitlines()
        assert IODS[kind] in lines, f"{path.name}: not validated as {IODS[kind]}:\n" + "\n".join(lines)
        errors = [line for line in lines if line.startswith("Error")]
        if IODS[kind] == "OphthalmicTomographyImage":
            errors = [line for line in errors if line not in OPT_CONCATENATION_FALSE_POSITIVES]
        assert not errors, f"{path.name}:\n" + "\n".join(errors)


# --------------------------------------------------------------------------- dcmdump (dcmtk)


@pytest.mark.skipif(shutil.which("dcmdump") is None, reason="dcmdump not installed (Debian package dcmtk)")
@pytest.mark.parametrize("kind", list(IODS))
def test_dcmdump_parses_every_file(outputs, kind):
    for path in outputs[kind]:
        result = _run("dcmdump", "-q", path)
        assert result.returncode == 0 and not result.stderr.strip(), f"{path.name}: {result.stderr}"
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID):
            assert f"[{uid}]" in result.stdout, path.name


@pytest.mark.skipif(shutil.which("dcmdump") is None, reason="dcmdump not installed (Debian package dcmtk)")
@pytest.mark.parametrize("kind", ["parametric-map", "segmentation"])
def test_dcmdump_sees_the_references_to_the_source(outputs, kind):
    src = _source(outputs)
    dump = _run("dcmdump", "-q", "+P", "ReferencedSOPInstanceUID", "+P", "SeriesInstanceUID",
                "+P", "FrameOfReferenceUID", outputs[kind][0]).stdout
    assert f"[{src.SOPInstanceUID}]" in dump and f"[{src.FrameOfReferenceUID}]" in dump
    assert f"[{src.SeriesInstanceUID}]" in dump  # the referenced series


# --------------------------------------------------------------------------- pydicom (always)


@pytest.mark.parametrize("kind", ["parametric-map", "segmentation"])
def test_derived_objects_reference_the_source_series_and_frame_of_reference(outputs, kind):
    src = _source(outputs)
    ds = pydicom.dcmread(outputs[kind][0], stop_before_pixels=True)
    assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.SeriesInstanceUID != src.SeriesInstanceUID
    series = ds.ReferencedSeriesSequence
    assert [s.SeriesInstanceUID for s in series] == [src.SeriesInstanceUID]
    assert [r.ReferencedSOPInstanceUID for r in series[0].ReferencedInstanceSequence] == [src.SOPInstanceUID]
    assert [r.ReferencedSOPInstanceUID for r in ds.SourceImageSequence] == [src.SOPInstanceUID]
    frames = set()
    for frame in ds.PerFrameFunctionalGroupsSequence:
        (ref,) = frame.DerivationImageSequence[0].SourceImageSequence
        assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (src.SOPClassUID, src.SOPInstanceUID)
        frames.add(int(ref.ReferencedFrameNumber))
    assert frames == set(range(1, SMALL_SHAPE[0] + 1))  # one frame per source B-scan


@pytest.mark.parametrize("kind", list(IODS))
def test_laterality_is_per_image_or_frame_never_per_series(outputs, kind):
    for path in outputs[kind]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert "Laterality" not in ds, path.name  # General Series: not allowed beside image/frame laterality
        assert ds.ImageLaterality == EYE[kind], path.name
        if kind in ("phantom-opt", "deid-opt", "parametric-map"):  # enhanced multi-frame: Frame Anatomy too
            assert ds.SharedFunctionalGroupsSequence[0].FrameAnatomySequence[0].FrameLaterality == EYE[kind]
        if kind == "segmentation":  # the Segmentation IOD states the eye per segment
            modifier = ds.SegmentSequence[0].AnatomicRegionSequence[0].AnatomicRegionModifierSequence[0]
            assert (modifier.CodeValue, modifier.CodingSchemeDesignator) == ("24028007", "SCT")  # Right


@pytest.mark.parametrize("kind", ["phantom-opt", "deid-opt"])
def test_opt_files_are_one_whole_volume_not_a_concatenation(outputs, kind):
    ds = pydicom.dcmread(outputs[kind][0], stop_before_pixels=True)
    assert (ds.ConcatenationFrameOffsetNumber, ds.InConcatenationNumber, ds.InConcatenationTotalNumber) == (0, 1, 1)
    assert "ConcatenationUID" not in ds and "SOPInstanceUIDOfConcatenationSource" not in ds


@pytest.mark.parametrize("kind", list(IODS))
def test_no_patient_name_birth_date_or_device_serial(outputs, kind):
    for path in outputs[kind]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert not str(ds.get("PatientName", "") or "") and not ds.get("PatientBirthDate"), path.name
        assert ds.get("DeviceSerialNumber") == "0", path.name
