"""DICOM export of an anomaly map: Parametric Map + Segmentation, or Secondary Capture overlays.

:func:`write_dicom_exports` writes one of two things into ``out_dir``:

With a DICOM source whose frames match the anomaly map (OCT-NOTES.md §3.3)
    - ``source-deid.dcm``: the source, de-identified following the DICOM PS3.15 Basic
      Application Level Confidentiality Profile (see below);
    - ``anomaly-map-pm.dcm``: a highdicom Parametric Map of the float32 map (unit: ``z``,
      multiples of the model's normal RMS residual), content qualification RESEARCH;
    - ``anomaly-seg.dcm``: a binary highdicom Segmentation of ``anomaly_map >= threshold``,
      one segment "Anomaly", algorithm type AUTOMATIC (octpipe f-AnoGAN).

    The map and the segmentation reference ``source-deid.dcm`` (so the references resolve
    inside the export folder), sit in its study and share its Frame of Reference. The eye is
    written where the IODs want it, never as the General Series ``Laterality``: ``ImageLaterality``
    on both, a shared Frame Anatomy item (Eye, ``FrameLaterality``) on the map, and a Right/Left
    ``AnatomicRegionModifierSequence`` on the segment's anatomic region (Retina). Frame ``j``
    of both is frame ``j`` of the source *file*; the anomaly map is in the order
    :func:`octpipe.io.dicom.read_dicom` returns (by ``InStackPositionNumber``) and is put
    back in file order.

Otherwise (no source, a source that is not a usable DICOM volume, or one whose frames do not match)
    ``overlays-sc-0000.dcm``, ``overlays-sc-0001.dcm``, ...: one single-frame RGB Secondary
    Capture per overlay image (highdicom's ``SCImage`` is single-frame only), all in one new
    series: ``BurnedInAnnotation = YES``, ``ImageType`` DERIVED, SECONDARY, OTHER,
    ``ImageLaterality`` set (no series ``Laterality``), ``PatientID`` = the pseudonym, no name or
    birth date. No overlays: nothing is written.
    Why the Parametric Map was not written is returned in :attr:`DicomExportResult.note`.

What highdicom needs from a multi-frame source (highdicom 0.28): a ``FrameOfReferenceUID``; a
*shared* ``PlaneOrientationSequence`` (identical per-frame items are refused: "Source images
must have a shared orientation"); a *shared* ``PixelMeasuresSequence`` (``AttributeError``
without it, even with a top-level ``PixelSpacing``); and a per-frame ``PlanePositionSequence``
with distinct positions. OPT files written by :func:`octpipe.io.writers.dicom.write_dicom_opt` have all
of them. For other files the highdicom input (never the written ``source-deid.dcm``) is adapted
in memory: identical per-frame orientations or pixel measures are moved to the shared groups, a
top-level ``ImageOrientationPatient``/``PixelSpacing`` is used, and missing pixel measures are
taken from ``spacing_mm``. Each adaptation is listed in :attr:`DicomExportResult.adapted`. No
Frame of Reference, no orientation at all, or missing/duplicate plane positions cannot be
repaired honestly (the geometry would be invented): the export falls back to overlays.

De-identification (PS3.15 Annex E, Basic Profile; no retention options)
    - ``PatientID`` := the pseudonym; patient name, birth date, sex, accession number, study id,
      referring physician and every other person name (PN) are emptied; other patient, physician,
      operator, institution, station, description and comment attributes are removed, at every
      depth; all private attributes and overlay/curve groups (``60xx``) are removed;
    - every date, time and date-time is emptied (Type 1 ones: ``ContentDate``/``ContentTime``,
      ``AcquisitionDateTime`` and the frame date-times become a fixed dummy, 1900-01-01);
      ``LongitudinalTemporalInformationModified = REMOVED``;
    - ``DeviceSerialNumber`` := ``"0"``; ``DeviceUID`` removed; ``Manufacturer`` and model are kept;
    - every instance UID (study, series, SOP instance, frame of reference, dimension
      organisation, references) := ``generate_uid(entropy_srcs=["octpipe-deid", pseudonym, uid])``,
      so a re-export gives the same UIDs and references inside the file stay consistent. UIDs of
      the DICOM standard (``1.2.840.10008.*``: SOP classes, transfer syntaxes, coding schemes) and
      coding-scheme/class UIDs are kept;
    - ``PatientIdentityRemoved = YES``, ``DeidentificationMethod`` and
      ``DeidentificationMethodCodeSequence`` = (113100, DCM, "Basic Application Confidentiality
      Profile"); the file meta information is rebuilt.

    Pixel data are copied unchanged: burned-in text in the source pixels is not detected (OCT
    B-scans normally carry none; the Clean Pixel Data option is not claimed).

Every output carries ``Manufacturer = "octpipe"`` and ``DeviceSerialNumber = "0"``; the UIDs of
the Parametric Map, Segmentation and Secondary Captures are derived from the pseudonym and a hash
of the written content, so identical re-exports keep their UIDs and different content gets new ones.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.uid import UID, generate_uid
from pydicom.valuerep import DS

import octpipe
from octpipe.errors import OctpipeError
from octpipe.io._common import BoundedReader, atomic_output, check_writable
from octpipe.io.dicom import _frame_order, read_dicom

__all__ = ["DicomExportResult", "write_dicom_exports", "deidentify", "PM_NAME", "SEG_NAME", "SOURCE_NAME",
           "SC_PATTERN"]

logger = logging.getLogger(__name__)

#: File names inside ``out_dir``.
SOURCE_NAME = "source-deid.dcm"
PM_NAME = "anomaly-map-pm.dcm"
SEG_NAME = "anomaly-seg.dcm"
SC_PATTERN = "overlays-sc-{:04d}.dcm"

_MANUFACTURER = "octpipe"
_MODEL = "octpipe f-AnoGAN"
_SERIAL = "0"
_LATERALITY_TO_DICOM = {"OD": "R", "OS": "L"}
_UNIT_Z = hd.sr.CodedConcept("{z}", "UCUM", "z (multiples of normal RMS residual)")
_RESEARCH_NOTE = "octpipe research output, not for diagnostic use"

#: Basic Profile attributes emptied (Z) rather than removed: Type 1/2 in most image IODs.
_DEID_EMPTY = frozenset({
    "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "ReferringPhysicianName",
})
#: Basic Profile attributes removed (X), at any depth.
_DEID_REMOVE = frozenset({
    "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence", "PatientBirthName", "PatientMotherBirthName", "PatientAddress",
    "PatientTelephoneNumbers", "PatientTelecomInformation", "PatientBirthTime", "PatientAge", "PatientSize",
    "PatientWeight", "EthnicGroup", "Occupation", "MilitaryRank", "BranchOfService", "MedicalRecordLocator",
    "CountryOfResidence", "RegionOfResidence", "PatientReligiousPreference", "AdditionalPatientHistory",
    "PatientComments", "ResponsiblePerson", "ResponsibleOrganization", "PatientInsurancePlanCodeSequence",
    "MedicalAlerts", "Allergies", "SmokingStatus", "PregnancyStatus", "LastMenstrualDate", "AdmissionID",
    "IssuerOfAdmissionIDSequence", "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence",
    "PatientState", "SpecialNeeds", "CurrentPatientLocation", "PatientInstitutionResidence",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionCodeSequence",
    "InstitutionalDepartmentTypeCodeSequence", "StationName", "DeviceUID", "DetectorID",
    "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence", "PerformingPhysicianName",
    "PerformingPhysicianIdentificationSequence", "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence", "OperatorsName", "OperatorIdentificationSequence",
    "RequestingPhysician", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianName", "RequestingService",
    "ReferencedPatientSequence", "ReferencedStudySequence", "ReferencedPatientAliasSequence",
    "RequestAttributesSequence", "StudyDescription", "SeriesDescription", "ImageComments",
    "AcquisitionComments", "DerivationDescription", "ProtocolName", "PerformedProcedureStepID",
    "PerformedProcedureStepDescription", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime", "RequestedProcedureDescription",
    "RequestedProcedureID", "ScheduledProcedureStepID", "ScheduledProcedureStepDescription", "ReasonForStudy",
    "ReasonForTheRequestedProcedure", "RequestedContrastAgent", "StudyComments", "VisitComments",
    "ServiceEpisodeID", "ServiceEpisodeDescription", "IssuerOfServiceEpisodeIDSequence",
    "FillerOrderNumberImagingServiceRequest",
    "PlacerOrderNumberImagingServiceRequest", "OrderEnteredBy", "OrderEntererLocation", "OrderCallbackPhoneNumber",
    "ContentCreatorName", "ContentCreatorIdentificationCodeSequence", "VerifyingObserverName",
    "VerifyingObserverSequence", "PersonName", "PersonAddress", "PersonTelephoneNumbers", "TextComments",
    "TextString", "FrameComments", "DigitalSignaturesSequence",
    "SourceApplicationEntityTitle", "ClinicalTrialSponsorName", "ClinicalTrialProtocolName",
    "ClinicalTrialSiteName", "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
    "ClinicalTrialTimePointDescription", "ClinicalTrialCoordinatingCenterName",
    "ClinicalTrialProtocolEthicsCommitteeName", "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
})
#: Type 1 date/time attributes of enhanced/OPT images: replaced by a dummy instead of emptied.
_DEID_DUMMY_DATES = {
    "ContentDate": "19000101", "ContentTime": "000000", "AcquisitionDateTime": "19000101000000",
    "FrameAcquisitionDateTime": "19000101000000", "FrameReferenceDateTime": "19000101000000",
}
#: UI attributes that name classes or schemes, never instances: kept as they are.
_KEEP_UID_KEYWORDS = frozenset({
    "TransferSyntaxUID", "ImplementationClassUID", "CodingSchemeUID", "ContextUID", "MappingResourceUID",
    "PrivateInformationCreatorUID", "ContextGroupExtensionCreatorUID", "RelatedGeneralSOPClassUID",
    "OriginalSpecializedSOPClassUID",
})


@dataclass(frozen=True)
class DicomExportResult:
    """What :func:`write_dicom_exports` wrote, and why.

    Attributes
    ----------
    paths : tuple of Path
        The files written, in order (empty when nothing was written).
    kind : {"parametric-map", "secondary-capture", "none"}
        ``"parametric-map"``: ``source-deid.dcm``, ``anomaly-map-pm.dcm`` and ``anomaly-seg.dcm``;
        ``"secondary-capture"``: the overlays; ``"none"``: nothing (no usable source, no overlays).
    note : str
        One line saying why the Parametric Map and Segmentation were not written, e.g.
        ``"source DICOM not used: not a DICOM file (...)"``; ``""`` when they were, or when no
        source was given. It never holds the source's file name (which can identify the patient).
    adapted : tuple of str
        Changes made in memory to the de-identified source so that highdicom accepts it (see the
        module docstring); empty for octpipe's own OPT files.
    """

    paths: tuple[Path, ...] = ()
    kind: Literal["parametric-map", "secondary-capture", "none"] = "none"
    note: str = ""
    adapted: tuple[str, ...] = ()


class _Fallback(Exception):
    """The source cannot carry a Parametric Map; the message is the one-line reason."""


def write_dicom_exports(
    out_dir: str | Path,
    *,
    anomaly_map: npt.NDArray[np.floating],
    threshold: float,
    spacing_mm: tuple[float, float, float],
    laterality: str | None,
    pseudonym: str,
    source_dicom: str | Path | None = None,
    overlays: npt.NDArray[np.uint8] | None = None,
    series_description: str = "octpipe f-AnoGAN anomaly map",
    software_version: str = octpipe.__version__,
    overwrite: bool = False,
) -> DicomExportResult:
    """Write an anomaly map as DICOM: Parametric Map + Segmentation on the source, or SC overlays.

    See the module docstring for the files, the de-identification and what highdicom needs.

    Parameters
    ----------
    out_dir : str or Path
        Output folder, created when missing.
    anomaly_map : ndarray of float, shape (n_bscans, n_axial, n_ascans)
        Calibrated anomaly in ``z`` (multiples of the model's normal RMS residual), 0 outside
        the retina, in the source geometry and in :func:`~octpipe.io.dicom.read_dicom` frame
        order. Stored as float32; must be finite.
    threshold : float
        Anomaly threshold in ``z`` (> 0): the Segmentation marks ``anomaly_map >= threshold``;
        the display window of the Parametric Map is ``[0, 2 * threshold]``.
    spacing_mm : tuple of 3 floats
        (between B-scans, axial, lateral) in mm. Used for the Secondary Capture pixel spacing
        (when an overlay has the map's B-scan size) and for a source without pixel measures.
    laterality : {"OD", "OS"} or None
        Written on every output (see the module docstring for where); None takes the source's
        laterality, if any. A source that states the other eye is not used (fallback).
    pseudonym : str
        Stored as ``PatientID`` (at most 64 characters, no backslash) and mixed into every
        derived UID. Never pass a real patient identifier.
    source_dicom : str or Path, optional
        The DICOM file ``anomaly_map`` was computed from. Without one, or when it cannot carry
        the map, the overlays are written instead (never an exception).
    overlays : ndarray of uint8, shape (n, h, w, 3), optional
        RGB overlay images (e.g. one per B-scan, in volume order) for the Secondary Capture fallback.
    series_description : str
        ``SeriesDescription`` of the map (the Segmentation and the overlays get a suffix).
    software_version : str
        ``SoftwareVersions`` and algorithm version of the outputs.
    overwrite : bool
        Replace existing output files; otherwise an existing target raises before anything is written.

    Returns
    -------
    DicomExportResult
        The files written, which kind, and the one-line reason for a fallback.

    Raises
    ------
    ValueError
        ``anomaly_map``, ``threshold``, ``spacing_mm``, ``laterality``, ``pseudonym`` or
        ``overlays`` is malformed (a caller error, unlike a bad source file).
    OctpipeError
        An output file exists and ``overwrite`` is false.

    Examples
    --------
    >>> import tempfile
    >>> m = np.zeros((2, 16, 8), np.float32)
    >>> res = write_dicom_exports(tempfile.mkdtemp(), anomaly_map=m, threshold=3.0,
    ...                           spacing_mm=(0.1, 0.004, 0.01), laterality="OD", pseudonym="vol-1",
    ...                           overlays=np.zeros((2, 16, 8, 3), np.uint8))
    >>> res.kind, [p.name for p in res.paths]
    ('secondary-capture', ['overlays-sc-0000.dcm', 'overlays-sc-0001.dcm'])
    """
    amap = _check_map(anomaly_map)
    threshold = float(threshold)
    if not np.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"threshold must be a finite number > 0 (in z), got {threshold}")
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or not all(np.isfinite(s) for s in spacing) or spacing[0] < 0 or min(spacing[1:]) <= 0:
        raise ValueError(f"spacing_mm must be 3 finite values (>= 0, > 0, > 0) in mm, got {spacing_mm}")
    if laterality is not None and laterality not in _LATERALITY_TO_DICOM:
        raise ValueError(f"laterality must be 'OD', 'OS' or None, got {laterality!r}")
    if not isinstance(pseudonym, str) or not pseudonym or len(pseudonym) > 64 or "\\" in pseudonym:
        raise ValueError(f"pseudonym must be a non-empty string of at most 64 characters without '\\', "
                         f"got {pseudonym!r}")
    if overlays is not None:
        overlays = _check_overlays(overlays)
    out_dir = Path(out_dir)

    note = ""
    if source_dicom is not None:
        try:
            files, adapted = _parametric_exports(
                Path(source_dicom), amap, threshold=threshold, spacing=spacing, laterality=laterality,
                pseudonym=pseudonym, series_description=series_description, software_version=software_version)
        except _Fallback as exc:
            note = f"source DICOM not used: {exc}"  # no file name: names of clinical files can identify
            logger.warning("DICOM export of %s falls back to Secondary Capture: %s", pseudonym, note)
        else:
            paths = _write_all(out_dir, files, overwrite=overwrite)
            return DicomExportResult(paths=paths, kind="parametric-map", adapted=adapted)

    if overlays is None:
        return DicomExportResult(kind="none", note=note)
    files = _secondary_captures(overlays, spacing=spacing, map_shape=amap.shape, laterality=laterality,
                                pseudonym=pseudonym, series_description=series_description,
                                software_version=software_version)
    return DicomExportResult(paths=_write_all(out_dir, files, overwrite=overwrite), kind="secondary-capture",
                             note=note)


# --------------------------------------------------------------------------- checks and writing


def _check_map(anomaly_map: object) -> npt.NDArray[np.float32]:
    if not isinstance(anomaly_map, np.ndarray) or anomaly_map.dtype.kind not in "fiu":
        got = getattr(anomaly_map, "dtype", type(anomaly_map))
        raise ValueError(f"anomaly_map must be a real-valued ndarray, got {got}")
    if anomaly_map.ndim != 3 or min(anomaly_map.shape) < 1:
        raise ValueError(f"anomaly_map must be 3-D (n_bscans, n_axial, n_ascans), non-empty; got {anomaly_map.shape}")
    amap = np.ascontiguousarray(anomaly_map, dtype=np.float32)  # a copy when the input is not float32
    if not np.isfinite(amap).all():
        raise ValueError("anomaly_map must be finite (no NaN or inf; use 0 outside the retina)")
    return amap


def _check_overlays(overlays: object) -> npt.NDArray[np.uint8]:
    if not isinstance(overlays, np.ndarray) or overlays.dtype != np.uint8:
        raise ValueError(f"overlays must be a uint8 ndarray, got {getattr(overlays, 'dtype', type(overlays))}")
    if overlays.ndim != 4 or overlays.shape[3] != 3 or min(overlays.shape) < 1:
        raise ValueError(f"overlays must have shape (n, h, w, 3), got {overlays.shape}")
    return overlays


def _write_all(out_dir: Path, files: list[tuple[str, Dataset]], *, overwrite: bool) -> tuple[Path, ...]:
    """Write ``(name, dataset)`` pairs, each atomically; refuse before writing if one exists."""
    targets = [check_writable(out_dir / name, overwrite=overwrite) for name, _ in files]
    for target, (_, ds) in zip(targets, files, strict=True):
        with atomic_output(target) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
    return tuple(targets)


def _uid(*parts: object) -> UID:
    """A UID derived from ``parts`` (pydicom's root, SHA-512 of the parts)."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _content_hash(*arrays: npt.NDArray[np.generic], extra: tuple[object, ...] = ()) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(repr(extra).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- Parametric Map + SEG


def _read_source(path: Path, shape: tuple[int, ...], laterality: str | None) -> tuple[Dataset, str | None]:
    """The source data set and its eye, after checking it can carry a map of ``shape``; _Fallback otherwise."""
    try:
        vol = read_dicom(path)  # validates the header and the pixel data, one-line errors
    except OctpipeError as exc:
        raise _Fallback(exc.reason) from exc
    except OSError as exc:
        raise _Fallback(f"cannot read the file ({type(exc).__name__}: {exc.strerror or exc})") from exc
    if vol.shape != shape:
        raise _Fallback(f"source frames {vol.shape} do not match the anomaly map {shape}")
    if laterality is not None and vol.laterality is not None and vol.laterality != laterality:
        raise _Fallback(f"source laterality {vol.laterality} does not match {laterality}")
    with BoundedReader(path) as fh:
        ds = pydicom.dcmread(fh)
    ds.decode()  # decode every text value now, not lazily later
    if "FrameOfReferenceUID" not in ds or not ds.FrameOfReferenceUID:
        raise _Fallback("source has no FrameOfReferenceUID (highdicom needs one for a multi-frame source)")
    return ds, laterality or vol.laterality


def _parametric_exports(
    path: Path, amap: npt.NDArray[np.float32], *, threshold: float, spacing: tuple[float, float, float],
    laterality: str | None, pseudonym: str, series_description: str, software_version: str,
) -> tuple[list[tuple[str, Dataset]], tuple[str, ...]]:
    """The three data sets of the Parametric Map path, in memory; _Fallback when the source cannot carry them."""
    try:
        src, laterality = _read_source(path, amap.shape, laterality)
        original_sop = str(src.SOPInstanceUID)
        deid = deidentify(src, pseudonym=pseudonym)
        geometry, adapted = _highdicom_source(deid, spacing)
        frames = list(geometry.PerFrameFunctionalGroupsSequence)
        order = _frame_order(frames)  # volume index -> file frame index
        file_map = np.empty_like(amap)
        file_map[order] = amap
        key = _content_hash(amap, extra=(threshold, software_version, series_description))
        pm = _parametric_map(geometry, file_map, threshold=threshold, laterality=laterality,
                             series_description=series_description, software_version=software_version,
                             uids=(_uid("octpipe-pm-series", pseudonym, original_sop, key),
                                   _uid("octpipe-pm", pseudonym, original_sop, key)))
        seg = _segmentation(geometry, file_map >= np.float32(threshold), threshold=threshold, laterality=laterality,
                            series_description=series_description, software_version=software_version,
                            uids=(_uid("octpipe-seg-series", pseudonym, original_sop, key),
                                  _uid("octpipe-seg", pseudonym, original_sop, key)))
    except _Fallback:
        raise
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError,
            NotImplementedError, OverflowError, struct.error) as exc:
        text = str(exc).strip().splitlines()
        raise _Fallback(f"cannot build the DICOM map on this source ({type(exc).__name__}: "
                        f"{text[0][:200] if text else ''})") from exc
    return [(SOURCE_NAME, deid), (PM_NAME, pm), (SEG_NAME, seg)], adapted


def _highdicom_source(deid: Dataset, spacing: tuple[float, float, float]) -> tuple[Dataset, tuple[str, ...]]:
    """A copy of ``deid`` with the geometry highdicom needs (see the module docstring); _Fallback if impossible."""
    ds = copy.deepcopy(deid)
    ds.pop("PixelData", None)  # highdicom reads only the header; no need to carry the pixels around
    adapted: list[str] = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if not isinstance(per_frame, Sequence) or len(per_frame) != n_frames:
        raise _Fallback("source has no per-frame functional groups for each frame (not an enhanced multi-frame image)")
    if "SharedFunctionalGroupsSequence" not in ds or len(ds.SharedFunctionalGroupsSequence) == 0:
        ds.SharedFunctionalGroupsSequence = Sequence([Dataset()])
        adapted.append("added an empty SharedFunctionalGroupsSequence")
    shared = ds.SharedFunctionalGroupsSequence[0]

    def to_shared(keyword: str, top_level: Callable[[], Dataset | None]) -> bool:
        if len(shared.get(keyword) or ()) > 0:
            return True
        items = [f.get(keyword) for f in per_frame]
        if all(isinstance(s, Sequence) and len(s) > 0 for s in items):
            if all(s[0] == items[0][0] for s in items):  # type: ignore[index]
                setattr(shared, keyword, copy.deepcopy(per_frame[0][keyword].value))
                for f in per_frame:
                    delattr(f, keyword)
                adapted.append(f"moved the identical per-frame {keyword} to the shared functional groups")
                return True
            raise _Fallback(f"frames have different {keyword} items (highdicom needs one shared item)")
        item = top_level()
        if item is not None:
            setattr(shared, keyword, Sequence([item]))
            return True
        return False

    def orientation_from_top() -> Dataset | None:
        iop = ds.get("ImageOrientationPatient")
        if iop is None or len(iop) != 6:
            return None
        item = Dataset()
        item.ImageOrientationPatient = list(iop)
        adapted.append("built the shared PlaneOrientationSequence from the top-level ImageOrientationPatient")
        return item

    def measures_from_top() -> Dataset | None:
        item = Dataset()
        if ds.get("PixelSpacing") is not None and len(ds.PixelSpacing) == 2:
            item.PixelSpacing = list(ds.PixelSpacing)
            item.SliceThickness = ds.get("SliceThickness") or DS(spacing[0], auto_format=True)
            adapted.append("built the shared PixelMeasuresSequence from the top-level PixelSpacing")
        else:
            item.PixelSpacing = [DS(spacing[1], auto_format=True), DS(spacing[2], auto_format=True)]
            item.SliceThickness = DS(spacing[0], auto_format=True)
            adapted.append("built the shared PixelMeasuresSequence from spacing_mm (the source has none)")
        return item

    if not to_shared("PlaneOrientationSequence", orientation_from_top):
        raise _Fallback("source has no ImageOrientationPatient (no PlaneOrientationSequence)")
    to_shared("PixelMeasuresSequence", measures_from_top)

    positions = []
    for frame in per_frame:
        seq = frame.get("PlanePositionSequence")
        ipp = seq[0].get("ImagePositionPatient") if isinstance(seq, Sequence) and len(seq) > 0 else None
        if ipp is None or len(ipp) != 3:
            raise _Fallback("a frame has no PlanePositionSequence/ImagePositionPatient (highdicom needs one per frame)")
        positions.append(tuple(float(v) for v in ipp))
    if len(set(positions)) != len(positions):
        raise _Fallback("frames share the same ImagePositionPatient (highdicom needs distinct plane positions)")
    return ds, tuple(adapted)


def _equipment() -> dict[str, object]:
    return {"manufacturer": _MANUFACTURER, "manufacturer_model_name": _MODEL, "device_serial_number": _SERIAL}


def _finish(ds: Dataset, *, laterality: str | None, series_description: str) -> None:
    """Attributes highdicom does not set: image laterality, description, research note."""
    if laterality is not None:
        ds.ImageLaterality = _LATERALITY_TO_DICOM[laterality]
    ds.SeriesDescription = series_description[:64]
    ds.ImageComments = _RESEARCH_NOTE


def _parametric_map(
    source: Dataset, file_map: npt.NDArray[np.float32], *, threshold: float, laterality: str | None,
    series_description: str, software_version: str, uids: tuple[UID, UID],
) -> hd.pm.ParametricMap:
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="ANOMALY_Z",
        lut_explanation="anomaly in z: multiples of the model's normal RMS residual",
        unit=_UNIT_Z,
        value_range=(float(file_map.min()), float(file_map.max())),
        slope=1.0,
        intercept=0.0,
    )
    pm = hd.pm.ParametricMap(
        [source], file_map, uids[0], 101, uids[1], 1,
        software_versions=software_version,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=threshold, window_width=2 * threshold,
                                                         window_explanation="0 to 2x threshold (z)")],
        content_label="ANOMALY",
        content_description="f-AnoGAN anomaly map (z); research use only",
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        **_equipment(),
    )
    _finish(pm, laterality=laterality, series_description=series_description)
    if laterality is not None:
        pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = Sequence([_frame_anatomy(laterality)])
    return pm


