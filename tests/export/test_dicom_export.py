from __future__ import annotations

import copy
import logging
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from octpipe.errors import OctpipeError
from octpipe.export.dicom import PM_NAME, SEG_NAME, SOURCE_NAME, write_dicom_exports
from octpipe.io.dicom import read_dicom
from octpipe.io.writers.dicom import write_dicom_opt
from tests.conftest import SMALL_SHAPE, SMALL_SPACING, small_phantom

PSEUDONYM = "vol-7f3a9c2e1b"
THRESHOLD = 3.0
# identifying values put into the source; none may reach any output file
NAME, BIRTH, PATIENT_ID, SERIAL = "Doe^Jane", "19700101", "MRN-4471-ORIG", "SN-98765-XYZ"
OTHER_SECRETS = ("ALT-ID-5555", "ACC-2024-0077", "St Elsewhere Eye Clinic", "Tech^Tom", "Dr^Who", "PRIVATE-NOTE")
SECRETS = (NAME, BIRTH, PATIENT_ID, SERIAL, *OTHER_SECRETS)


def _uids(ds: Dataset) -> set[str]:
    """Every instance UID in ``ds`` (any depth), i.e. not a DICOM-standard class/syntax UID."""
    found: set[str] = set()
    for elem in ds.iterall():
        if elem.VR == "UI" and elem.value:
            values = elem.value if isinstance(elem.value, list | pydicom.multival.MultiValue) else [elem.value]
            found.update(str(v) for v in values if not str(v).startswith("1.2.840.10008."))
    for elem in ds.file_meta:
        if elem.VR == "UI" and not str(elem.value).startswith("1.2.840.10008."):
            found.add(str(elem.value))
    found.discard(str(pydicom.uid.PYDICOM_IMPLEMENTATION_UID))
    return found


def _clinical_source(path: Path, data: np.ndarray, *, permute: list[int] | None = None) -> Path:
    """An OPT written by octpipe, then given the identifying attributes a clinical export carries."""
    write_dicom_opt(path, data, spacing_mm=SMALL_SPACING, laterality="OD", patient_id=PATIENT_ID)
    ds = pydicom.dcmread(path)
    ds.PatientName = NAME
    ds.PatientBirthDate = BIRTH
    ds.DeviceSerialNumber = SERIAL
    ds.OtherPatientIDs = OTHER_SECRETS[0]
    ds.AccessionNumber = OTHER_SECRETS[1]
    ds.InstitutionName = OTHER_SECRETS[2]
    ds.OperatorsName = OTHER_SECRETS[3]
    ds.ReferringPhysicianName = OTHER_SECRETS[4]
    ds.SeriesDescription = f"OCT {NAME}"
    ds.private_block(0x0009, "ACME OCT", create=True).add_new(0x01, "LO", OTHER_SECRETS[5])
    equipment = Dataset()  # a nested copy of the device identity, as enhanced files often have
    equipment.Manufacturer = "ACME"
    equipment.DeviceSerialNumber = SERIAL
    equipment.InstitutionName = OTHER_SECRETS[2]
    equipment.ContributionDateTime = BIRTH + "120000"
    ds.ContributingEquipmentSequence = Sequence([equipment])
    referenced = Dataset()  # a reference UID that must be replaced as well
    referenced.ReferencedSOPClassUID = ds.SOPClassUID
    referenced.ReferencedSOPInstanceUID = pydicom.uid.generate_uid()
    ds.ReferencedImageSequence = Sequence([referenced])
    if permute is not None:  # store the frames in another order than InStackPositionNumber
        frames = ds.pixel_array.reshape(data.shape)[permute]
        ds.PerFrameFunctionalGroupsSequence = Sequence([ds.PerFrameFunctionalGroupsSequence[i] for i in permute])
        ds.PixelData = np.ascontiguousarray(frames).tobytes()
    ds.save_as(path)
    return path


