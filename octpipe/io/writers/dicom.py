"""Write DICOM Ophthalmic Tomography (OPT) files, which :func:`octpipe.io.dicom.read_dicom` reads.

:func:`write_dicom_opt` writes a multi-frame OPT file, explicit VR little endian, uint8 or
uint16 values as given. Geometry (a nominal, documented frame of reference, since the true
position of the scan in the patient is not known):

- ``PlaneOrientationSequence``: ``ImageOrientationPatient = [1, 0, 0, 0, 1, 0]``
  (columns = A-scans along +x, rows = depth along +y);
- frame ``i`` (0-based, B-scan ``i``): ``ImagePositionPatient = [0, 0, i * dz]``
  with ``dz`` the B-scan spacing, ``InStackPositionNumber = i + 1``,
  ``StackID = "1"``, ``DimensionIndexValues = [1, i + 1]``;
- shared ``PixelSpacing = [axial, lateral]``, ``SliceThickness`` =
  ``SpacingBetweenSlices`` = B-scan spacing.

A ``FrameOfReferenceUID`` is always written (highdicom needs it to build SEG and
parametric maps on the volume). The patient module holds only the given
pseudonym as ``PatientID``; ``PatientName``, ``PatientBirthDate`` and
``PatientSex`` are present but empty (Type 2). The eye is in ``ImageLaterality``
and ``FrameLaterality`` only (no General Series ``Laterality``), and the file is
one whole volume: ``ConcatenationFrameOffsetNumber = 0``, ``InConcatenationNumber``
= ``InConcatenationTotalNumber = 1`` (the values the OPT IOD fixes, since it
permits no concatenation). dicom3tools' ``dciodvfy`` reports no error when the eye
is given, except three on these concatenation attributes, where it also applies
the generic Multi-frame Functional Groups rules that the OPT module overrides
(see ``tests/export/test_dicom_conformance.py``).
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from octpipe.io._common import atomic_output, check_writable
from octpipe.io.dicom import OPT_SOP_CLASS_UID

__all__ = ["write_dicom_opt"]

_LATERALITY_TO_DICOM = {"OD": "R", "OS": "L"}
_UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def _ds_number(value: float) -> str:
    """Format a float as a valid DS string (at most 16 characters)."""
    return format_number_as_ds(float(value))


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _check_uid(uid: str | None, name: str) -> UID:
    if uid is None:
        return generate_uid()
    text = str(uid)
    if len(text) > 64 or not _UID_PATTERN.fullmatch(text):
        raise ValueError(f"{name} must be a valid DICOM UID (digits and dots, <= 64 chars), got {uid!r}")
    return UID(text)


def write_dicom_opt(
    path: str | Path,
    data: npt.NDArray[np.unsignedinteger],
    *,
    spacing_mm: tuple[float, float, float],
    laterality: str | None,
    patient_id: str,
    study_uid: str | None = None,
    series_uid: str | None = None,
    overwrite: bool = False,
    identifying: Mapping[str, str] | None = None,
) -> Path:
    """Write a volume as a multi-frame DICOM Ophthalmic Tomography Image.

    Parameters
    ----------
    path : str or Path
        Output file (conventionally ``.dcm``).
    data : ndarray of uint8 or uint16, shape (n_bscans, n_axial, n_ascans)
        Pixel values, stored as given (no rescaling); one frame per B-scan.
    spacing_mm : tuple of 3 floats
        (between B-scans, axial, lateral) in mm; axial and lateral must be > 0,
        the B-scan spacing >= 0 (0 is allowed for a single B-scan).
    laterality : {"OD", "OS"} or None
        Written as ``ImageLaterality`` (Ocular Region Imaged) and ``FrameLaterality``
        (shared Frame Anatomy) R or L. The General Series ``Laterality`` is not
        written: the IOD forbids it when ``ImageLaterality`` is present. None writes
        ``"U"`` (unknown), which the OPT IOD does not define (R, L, B only; dciodvfy
        reports it): pass the eye whenever it is known.
    patient_id : str
        The pseudonym to store as ``PatientID`` (at most 64 characters, no
        backslash). Never pass a real patient identifier.
    study_uid, series_uid : str, optional
        Study and Series Instance UIDs; new ones are generated when not given, so
        pass the same ``study_uid`` to group several files in one study.
    overwrite : bool
        Replace an existing file.
    identifying : mapping of str to str, optional
        For privacy tests only: DICOM keywords (``PatientName``, ``PatientBirthDate``,
        ``DeviceSerialNumber``, ``InstitutionName`` ...) set to these values, so that
        a test can check that nothing octpipe writes carries them. Never use with real
        identifiers.

    Returns
    -------
    Path
        The written file. It is written to a temporary file in the same folder and
        renamed into place, so a crash never leaves a half-written file.

    Raises
    ------
    ValueError
        ``data`` is not a non-empty 3-D uint8/uint16 array, or a parameter is out
        of range.
    OctpipeError
        ``path`` exists and ``overwrite`` is false.

    Examples
    --------
    >>> import tempfile
    >>> from octpipe.io.dicom import read_dicom
    >>> p = write_dicom_opt(tempfile.mkdtemp() + "/v.dcm", np.zeros((3, 40, 32), np.uint8),
    ...                     spacing_mm=(0.12, 0.0039, 0.0113), laterality="OD", patient_id="p-01")
    >>> read_dicom(p).shape
    (3, 40, 32)
    """
    if not isinstance(data, np.ndarray) or data.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"data must be a uint8 or uint16 ndarray, got {getattr(data, 'dtype', type(data))}")
    if data.ndim != 3 or min(data.shape) < 1:
        raise ValueError(f"data must be 3-D (n_bscans, n_axial, n_ascans) and non-empty, got shape {data.shape}")
    n_frames, rows, cols = data.shape
    if rows > 65535 or cols > 65535:
        raise ValueError(f"rows and columns must be <= 65535, got {rows}x{cols}")
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or not all(np.isfinite(s) for s in spacing) or spacing[0] < 0 or min(spacing[1:]) <= 0:
        raise ValueError(f"spacing_mm must be 3 finite values (>= 0, > 0, > 0) in mm, got {spacing_mm}")
    if laterality is not None and laterality not in _LATERALITY_TO_DICOM:
        raise ValueError(f"laterality must be 'OD', 'OS' or None, got {laterality!r}")
    if not isinstance(patient_id, str) or len(patient_id) > 64 or "\\" in patient_id:
        raise ValueError(f"patient_id must be a string of at most 64 characters without '\\', got {patient_id!r}")
    study = _check_uid(study_uid, "study_uid")
    series = _check_uid(series_uid, "series_uid")
    path = check_writable(path, overwrite=overwrite)

    dz, axial, lateral = spacing
    lat_code = _LATERALITY_TO_DICOM.get(laterality or "", "U")
    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    sop_uid = generate_uid()
    bits = 8 * data.dtype.itemsize

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(OPT_SOP_CLASS_UID)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    # SOP common
    ds.SOPClassUID = UID(OPT_SOP_CLASS_UID)
    ds.SOPInstanceUID = sop_uid
    # Patient (Type 2 attributes present, empty; only the pseudonym is stored)
    ds.PatientName = ""
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    # General study
    ds.StudyInstanceUID = study
    ds.StudyDate = date
    ds.StudyTime = time
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.AccessionNumber = ""
    # General / ophthalmic tomography series
    ds.Modality = "OPT"
    ds.SeriesInstanceUID = series
    ds.SeriesNumber = 1
    # no General Series Laterality: the OPT IOD puts the eye in ImageLaterality/FrameLaterality
    # Frame of reference (nominal; see the module docstring)
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    # (Enhanced) general equipment: the software that wrote the file
    from octpipe import __version__

    ds.Manufacturer = "octpipe"
    ds.ManufacturerModelName = "octpipe"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = __version__
    # Ophthalmic tomography image
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.InstanceNumber = 1
    ds.ContentDate = date
    ds.ContentTime = time
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S.%f")
    ds.AcquisitionNumber = 1
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    # Type 1 with fixed values: the OPT IOD does not permit concatenations (PS3.3 C.8.17.7)
    ds.ConcatenationFrameOffsetNumber = 0
    ds.InConcatenationNumber = 1
    ds.InConcatenationTotalNumber = 1
    # Ophthalmic tomography acquisition parameters (Type 2: unknown here)
    ds.EmmetropicMagnification = None
    ds.IntraOcularPressure = None
    ds.HorizontalFieldOfView = None
    ds.PupilDilated = None
    ds.RefractiveStateSequence = Sequence()
    ds.AxialLengthOfTheEye = None
    # Ophthalmic tomography parameters
    ds.DetectorType = "CCD"
    ds.AcquisitionDeviceTypeCodeSequence = Sequence([_code("392012008", "SCT", "Optical Coherence Tomography Scanner")])
    ds.LightPathFilterTypeStackCodeSequence = Sequence()
    # Acquisition context (Type 2)
    ds.AcquisitionContextSequence = Sequence()
    # Ocular region imaged
    ds.AnatomicRegionSequence = Sequence([_code("81745001", "SCT", "Eye")])
    ds.ImageLaterality = lat_code

    # Multi-frame dimension: frames indexed by (StackID, InStackPositionNumber)
    dim_uid = generate_uid()
    org = Dataset()
    org.DimensionOrganizationUID = dim_uid
    ds.DimensionOrganizationSequence = Sequence([org])
    ds.DimensionOrganizationType = "3D"
    indices = []
    for pointer, label in ((0x00209056, "Stack ID"), (0x00209057, "In-Stack Position Number")):
        idx = Dataset()
        idx.DimensionOrganizationUID = dim_uid
        idx.DimensionIndexPointer = pointer
        idx.FunctionalGroupPointer = 0x00209111  # FrameContentSequence
        idx.DimensionDescriptionLabel = label
        indices.append(idx)
    ds.DimensionIndexSequence = Sequence(indices)

    # Shared functional groups
    measures = Dataset()
    measures.PixelSpacing = [_ds_number(axial), _ds_number(lateral)]
    measures.SliceThickness = _ds_number(dz)
    measures.SpacingBetweenSlices = _ds_number(dz)
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    anatomy = Dataset()
    anatomy.AnatomicRegionSequence = Sequence([_code("81745001", "SCT", "Eye")])
    anatomy.FrameLaterality = lat_code
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.FrameAnatomySequence = Sequence([anatomy])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])

    # Per-frame functional groups
    per_frame = []
    for i in range(n_frames):
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = i + 1
        content.DimensionIndexValues = [1, i + 1]
        position = Dataset()
        position.ImagePositionPatient = [0, 0, _ds_number(i * dz)]
        item = Dataset()
        item.FrameContentSequence = Sequence([content])
        item.PlanePositionSequence = Sequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)

    # Image pixel
    ds.NumberOfFrames = n_frames
    ds.Rows = rows
    ds.Columns = cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    pixels = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<")).tobytes()
    if len(pixels) % 2:
        pixels += b"\x00"
    ds.add_new(0x7FE00010, "OB" if bits == 8 else "OW", pixels)

    for keyword, value in (identifying or {}).items():  # privacy tests only (see the docstring)
        setattr(ds, keyword, value)
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        ds.save_as(fh, enforce_file_format=True)
    return path
