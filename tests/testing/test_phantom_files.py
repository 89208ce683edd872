"""Phantoms written in vendor formats are read back by the field's own tools."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from octpipe.errors import OctpipeError
from octpipe.testing.phantom_files import write_cohort, write_phantom_files
from octpipe.testing.phantoms import make_cohort, parse_lesion_specs
from tests.conftest import SMALL_SHAPE, SMALL_SPACING, small_phantom


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    ph = small_phantom(21, "srf,hrf", laterality="OS")
    out = tmp_path_factory.mktemp("phantom")
    return ph, write_phantom_files(ph, out)


def test_vol_reads_in_eyepy(written):
    import eyepy as ep

    ph, files = written
    ev = ep.import_heyex_vol(files["vol"])
    assert ev.shape == SMALL_SHAPE
    assert ev.laterality == "OS"
    assert ev.scale_x == pytest.approx(SMALL_SPACING[2])
    assert ev.scale_y == pytest.approx(SMALL_SPACING[1])
    assert ev.scale_z == pytest.approx(SMALL_SPACING[0])
    np.testing.assert_allclose(ev.layers["ILM"].data, ph.ilm, atol=1e-4)
    np.testing.assert_allclose(ev.layers["BM"].data, ph.bm, atol=1e-4)
    np.testing.assert_allclose(ev._raw_data, ph.data)


def test_dicom_reads_in_pydicom(written):
    ph, files = written
    ds = pydicom.dcmread(files["dicom"])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.77.1.5.4"
    assert int(ds.NumberOfFrames) == SMALL_SHAPE[0]
    assert ds.pixel_array.shape == SMALL_SHAPE
    assert ds.ImageLaterality == "L"
    measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == pytest.approx([SMALL_SPACING[1], SMALL_SPACING[2]])
    assert float(measures.SliceThickness) == pytest.approx(SMALL_SPACING[0])
    assert ds.PatientID == ph.name
    assert "PatientBirthDate" not in ds or not ds.PatientBirthDate


def test_nifti_reads_in_nibabel(written):
    _, files = written
    img = nib.load(files["nifti"])
    assert sorted(img.shape) == sorted(SMALL_SHAPE)
    assert sorted(img.header.get_zooms()) == pytest.approx(sorted(SMALL_SPACING))


def test_png_folder_and_truth_sidecars(written):
    from PIL import Image

    ph, files = written
    pngs = sorted(Path(files["png"]).iterdir())
    assert len(pngs) == SMALL_SHAPE[0]
    with Image.open(pngs[0]) as im:
        assert im.size == (SMALL_SHAPE[2], SMALL_SHAPE[1])
    with np.load(files["truth_npz"]) as truth:
        np.testing.assert_array_equal(truth["lesion_mask"], ph.lesion_mask)
        np.testing.assert_array_equal(truth["ilm"], ph.ilm)
    meta = json.loads(Path(files["truth_json"]).read_text())
    assert meta["diseased"] is True and meta["lesion_types"] == ["srf", "hrf"]
    assert meta["laterality"] == "OS"


def test_nothing_is_overwritten_without_overwrite(written, tmp_path):
    ph, files = written
    out = Path(files["vol"]).parent
    with pytest.raises(OctpipeError, match="exists"):
        write_phantom_files(ph, out, formats=["vol"])
    write_phantom_files(ph, out, formats=["vol"], overwrite=True)


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown phantom format"):
        write_phantom_files(small_phantom(0), tmp_path, formats=["mp4"])


def test_cohort_manifest(tmp_path):
    cohort = make_cohort(2, seed=1, lesions=parse_lesion_specs("ped"), shape=SMALL_SHAPE, spacing_mm=SMALL_SPACING)
    manifest = write_cohort(cohort, tmp_path, formats=["vol", "png"])
    lines = manifest.read_text().splitlines()
    assert lines[0].startswith("name,laterality,diseased,lesion_types")
    assert len(lines) == 3
    assert ",0,," in lines[1] and ",1,ped," in lines[2]
    assert (tmp_path / "phantom-0001.vol").exists() and not (tmp_path / "phantom-0001.dcm").exists()