def _frame_anatomy(laterality: str) -> Dataset:
    """A Frame Anatomy item: the eye and its ``FrameLaterality``, as in the OPT source."""
    item = Dataset()
    item.AnatomicRegionSequence = Sequence([hd.sr.CodedConcept.from_code(codes.SCT.Eye)])
    item.FrameLaterality = _LATERALITY_TO_DICOM[laterality]
    return item


def _segmentation(
    source: Dataset, mask: npt.NDArray[np.bool_], *, threshold: float, laterality: str | None,
    series_description: str, software_version: str, uids: tuple[UID, UID],
) -> hd.seg.Segmentation:
    algorithm = hd.AlgorithmIdentificationSequence(
        name="octpipe f-AnoGAN", family=codes.DCM.ArtificialIntelligence, version=software_version,
        source="octpipe", parameters={"threshold_z": f"{threshold:g}"},
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Anomaly",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=[codes.SCT.Retina],
    )
    if laterality is not None:  # the Segmentation IOD states the eye per segment
        side = codes.SCT.Right if laterality == "OD" else codes.SCT.Left
        segment.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = Sequence(
            [hd.sr.CodedConcept.from_code(side)])
    seg = hd.seg.Segmentation(
        [source], mask, hd.seg.SegmentationTypeValues.BINARY, [segment], uids[0], 102, uids[1], 1,
        software_versions=software_version,
        omit_empty_frames=False,  # one frame per B-scan, also for a healthy eye with no anomaly
        content_label="ANOMALY",
        content_description=f"anomaly >= {threshold:g} z; research use only"[:64],
        **_equipment(),
    )
    _finish(seg, laterality=laterality, series_description=f"{series_description} >= {threshold:g} z")
    return seg