def _anomaly_map() -> np.ndarray:
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in SMALL_SHAPE), indexing="ij")
    blob = 6.0 * np.exp(-(((z - 1) / 1.2) ** 2 + ((y - 120) / 25.0) ** 2 + ((x - 90) / 40.0) ** 2))
    amap = blob.astype(np.float32)
    amap[4, 30:40, 200:220] = THRESHOLD  # exactly at the threshold: in the segmentation
    amap[4, 50:60, 200:220] = np.nextafter(np.float32(THRESHOLD), np.float32(0))  # just below: out
    amap[3, 10:12, 10:12] = 0.5
    return amap


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return np.round(small_phantom(0, laterality="OD").data * 255).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def source(tmp_path_factory, volume) -> Path:
    return _clinical_source(tmp_path_factory.mktemp("src") / "clinical.dcm", volume)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, source):
    out = tmp_path_factory.mktemp("export")
    amap = _anomaly_map()
    result = write_dicom_exports(out, anomaly_map=amap, threshold=THRESHOLD, spacing_mm=SMALL_SPACING,
                                 laterality="OD", pseudonym=PSEUDONYM, source_dicom=source)
    return result, amap


def _read(result, name: str) -> Dataset:
    return pydicom.dcmread(next(p for p in result.paths if p.name == name))


