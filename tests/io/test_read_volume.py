"""Every file in ../shared/data/real reads with the right shape, or is refused with a precise reason."""

import json

import numpy as np
import pytest

from octpipe.cli import main
from octpipe.errors import CorruptFileError, FormatError, OctpipeError
from octpipe.io import detect_format, read_volume, read_volumes

# relative path -> (format, shape) or the start of the refusal reason
EXPECTED = {
    "halirutan_spectralis-raw-data/test-data/Willis_B_716_0.vol": ("heyex-vol", (1, 496, 768)),
    "halirutan_spectralis-raw-data/test-data/Willis_B_716_2.vol": ("heyex-vol", (1, 496, 768)),
    "halirutan_spectralis-raw-data/test-data/Willis_B_716_4.vol": ("heyex-vol", (1, 496, 768)),
    "halirutan_spectralis-raw-data/test-data/valid.vol": ("heyex-vol", (1, 496, 768)),
    "DIAGNijmegen_rse-panimg/tests/resources/oct/e2e_minimized.E2E": ("heyex-e2e", (1, 496, 512)),
    "DIAGNijmegen_rse-panimg/tests/resources/oct/fda_minimized.fda": ("topcon-fda", (1, 650, 512)),
    "DIAGNijmegen_rse-panimg/tests/resources/oct/fds_minimized.fds": ("topcon-fds", (4, 3, 2)),
    "BilalHassan90_OCT-Biomarker-Segmentation/OCT Volumes/1/Raw Scans": ("bscan-folder", (19, 512, 496)),
    "ashkan-abbasi66_OCTseg-Zeiss/my-example-datasets/onh-3subsets/predict/img/im1000.bmp": ("image",
                                                                                            (1, 1024, 192)),
    "BilalHassan90_OCT-Biomarker-Segmentation/Classes_ID.mat": "a MATLAB .mat file",
    "SOURCES.md": "not a supported OCT format (starts with text)",
}


def test_every_real_file_reads_or_is_refused_precisely(real_data):
    from PIL import Image

    seen = 0
    for path in sorted(real_data.rglob("*")):
        rel = path.relative_to(real_data).as_posix()
        if path.is_dir() and rel not in EXPECTED:
            continue
        if path.name == "LICENSE.txt":
            continue
        expected = EXPECTED.get(rel)
        if isinstance(expected, str):
            with pytest.raises(FormatError) as info:
                read_volumes(path)
            assert path.name in str(info.value) and info.value.reason.startswith(expected)
        elif expected is not None:
            fmt, shape = expected
            assert detect_format(path) == fmt
            vols = read_volumes(path)
            assert vols[0].shape == shape, rel
            assert vols[0].data.dtype == np.float32
            assert np.isfinite(vols[0].data).all()
        else:  # the many exported B-scan images: one B-scan each, with the image's own size
            assert path.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"), rel
            vol = read_volume(path)
            with Image.open(path) as im:
                assert vol.shape == (1, im.size[1], im.size[0]), rel
        seen += 1
    assert seen >= 80


def test_vendor_specific_metadata_of_real_files(real_data):
    vol = read_volume(real_data / "halirutan_spectralis-raw-data/test-data/Willis_B_716_2.vol")
    assert vol.scan_pattern == "circle" and vol.laterality == "OD" and vol.intensity == "linear"
    assert vol.spacing_mm[2] == pytest.approx(0.01472, abs=1e-5)
    e2e = read_volume(real_data / "DIAGNijmegen_rse-panimg/tests/resources/oct/e2e_minimized.E2E")
    assert e2e.spacing_source in ("default", "estimated")  # E2E stores no lateral scale
    fda = read_volume(real_data / "DIAGNijmegen_rse-panimg/tests/resources/oct/fda_minimized.fda")
    assert fda.vendor == "topcon" and fda.spacing_mm[1] == pytest.approx(0.0035)


def test_detection_ignores_the_extension(tmp_path):
    from octpipe.io.writers.heyex_vol import write_heyex_vol

    p = write_heyex_vol(tmp_path / "scan.dcm", np.ones((1, 8, 4), np.float32), spacing_mm=(0, 0.004, 0.01),
                        laterality="OS")
    assert detect_format(p) == "heyex-vol"
    assert read_volume(p).laterality == "OS"
    (tmp_path / "x.vol").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    assert detect_format(tmp_path / "x.vol") == "image"
    (tmp_path / "zero.vol").write_bytes(b"")
    with pytest.raises(CorruptFileError, match="zero.vol: empty file"):
        detect_format(tmp_path / "zero.vol")
    with pytest.raises(OctpipeError, match="cannot read"):
        detect_format(tmp_path / "missing.vol")


def test_read_volume_series_out_of_range(real_data):
    with pytest.raises(OctpipeError, match="series 3 requested, file has 1"):
        read_volume(real_data / "halirutan_spectralis-raw-data/test-data/valid.vol", series=3)


def test_info_command_prints_geometry_without_identifiers(real_data, capsys):
    path = real_data / "halirutan_spectralis-raw-data/test-data/Willis_B_716_0.vol"
    assert main(["info", str(path), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["format"] == "heyex-vol" and record["shape"] == [1, 496, 768]
    assert record["spacing_source"] == "file" and record["laterality"] == "OD"
    assert record["scan_pattern"] == "line"
    assert set(record["layers"]) >= {"ILM", "BM"}
    assert 0 <= record["intensity_range"][0] < record["intensity_range"][1] <= 1
    raw = path.read_bytes()
    patient_field = raw[140:140 + 24].split(b"\x00")[0].decode("latin-1")  # PatientID in the header
    assert patient_field  # this real file carries one
    strings = [v for v in record.values() if isinstance(v, str)] + list(record["layers"])
    assert not any(patient_field in s for s in strings)
    assert main(["info", str(path)]) == 0
    assert "spacing_mm" in capsys.readouterr().out


def test_info_command_on_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.vol"
    bad.write_bytes(b"HSF-OCT-103")
    assert main(["info", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: bad.vol:") and len(err.splitlines()) == 1
    assert main(["info", str(tmp_path / "nope.vol")]) == 1