# --------------------------------------------------------------------------- de-identification


def deidentify(ds: Dataset, *, pseudonym: str) -> Dataset:
    """A de-identified copy of ``ds`` (PS3.15 Basic Profile, see the module docstring).

    Parameters
    ----------
    ds : pydicom.Dataset
        The source data set (not modified).
    pseudonym : str
        New ``PatientID``; also mixed into every replacement UID.

    Returns
    -------
    pydicom.Dataset
        The copy, with rebuilt file meta information.

    Examples
    --------
    >>> import tempfile
    >>> from octpipe.io.writers.dicom import write_dicom_opt
    >>> p = write_dicom_opt(tempfile.mkdtemp() + "/v.dcm", np.zeros((2, 8, 8), np.uint8),
    ...                     spacing_mm=(0.1, 0.004, 0.01), laterality="OD", patient_id="MRN-1")
    >>> src = pydicom.dcmread(p)
    >>> out = deidentify(src, pseudonym="vol-1")
    >>> out.PatientID, out.PatientIdentityRemoved, out.SOPInstanceUID != src.SOPInstanceUID
    ('vol-1', 'YES', True)
    """
    out = copy.deepcopy(ds)
    out.remove_private_tags()
    for elem in list(out):
        if 0x6000 <= elem.tag.group <= 0x60FF or 0x5000 <= elem.tag.group <= 0x50FF:  # overlays, curves
            del out[elem.tag]

    def clean(dataset: Dataset) -> None:
        for elem in list(dataset):
            keyword = elem.keyword
            if keyword in _DEID_REMOVE:
                del dataset[elem.tag]
            elif elem.VR == "SQ":
                for item in elem.value:
                    clean(item)
            elif keyword in _DEID_EMPTY or elem.VR == "PN":
                elem.value = None
            elif keyword in _DEID_DUMMY_DATES:
                elem.value = _DEID_DUMMY_DATES[keyword]
            elif elem.VR in ("DA", "TM", "DT"):
                elem.value = None
            elif keyword == "DeviceSerialNumber":
                elem.value = _SERIAL
            elif elem.VR == "UI" and elem.value:
                elem.value = _replace_uids(elem.value, keyword, pseudonym)

    clean(out)
    out.PatientID = pseudonym
    out.PatientName = None
    out.PatientBirthDate = None
    out.PatientIdentityRemoved = "YES"
    out.LongitudinalTemporalInformationModified = "REMOVED"
    out.DeidentificationMethod = "octpipe: PS3.15 Basic Application Level Confidentiality Profile"
    method = Dataset()
    method.CodeValue = "113100"
    method.CodingSchemeDesignator = "DCM"
    method.CodeMeaning = "Basic Application Confidentiality Profile"
    out.DeidentificationMethodCodeSequence = Sequence([method])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = out.SOPClassUID
    meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
    out.file_meta = meta
    return out