def _overlays(n: int = SMALL_SHAPE[0]) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, size=(n, 40, 48, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- Parametric Map path


def test_dicom_source_gives_deid_source_parametric_map_and_segmentation(exported):
    result, _ = exported
    assert result.kind == "parametric-map" and result.note == "" and result.adapted == ()
    assert [p.name for p in result.paths] == [SOURCE_NAME, PM_NAME, SEG_NAME]
    assert all(p.is_file() for p in result.paths)
    src, pm, seg = (_read(result, n) for n in (SOURCE_NAME, PM_NAME, SEG_NAME))
    assert src.SOPClassUID == "1.2.840.10008.5.1.4.1.1.77.1.5.4"
    assert pm.SOPClassUID == pydicom.uid.ParametricMapStorage
    assert seg.SOPClassUID == pydicom.uid.SegmentationStorage
    hd.pm.ParametricMap.from_dataset(pm)
    hd.seg.Segmentation.from_dataset(seg)
    assert read_dicom(result.paths[0]).shape == SMALL_SHAPE  # the de-identified source still reads as a volume


def test_parametric_map_round_trips_the_map_per_source_frame(exported):
    result, amap = exported
    src = _read(result, SOURCE_NAME)
    pm = hd.pm.ParametricMap.from_dataset(_read(result, PM_NAME))
    # highdicom stores the frames sorted by position; index them by the source frames they derive from
    got = pm.get_pixels_by_source_frame(src.SOPInstanceUID, source_frame_numbers=range(1, SMALL_SHAPE[0] + 1),
                                        dtype=np.float32)
    np.testing.assert_array_equal(got, amap)  # float32 is stored as float32: exact
    assert pm.ContentQualification == "RESEARCH"
    assert pm.ContentLabel == "ANOMALY"
    assert pm.ImageLaterality == "R" and "Laterality" not in pm  # the eye is per image/frame, not per series
    anatomy = pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence[0]
    assert anatomy.FrameLaterality == "R" and anatomy.AnatomicRegionSequence[0].CodeValue == "81745001"
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "{z}"
    assert mapping.MeasurementUnitsCodeSequence[0].CodingSchemeDesignator == "UCUM"
    voi = pm.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (THRESHOLD, 2 * THRESHOLD)


def test_segmentation_marks_exactly_the_voxels_at_or_above_threshold(exported):
    result, amap = exported
    src = _read(result, SOURCE_NAME)
    seg = hd.seg.Segmentation.from_dataset(_read(result, SEG_NAME))
    mask = seg.get_pixels_by_source_frame(src.SOPInstanceUID, source_frame_numbers=range(1, SMALL_SHAPE[0] + 1),
                                          segment_numbers=[1])[..., 0]
    np.testing.assert_array_equal(mask.astype(bool), amap >= THRESHOLD)
    assert mask[4, 30:40, 200:220].all() and not mask[4, 50:60, 200:220].any()
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "Anomaly"
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "octpipe f-AnoGAN"
    region = segment.AnatomicRegionSequence[0]
    assert region.CodeValue == "5665001" and region.AnatomicRegionModifierSequence[0].CodeValue == "24028007"  # right


def test_map_and_segmentation_reference_the_deidentified_source(exported):
    result, _ = exported
    src = _read(result, SOURCE_NAME)
    for name in (PM_NAME, SEG_NAME):
        ds = _read(result, name)
        ref = ds.ReferencedSeriesSequence[0]
        assert ref.SeriesInstanceUID == src.SeriesInstanceUID
        assert [r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence] == [src.SOPInstanceUID]
        assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        assert ds.PatientID == PSEUDONYM
        assert ds.Manufacturer == "octpipe" and ds.DeviceSerialNumber == "0"


def test_every_uid_is_replaced(exported, source):
    result, _ = exported
    original = _uids(pydicom.dcmread(source))
    assert len(original) >= 6  # study, series, SOP, frame of reference, dimension organisation, reference
    for path in result.paths:
        assert not original & _uids(pydicom.dcmread(path)), path.name
        data = path.read_bytes()
        assert not [u for u in original if u.encode() in data], path.name


def test_no_identifying_value_reaches_any_output_file(exported):
    result, _ = exported
    for path in result.paths:
        data = path.read_bytes()
        assert not [s for s in SECRETS if s.encode() in data], path.name
    src = _read(result, SOURCE_NAME)
    assert src.PatientID == PSEUDONYM and not src.PatientName and not src.PatientBirthDate
    assert src.DeviceSerialNumber == "0"
    assert src.PatientIdentityRemoved == "YES"
    assert src.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert src.DeidentificationMethodCodeSequence[0].CodingSchemeDesignator == "DCM"


def test_reexport_keeps_the_uids_and_takes_the_source_laterality(exported, source, tmp_path):
    result, amap = exported
    again = write_dicom_exports(tmp_path, anomaly_map=amap, threshold=THRESHOLD, spacing_mm=SMALL_SPACING,
                                laterality=None, pseudonym=PSEUDONYM, source_dicom=source)
    keys = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
    for first, second in zip(result.paths, again.paths, strict=True):
        a, b = pydicom.dcmread(first), pydicom.dcmread(second)
        assert [a.get(k) for k in keys] == [b.get(k) for k in keys], first.name
        assert b.ImageLaterality == "R" and "Laterality" not in b, first.name


def test_frames_follow_in_stack_position_not_file_order(volume, tmp_path):
    source = _clinical_source(tmp_path / "shuffled.dcm", volume, permute=[3, 0, 4, 1, 2])
    np.testing.assert_array_equal(read_dicom(source).data, volume)  # the reader sorts by InStackPositionNumber
    amap = _anomaly_map()
    result = write_dicom_exports(tmp_path / "out", anomaly_map=amap, threshold=THRESHOLD, spacing_mm=SMALL_SPACING,
                                 laterality="OD", pseudonym=PSEUDONYM, source_dicom=source)
    assert result.kind == "parametric-map", result.note
    src = _read(result, SOURCE_NAME)
    # volume index i is stored as file frame permute.index(i)
    file_frames = [[3, 0, 4, 1, 2].index(i) + 1 for i in range(SMALL_SHAPE[0])]
    pm = hd.pm.ParametricMap.from_dataset(_read(result, PM_NAME))
    np.testing.assert_array_equal(pm.get_pixels_by_source_frame(src.SOPInstanceUID, source_frame_numbers=file_frames,
                                                                dtype=np.float32), amap)
    seg = hd.seg.Segmentation.from_dataset(_read(result, SEG_NAME))
    mask = seg.get_pixels_by_source_frame(src.SOPInstanceUID, source_frame_numbers=file_frames)[..., 0]
    np.testing.assert_array_equal(mask.astype(bool), amap >= THRESHOLD)


def test_source_geometry_is_adapted_in_memory_for_highdicom(source, tmp_path):
    ds = pydicom.dcmread(source)
    shared = ds.SharedFunctionalGroupsSequence[0]
    for frame in ds.PerFrameFunctionalGroupsSequence:  # orientation per frame instead of shared
        frame.PlaneOrientationSequence = copy.deepcopy(shared.PlaneOrientationSequence)
    del shared.PlaneOrientationSequence
    ds.PixelSpacing = shared.PixelMeasuresSequence[0].PixelSpacing  # spacing at the top level only
    del shared.PixelMeasuresSequence
    ds.save_as(tmp_path / "odd.dcm")
    result = write_dicom_exports(tmp_path / "out", anomaly_map=_anomaly_map(), threshold=THRESHOLD,
                                 spacing_mm=SMALL_SPACING, laterality="OD", pseudonym=PSEUDONYM,
                                 source_dicom=tmp_path / "odd.dcm")
    assert result.kind == "parametric-map", result.note
    assert any("PlaneOrientationSequence" in a for a in result.adapted)
    assert any("PixelMeasuresSequence" in a for a in result.adapted)
    written = _read(result, SOURCE_NAME)  # the file on disk is the de-identified source, not the adaptation
    assert "PlaneOrientationSequence" in written.PerFrameFunctionalGroupsSequence[0]
    shared = _read(result, PM_NAME).SharedFunctionalGroupsSequence[0]
    assert shared.PlaneOrientationSequence[0].ImageOrientationPatient == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == list(SMALL_SPACING[1:])


# --------------------------------------------------------------------------- Secondary Capture fallback


def test_non_dicom_source_falls_back_to_secondary_capture(tmp_path, caplog):
    bogus = tmp_path / "scan.vol"
    bogus.write_bytes(b"HSF-OCT-103 " + bytes(600))
    overlays = _overlays()
    with caplog.at_level(logging.WARNING, logger="octpipe.export.dicom"):
        result = write_dicom_exports(tmp_path / "out", anomaly_map=_anomaly_map(), threshold=THRESHOLD,
                                     spacing_mm=SMALL_SPACING, laterality="OS", pseudonym=PSEUDONYM,
                                     source_dicom=bogus, overlays=overlays)
    assert result.kind == "secondary-capture"
    assert result.note.startswith("source DICOM not used: not a DICOM file") and "\n" not in result.note
    assert "scan.vol" not in result.note  # file names of clinical exports can carry patient names
    assert result.note in caplog.text and PSEUDONYM in caplog.text
    assert [p.name for p in result.paths] == [f"overlays-sc-{i:04d}.dcm" for i in range(len(overlays))]
    series = set()
    for i, path in enumerate(result.paths):
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
        np.testing.assert_array_equal(ds.pixel_array, overlays[i])
        assert ds.BurnedInAnnotation == "YES"
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.PatientID == PSEUDONYM and not ds.PatientName and not ds.get("PatientBirthDate")
        assert ds.ImageLaterality == "L" and "Laterality" not in ds
        assert ds.InstanceNumber == i + 1
        series.add(ds.SeriesInstanceUID)
        hd.imread(path)
    assert len(series) == 1


def test_no_source_and_no_overlays_writes_nothing(tmp_path):
    result = write_dicom_exports(tmp_path / "out", anomaly_map=_anomaly_map(), threshold=THRESHOLD,
                                 spacing_mm=SMALL_SPACING, laterality=None, pseudonym=PSEUDONYM)
    assert (result.paths, result.kind, result.note) == ((), "none", "")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "truncated"),
    ("missing", "cannot read the file"),
    ("no-frame-of-reference", "no FrameOfReferenceUID"),
    ("other-eye", "laterality OS does not match OD"),
    ("wrong-shape", "do not match the anomaly map"),
])
def test_unusable_dicom_source_falls_back_with_a_reason(source, tmp_path, damage, reason):
    path = tmp_path / "bad.dcm"
    amap = _anomaly_map()
    if damage == "truncate":
        data = source.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
    elif damage in ("no-frame-of-reference", "other-eye"):
        ds = pydicom.dcmread(source)
        if damage == "other-eye":
            ds.ImageLaterality = "L"
        else:
            del ds.FrameOfReferenceUID
        ds.save_as(path)
    elif damage == "wrong-shape":
        path = source
        amap = amap[:, :, :128]
    result = write_dicom_exports(tmp_path / "out", anomaly_map=amap, threshold=THRESHOLD, spacing_mm=SMALL_SPACING,
                                 laterality="OD", pseudonym=PSEUDONYM, source_dicom=path,
                                 overlays=_overlays(2))
    assert result.kind == "secondary-capture"
    assert result.note.startswith("source DICOM not used: ") and reason in result.note, result.note
    assert len(result.paths) == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [p.name for p in result.paths]


