from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from octpipe.errors import CorruptFileError, FormatError, OctpipeError, UnsupportedFormatError
from octpipe.io.dicom import OPT_SOP_CLASS_UID, read_dicom
from octpipe.io.images import DEFAULT_SPACING_MM
from octpipe.io.writers.dicom import write_dicom_opt

SPACING = (0.12, 0.00387, 0.0113)
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SECRETS = ("Doe^Jane", "Doe", "Jane", "SN-SECRET-42", "MRN-998877", "19700101", "Secret General Hospital")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240601)


def _opt(tmp_path: Path, data: np.ndarray, name: str = "vol.dcm", **kw) -> Path:
    kw.setdefault("spacing_mm", SPACING)
    kw.setdefault("laterality", "OD")
    kw.setdefault("patient_id", "pseudo-0001")
    return write_dicom_opt(tmp_path / name, data, **kw)


def _handmade(pixels: np.ndarray, photometric: str = "MONOCHROME2", **attrs) -> Dataset:
    """A generic (non-OPT) DICOM image with identifying attributes, built with pydicom."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "MRN-998877"
    ds.PatientBirthDate = "19700101"
    ds.InstitutionName = "Secret General Hospital"
    ds.DeviceSerialNumber = "SN-SECRET-42"
    ds.Manufacturer = "Heidelberg Engineering"
    ds.ManufacturerModelName = "Spectralis"
    ds.set_pixel_data(pixels, photometric, 8 * pixels.dtype.itemsize)
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


# ----------------------------------------------------------------- writer + round trip


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_opt_round_trip(tmp_path: Path, rng: np.random.Generator, dtype: type) -> None:
    data = rng.integers(0, np.iinfo(dtype).max, size=(3, 40, 32), endpoint=True, dtype=dtype)
    before = data.copy()
    path = _opt(tmp_path, data, laterality="OS")
    np.testing.assert_array_equal(data, before)  # input not mutated

    vol = read_dicom(path)
    assert vol.shape == (3, 40, 32)
    assert vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.data, data.astype(np.float32))
    np.testing.assert_allclose(vol.spacing_mm, SPACING, atol=1e-6)
    assert vol.spacing_source == "file"
    assert vol.laterality == "OS"
    assert vol.scan_pattern == "volume"
    assert vol.intensity == "display"
    assert vol.provenance is not None and vol.provenance.format == "dicom-opt"
    assert vol.provenance.reader == "dicom"
    assert vol.meta["bits_stored"] == 8 * np.dtype(dtype).itemsize
    assert vol.meta["dtype"] == np.dtype(dtype).name
    assert vol.meta["n_frames"] == 3
    assert vol.meta["sop_class"] == "Ophthalmic Tomography Image Storage"
    assert vol.volume_id.startswith("v")
    assert not list(tmp_path.glob(".*"))  # no temp file left behind


def test_opt_header(tmp_path: Path, rng: np.random.Generator) -> None:
    data = rng.integers(0, 255, size=(3, 40, 32), dtype=np.uint8)
    study = generate_uid()
    path = _opt(tmp_path, data, study_uid=study)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == OPT_SOP_CLASS_UID
    assert ds.file_meta.MediaStorageSOPClassUID == OPT_SOP_CLASS_UID
    assert ds.Modality == "OPT"
    assert int(ds.NumberOfFrames) == 3
    assert (ds.Rows, ds.Columns) == (40, 32)
    assert ds.ImageLaterality == "R" and "Laterality" not in ds  # the OPT IOD wants it per image, not per series
    assert ds.SharedFunctionalGroupsSequence[0].FrameAnatomySequence[0].FrameLaterality == "R"
    # one whole volume: the fixed values of the OPT IOD, which permits no concatenation
    assert (ds.ConcatenationFrameOffsetNumber, ds.InConcatenationNumber, ds.InConcatenationTotalNumber) == (0, 1, 1)
    assert "ConcatenationUID" not in ds
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (8, 8, 7, 0)
    assert ds.StudyInstanceUID == study
    assert ds.FrameOfReferenceUID.is_valid
    assert ds.SeriesInstanceUID.is_valid and ds.SeriesInstanceUID != study
    assert ds.PatientID == "pseudo-0001"
    assert not ds.get("PatientBirthDate")
    assert not str(ds.get("PatientName", ""))
    assert ds.ContentDate and ds.ContentTime
    shared = ds.SharedFunctionalGroupsSequence[0]
    measures = shared.PixelMeasuresSequence[0]
    np.testing.assert_allclose([float(v) for v in measures.PixelSpacing], [SPACING[1], SPACING[2]])
    assert float(measures.SliceThickness) == pytest.approx(SPACING[0])
    assert float(measures.SpacingBetweenSlices) == pytest.approx(SPACING[0])
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    frames = ds.PerFrameFunctionalGroupsSequence
    assert len(frames) == 3
    for i, frame in enumerate(frames):
        content = frame.FrameContentSequence[0]
        assert content.InStackPositionNumber == i + 1
        assert list(content.DimensionIndexValues) == [1, i + 1]
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [0, 0, i * SPACING[0]])
    organization = ds.DimensionOrganizationSequence[0].DimensionOrganizationUID
    assert all(item.DimensionOrganizationUID == organization for item in ds.DimensionIndexSequence)
    np.testing.assert_array_equal(ds.pixel_array, data)


def test_opt_new_uids_each_call(tmp_path: Path) -> None:
    data = np.zeros((2, 8, 8), np.uint8)
    a = pydicom.dcmread(_opt(tmp_path, data, name="a.dcm"))
    b = pydicom.dcmread(_opt(tmp_path, data, name="b.dcm"))
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        assert a[key].value != b[key].value


def test_opt_single_bscan_odd_size(tmp_path: Path) -> None:
    data = np.arange(25, dtype=np.uint8).reshape(1, 5, 5)  # odd number of pixel bytes
    vol = read_dicom(_opt(tmp_path, data, spacing_mm=(0.0, 0.004, 0.01), laterality=None))
    np.testing.assert_array_equal(vol.data[0], data[0])
    assert vol.scan_pattern == "line"
    assert vol.laterality is None
    assert vol.spacing_mm == pytest.approx((0.0, 0.004, 0.01))
    assert vol.spacing_source == "file"


@pytest.mark.parametrize(
    ("data", "kw"),
    [
        (np.zeros((2, 4, 4), np.float32), {}),
        (np.zeros((2, 4, 4), np.int16), {}),
        (np.zeros((4, 4), np.uint8), {}),
        (np.zeros((2, 4, 4), np.uint8), {"laterality": "right"}),
        (np.zeros((2, 4, 4), np.uint8), {"spacing_mm": (0.1, 0.0, 0.01)}),
        (np.zeros((2, 4, 4), np.uint8), {"study_uid": "not a uid"}),
    ],
)
def test_opt_writer_rejects_bad_input(tmp_path: Path, data: np.ndarray, kw: dict) -> None:
    with pytest.raises(ValueError):
        _opt(tmp_path, data, **kw)


def test_opt_writer_overwrite(tmp_path: Path) -> None:
    path = _opt(tmp_path, np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(OctpipeError, match="overwrite"):
        _opt(tmp_path, np.ones((2, 4, 4), np.uint8))
    _opt(tmp_path, np.ones((2, 4, 4), np.uint8), overwrite=True)
    assert read_dicom(path).data.max() == 1


# ----------------------------------------------------------------- reader: generic files


def test_identifying_tags_never_reach_the_volume(tmp_path: Path, rng: np.random.Generator) -> None:
    pixels = rng.integers(0, 4095, size=(40, 32), dtype=np.uint16)
    ds = _handmade(pixels, PixelSpacing=[0.0039, 0.0114], ImageLaterality="L", RescaleSlope=2, RescaleIntercept=-1)
    vol = read_dicom(_save(ds, tmp_path / "generic.dcm"))
    text = repr(vol) + repr(vol.meta) + repr(vol.provenance)
    for secret in SECRETS:
        assert secret not in text
    assert set(vol.meta) <= {
        "modality", "sop_class", "manufacturer_model_name", "bits_stored", "photometric_interpretation",
        "n_frames", "dtype", "rescale_slope", "rescale_intercept",
    }
    assert vol.vendor == "heidelberg"
    assert vol.meta["manufacturer_model_name"] == "Spectralis"
    assert vol.laterality == "OS"
    assert vol.shape == (1, 40, 32)
    assert vol.scan_pattern == "line"
    assert vol.provenance is not None and vol.provenance.format == "dicom"
    np.testing.assert_allclose(vol.spacing_mm, (0.0, 0.0039, 0.0114), atol=1e-9)
    assert vol.spacing_source == "file"
    np.testing.assert_array_equal(vol.data[0], pixels.astype(np.float32) * 2 - 1)  # Modality LUT only
    assert vol.meta["bits_stored"] == 16 and vol.meta["dtype"] == "uint16"


def test_generic_without_spacing_uses_defaults(tmp_path: Path) -> None:
    pixels = np.zeros((3, 6, 5), np.uint8)
    ds = _handmade(pixels)
    del ds.Manufacturer
    vol = read_dicom(_save(ds, tmp_path / "nospacing.dcm"))
    assert vol.spacing_mm == DEFAULT_SPACING_MM
    assert vol.spacing_source == "default"
    assert vol.vendor == "unknown"
    assert vol.shape == (3, 6, 5) and vol.scan_pattern == "volume"


def test_rgb_becomes_luminance(tmp_path: Path) -> None:
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    vol = read_dicom(_save(_handmade(rgb, "RGB"), tmp_path / "rgb.dcm"))
    assert vol.shape == (1, 4, 6)
    np.testing.assert_allclose(vol.data, 0.299 * 200 + 0.587 * 100 + 0.114 * 50, rtol=1e-6)


def test_monochrome1_is_flipped(tmp_path: Path) -> None:
    pixels = np.array([[0, 255], [10, 20]], np.uint8)
    vol = read_dicom(_save(_handmade(pixels, "MONOCHROME1"), tmp_path / "m1.dcm"))
    np.testing.assert_array_equal(vol.data[0], 255 - pixels.astype(np.float32))
    assert vol.meta["photometric_interpretation"] == "MONOCHROME1"


def test_frames_ordered_by_in_stack_position(tmp_path: Path, rng: np.random.Generator) -> None:
    data = rng.integers(0, 255, size=(4, 10, 8), dtype=np.uint8)
    path = _opt(tmp_path, data)
    ds = pydicom.dcmread(path)
    # Store the frames in reverse order (each keeps its own frame content) and drop the
    # explicit slice spacing: the reader must sort by InStackPositionNumber and take the
    # B-scan spacing from the ImagePositionPatient steps.
    ds.PerFrameFunctionalGroupsSequence = pydicom.Sequence(list(ds.PerFrameFunctionalGroupsSequence)[::-1])
    for i, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        frame.PlanePositionSequence[0].ImagePositionPatient = [0, 0, 0.25 * (3 - i)]
    measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    del measures.SpacingBetweenSlices
    del measures.SliceThickness
    ds.PixelData = np.ascontiguousarray(data[::-1]).tobytes()
    vol = read_dicom(_save(ds, tmp_path / "reversed.dcm"))
    np.testing.assert_array_equal(vol.data, data.astype(np.float32))
    np.testing.assert_allclose(vol.spacing_mm, (0.25, SPACING[1], SPACING[2]), atol=1e-9)
    assert vol.spacing_source == "file"


# ----------------------------------------------------------------- reader: errors


def test_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "junk.dcm"
    path.write_bytes(b"this is not a DICOM file" * 20)
    with pytest.raises(FormatError, match="junk.dcm"):
        read_dicom(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_dicom(tmp_path / "nope.dcm")


@pytest.mark.parametrize("keep", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_truncated_dicom(tmp_path: Path, keep: float) -> None:
    raw = _opt(tmp_path, np.ones((3, 40, 32), np.uint16)).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(raw[: max(140, int(len(raw) * keep))])
    with pytest.raises(CorruptFileError, match="cut.dcm"):
        read_dicom(cut)


@pytest.mark.parametrize(("keyword", "value"), [("NumberOfFrames", 10**9), ("Rows", 65535), ("Columns", 60000)])
def test_absurd_header_is_refused_before_decoding(tmp_path: Path, keyword: str, value: int) -> None:
    ds = pydicom.dcmread(_opt(tmp_path, np.ones((3, 40, 32), np.uint8)))
    setattr(ds, keyword, value)
    with pytest.raises(CorruptFileError, match="absurd.dcm"):
        read_dicom(_save(ds, tmp_path / "absurd.dcm"))


def test_no_pixel_data(tmp_path: Path) -> None:
    ds = _handmade(np.zeros((4, 4), np.uint8))
    del ds.PixelData
    with pytest.raises(CorruptFileError, match="nopix.dcm"):
        read_dicom(_save(ds, tmp_path / "nopix.dcm"))


def test_unsupported_photometric(tmp_path: Path) -> None:
    ds = _handmade(np.zeros((4, 4), np.uint8))
    ds.PhotometricInterpretation = "PALETTE COLOR"
    with pytest.raises(UnsupportedFormatError, match="palette.dcm"):
        read_dicom(_save(ds, tmp_path / "palette.dcm"))