def _replace_uids(value: object, keyword: str, pseudonym: str) -> object:
    """Replace instance UIDs (one or several values) by ones derived from (pseudonym, uid)."""
    if keyword in _KEEP_UID_KEYWORDS or keyword.endswith("SOPClassUID"):
        return value
    values = list(value) if isinstance(value, (list, MultiValue)) else [value]
    new = [v if str(v).startswith("1.2.840.10008.") else _uid("octpipe-deid", pseudonym, str(v)) for v in values]
    return new if len(new) > 1 else new[0]


# --------------------------------------------------------------------------- Secondary Capture


def _secondary_captures(
    overlays: npt.NDArray[np.uint8], *, spacing: tuple[float, float, float], map_shape: tuple[int, ...],
    laterality: str | None, pseudonym: str, series_description: str, software_version: str,
) -> list[tuple[str, Dataset]]:
    """One RGB SC image per overlay, in one new study and series."""
    key = _content_hash(overlays, extra=(software_version, series_description))
    study = _uid("octpipe-sc-study", pseudonym, key)
    series = _uid("octpipe-sc-series", pseudonym, key)
    native = overlays.shape[1:3] == tuple(map_shape[1:3])
    lat = _LATERALITY_TO_DICOM.get(laterality or "")
    files = []
    n = overlays.shape[0]
    for i in range(n):
        sc = hd.sc.SCImage(
            pixel_array=overlays[i],
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            # highdicom wants a patient orientation for the PATIENT coordinate system; the in-plane
            # direction of an overlay is not known, so the placeholder is emptied below.
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            patient_orientation=("L", "P"),
            study_instance_uid=study,
            series_instance_uid=series,
            series_number=103,
            sop_instance_uid=_uid("octpipe-sc", pseudonym, key, i),
            instance_number=i + 1,
            manufacturer=_MANUFACTURER,
            manufacturer_model_name=_MODEL,
            device_serial_number=_SERIAL,
            software_versions=software_version,
            patient_id=pseudonym,
            pixel_spacing=(spacing[1], spacing[2]) if native else None,
        )
        sc.PatientOrientation = None  # Type 2C: present, empty (unknown)
        sc.BurnedInAnnotation = "YES"
        sc.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
        if lat is not None:  # General Image; the series Laterality is not allowed beside it
            sc.ImageLaterality = lat
        sc.SeriesDescription = f"{series_description} overlays"[:64]
        sc.ImageComments = f"overlay {i + 1} of {n}; {_RESEARCH_NOTE}"
        files.append((SC_PATTERN.format(i), sc))
    return files