def test_existing_outputs_are_kept_unless_overwrite(tmp_path):
    kwargs = dict(anomaly_map=_anomaly_map(), threshold=THRESHOLD, spacing_mm=SMALL_SPACING, laterality="OD",
                  pseudonym=PSEUDONYM, overlays=_overlays(1))
    first = write_dicom_exports(tmp_path, **kwargs)
    with pytest.raises(OctpipeError, match="output exists"):
        write_dicom_exports(tmp_path, **kwargs)
    assert write_dicom_exports(tmp_path, overwrite=True, **kwargs).paths == first.paths


@pytest.mark.parametrize("change, match", [
    ({"anomaly_map": np.zeros((4, 4))}, "3-D"),
    ({"anomaly_map": np.full((2, 4, 4), np.nan, np.float32)}, "finite"),
    ({"threshold": 0.0}, "threshold"),
    ({"laterality": "R"}, "laterality"),
    ({"pseudonym": "a\\b"}, "pseudonym"),
    ({"overlays": np.zeros((2, 4, 4), np.uint8)}, "overlays"),
])
def test_malformed_arguments_raise_value_error(tmp_path, change, match):
    kwargs = dict(anomaly_map=np.zeros((2, 4, 4), np.float32), threshold=THRESHOLD, spacing_mm=SMALL_SPACING,
                  laterality="OD", pseudonym=PSEUDONYM)
    with pytest.raises(ValueError, match=match):
        write_dicom_exports(tmp_path, **(kwargs | change))


def test_store_export_finds_dicom_sources_by_content_under_the_folder_given_to_ingest(tmp_path, capsys):
    """--source-root as its help says (the folder given to ingest) works with the default hashed paths;
    without it the Secondary Capture fallback is said in a note, not silent."""
    import numpy as np

    from octpipe.cli import main
    from octpipe.io.writers.dicom import write_dicom_opt
    from octpipe.preprocess.intensity import linear_to_display
    from tests.conftest import small_phantom
    from tests.export.test_export import save_model_dir

    ph = small_phantom(seed=21)
    src = tmp_path / "exports from the device"
    write_dicom_opt(src / "b.dcm", np.round(linear_to_display(ph.data) * 255).astype(np.uint8),
                    spacing_mm=ph.spacing_mm, laterality=ph.laterality, patient_id="P-1")
    store = tmp_path / "s.zarr"
    assert main(["--no-progress", "ingest", str(src), "-o", str(store), "--workers", "0"]) == 0
    model = save_model_dir(tmp_path / "model", size=32)
    common = ["--model", str(model), "--stride", "32", "--device", "cpu"]
    assert main(["--no-progress", "export", str(store), "-o", str(tmp_path / "with"), "--source-root", str(src),
                 *common]) == 0
    assert list((tmp_path / "with").glob("*/dicom/anomaly-seg.dcm"))
    assert not list((tmp_path / "with").glob("*/dicom/overlays-sc-*.dcm"))
    capsys.readouterr()
    assert main(["--no-progress", "export", str(store), "-o", str(tmp_path / "without"), *common]) == 0
    assert "came from DICOM: pass --source-root" in capsys.readouterr().err
    assert list((tmp_path / "without").glob("*/dicom/overlays-sc-*.dcm"))
