"""Heyex XML export reader/writer: round trip, eyepy cross-check, privacy, errors."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from octpipe.errors import CorruptFileError, FormatError, OctpipeError, UnsupportedFormatError
from octpipe.io.heyex_xml import _layer_values, _scan_pattern, read_heyex_xml
from octpipe.io.writers.heyex_xml import write_heyex_xml

SPACING = (0.123, 0.0039, 0.0118)


def _volume(n: int = 4, rows: int = 40, cols: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, rows, cols), dtype=np.uint8)
    ilm = (10 + rng.random((n, cols)) * 5).astype(np.float32)
    bm = (28 + rng.random((n, cols)) * 5).astype(np.float32)
    bm[-1, 3] = np.nan
    return data, {"ILM": ilm, "BM": bm}


@pytest.fixture
def export(tmp_path: Path):
    data, layers = _volume()
    xml = write_heyex_xml(tmp_path / "exp", data, spacing_mm=SPACING, laterality="OS", layers=layers)
    return xml, data, layers


def _edit(xml: Path, edit) -> None:
    tree = ET.parse(xml)
    edit(tree.getroot())
    tree.write(xml, encoding="utf-8", xml_declaration=True)


def _octs(root: ET.Element) -> list[ET.Element]:
    return [i for i in root.iter("Image") if i.findtext("ImageType/Type") == "OCT"]


# --------------------------------------------------------------------------- round trip


def test_round_trip(export):
    xml, data, layers = export
    vol = read_heyex_xml(xml)
    assert vol.shape == data.shape
    assert vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.data, data.astype(np.float32))
    np.testing.assert_allclose(vol.spacing_mm, SPACING, atol=1e-6)
    assert vol.spacing_source == "file"
    assert vol.laterality == "OS"
    assert vol.vendor == "heidelberg"
    assert vol.intensity == "display"
    assert vol.scan_pattern == "volume"
    assert vol.bscan_order == "inferior_first"
    assert set(vol.layers) == {"ILM", "BM"}
    for name, rows in layers.items():
        np.testing.assert_array_equal(vol.layers[name], rows)  # exact, NaN included
    assert vol.meta["bit_depth"] == 8
    assert vol.meta["n_bscans"] == 4 and vol.meta["num_images"] == 5
    assert vol.meta["localizer"]["present"] is True and vol.meta["localizer"]["shape"] == (256, 256)
    assert len(vol.meta["bscan_start_mm"]) == 4
    starts_y = [y for _, y in vol.meta["bscan_start_mm"]]
    assert starts_y == sorted(starts_y, reverse=True)
    assert vol.provenance.reader == "heyex_xml" and vol.provenance.format == "heyex-xml"
    assert vol.volume_id.startswith("v")


def test_tif_images_single_bscan_and_od(tmp_path):
    data, layers = _volume(n=1)
    xml = write_heyex_xml(tmp_path, data, spacing_mm=(0.0, 0.0039, 0.0118), laterality="OD",
                          layers=layers, image_format="tif")
    vol = read_heyex_xml(xml)
    np.testing.assert_array_equal(vol.data, data.astype(np.float32))
    assert vol.laterality == "OD"
    assert vol.scan_pattern == "line"
    assert vol.spacing_mm[0] == 0.0
    assert vol.meta["image_format"] == "tiff"


def test_hash_covers_images(export):
    xml, data, _ = export
    before = read_heyex_xml(xml).provenance.sha256
    Image.fromarray(np.zeros(data.shape[1:], np.uint8)).save(xml.parent / "bscan_002.png")
    assert read_heyex_xml(xml).provenance.sha256 != before


def test_heyex_style_urls_resolve_case_insensitively(export):
    xml, data, _ = export
    (xml.parent / "bscan_001.png").rename(xml.parent / "BSCAN_001.PNG")

    def edit(root):
        url = _octs(root)[0].find("ImageData/ExamURL")
        url.text = "file:///\\\\domain\\folder\\Bscan_000.png"

    _edit(xml, edit)
    vol = read_heyex_xml(xml)
    np.testing.assert_array_equal(vol.data, data.astype(np.float32))


def test_invalid_layer_values_and_missing_layer(export):
    xml, _, layers = export

    def edit(root):
        octs = _octs(root)
        seg = octs[2].find("Segmentation")
        seg.remove(seg.findall("SegLine")[1])  # BM of B-scan 2
        array = octs[0].find("Segmentation/SegLine/Array")
        values = array.text.split()
        values[:4] = ["3e+038", "-1", "nan", "1e39"]
        array.text = " ".join(values)

    _edit(xml, edit)
    vol = read_heyex_xml(xml)
    assert np.isnan(vol.layers["BM"][2]).all()
    np.testing.assert_array_equal(vol.layers["BM"][3], layers["BM"][3])
    assert np.isnan(vol.layers["ILM"][0, :4]).all()
    np.testing.assert_array_equal(vol.layers["ILM"][0, 4:], layers["ILM"][0, 4:])


def test_layer_values_parser():
    out = _layer_values("1.5 3e+038 -1 nan inf 2", 6, "x", Path("a.xml"))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(out), [False, True, True, True, True, False])
    with pytest.raises(CorruptFileError, match="has 2 values"):
        _layer_values("1 2", 3, "x", Path("a.xml"))


def test_scan_pattern_from_geometry():
    # parallel raster, ordered top to bottom -> volume
    starts = [(0.0, 1.0 + 0.1 * i) for i in range(5)]
    ends = [(6.0, 1.0 + 0.1 * i) for i in range(5)]
    assert _scan_pattern(starts, ends, 6.0) == "volume"
    # radial: 6 lines through one centre
    angles = [math.pi * k / 6 for k in range(6)]
    starts = [(4 - 3 * math.cos(a), 4 - 3 * math.sin(a)) for a in angles]
    ends = [(4 + 3 * math.cos(a), 4 + 3 * math.sin(a)) for a in angles]
    assert _scan_pattern(starts, ends, 6.0) == "radial"
    # circle: End is the centre, extent is the circumference
    r = 1.75
    assert _scan_pattern([(4 + r, 4.0)], [(4.0, 4.0)], 2 * math.pi * r) == "circle"
    assert _scan_pattern([(4.0, 4.0)], [(4.0, 4.0)], 11.0) == "circle"
    assert _scan_pattern([(1.0, 4.0)], [(7.0, 4.0)], 6.0) == "line"


def test_superior_first_order(export):
    xml, _, _ = export

    def edit(root):
        for img in _octs(root):
            for tag in ("Start", "End"):
                y = img.find(f"OphthalmicAcquisitionContext/{tag}/Coord/Y")
                y.text = repr(10.0 - float(y.text))

    _edit(xml, edit)
    vol = read_heyex_xml(xml)
    assert vol.bscan_order == "superior_first"
    assert vol.spacing_mm[0] == pytest.approx(SPACING[0], abs=1e-6)


# --------------------------------------------------------------------------- eyepy cross-check


def test_eyepy_reads_our_export(export):
    ep = pytest.importorskip("eyepy")
    xml, data, layers = export
    ev = ep.import_heyex_xml(xml)
    assert ev.shape == data.shape
    assert ev.scale_x == pytest.approx(SPACING[2])
    assert ev.scale_y == pytest.approx(SPACING[1])
    assert ev.scale_z == pytest.approx(SPACING[0], abs=1e-6)
    assert ev.laterality == "OS"
    for name in ("ILM", "BM"):
        np.testing.assert_allclose(ev.layers[name].data, layers[name], equal_nan=True)


# --------------------------------------------------------------------------- privacy


def test_patient_fields_never_leak(tmp_path):
    data, layers = _volume(n=2)
    patient = {"LastName": "Doe^Jane-SECRET", "FirstNames": "Janet-SECRET", "BirthDate": "1961-07-23",
               "PatientID": "PID-SECRET-4711"}
    xml = write_heyex_xml(tmp_path, data, spacing_mm=SPACING, laterality="OD", layers=layers, patient=patient)
    text = xml.read_text(encoding="utf-8")
    assert "Doe^Jane-SECRET" in text and "1961" in text and "PID-SECRET-4711" in text
    vol = read_heyex_xml(xml)
    dumped = repr(vol) + str(vars(vol)) + repr(vol.meta) + repr(vol.provenance)
    for needle in ("SECRET", "Doe", "Jane", "1961-07-23", "PID-", "4711", "bscan_0"):
        assert needle not in dumped


def test_writer_rejects_bad_arguments(tmp_path):
    data, _ = _volume(n=2)
    with pytest.raises(ValueError, match="uint8"):
        write_heyex_xml(tmp_path, data.astype(np.float32), spacing_mm=SPACING, laterality="OD")
    with pytest.raises(ValueError, match="laterality"):
        write_heyex_xml(tmp_path, data, spacing_mm=SPACING, laterality="R")
    with pytest.raises(ValueError, match="patient keys"):
        write_heyex_xml(tmp_path, data, spacing_mm=SPACING, laterality="OD", patient={"Name": "x"})
    with pytest.raises(ValueError, match="between B-scans"):
        write_heyex_xml(tmp_path, data, spacing_mm=(0.0, 0.0039, 0.0118), laterality="OD")
    write_heyex_xml(tmp_path, data, spacing_mm=SPACING, laterality="OD")
    with pytest.raises(OctpipeError, match="overwrite"):
        write_heyex_xml(tmp_path, data, spacing_mm=SPACING, laterality="OD")
    write_heyex_xml(tmp_path, data, spacing_mm=SPACING, laterality="OD", overwrite=True)


# --------------------------------------------------------------------------- errors


def test_missing_image_named(export):
    xml, _, _ = export
    (xml.parent / "bscan_001.png").unlink()
    with pytest.raises(CorruptFileError) as info:
        read_heyex_xml(xml)
    assert "bscan_001.png" in str(info.value) and "export.xml" in str(info.value)


@pytest.mark.parametrize("prolog", [
    '<!DOCTYPE HEDX>',
    '<!DOCTYPE HEDX [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>',
])
def test_doctype_and_entities_refused(export, prolog):
    xml, _, _ = export
    text = xml.read_text(encoding="utf-8")
    head, rest = text.split("\n", 1)
    xml.write_text(f"{head}\n{prolog}\n{rest}", encoding="utf-8")
    with pytest.raises(FormatError, match="DOCTYPE|ENTITY"):
        read_heyex_xml(xml)


@pytest.mark.parametrize("content", [b"<root><a>1</a></root>", b"<HEDX><HEAD/></HEDX>", b"\x00\x01HSF-OCT-103",
                                     b"just some text", b"<not xml", b""])
def test_not_heyex_xml(tmp_path, content):
    path = tmp_path / "x.xml"
    path.write_bytes(content)
    with pytest.raises(FormatError) as info:
        read_heyex_xml(path)
    assert "x.xml" in str(info.value)


def test_truncated_xml(export):
    xml, _, _ = export
    raw = xml.read_bytes()
    xml.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(OctpipeError) as info:
        read_heyex_xml(xml)
    assert str(info.value).startswith("export.xml: ")


def test_images_of_different_sizes(export):
    xml, data, _ = export
    Image.fromarray(np.zeros((data.shape[1], data.shape[2] + 3), np.uint8)).save(xml.parent / "bscan_002.png")
    with pytest.raises(CorruptFileError, match="bscan_002.png.*35x40"):
        read_heyex_xml(xml)


def test_xml_size_disagrees_with_images(export):
    xml, _, _ = export
    _edit(xml, lambda root: setattr(_octs(root)[0].find("OphthalmicAcquisitionContext/Width"), "text", "64"))
    with pytest.raises(CorruptFileError, match="XML says 64x40"):
        read_heyex_xml(xml)


def test_num_images_mismatch(export):
    xml, _, _ = export
    _edit(xml, lambda root: setattr(root.find(".//NumImages"), "text", "7"))
    with pytest.raises(CorruptFileError, match="NumImages says 7"):
        read_heyex_xml(xml)


def test_absurd_image_count_refused_before_reading_images(export):
    xml, _, _ = export

    def edit(root):
        series = root.find(".//Series")
        template = _octs(root)[0]
        for _ in range(4100):
            series.append(template)

    _edit(xml, edit)
    for png in xml.parent.glob("bscan_*.png"):
        png.unlink()
    with pytest.raises(CorruptFileError, match="at most 4096"):
        read_heyex_xml(xml)


def test_no_oct_images(export):
    xml, _, _ = export

    def edit(root):
        series = root.find(".//Series")
        for img in _octs(root):
            series.remove(img)
        series.find("NumImages").text = "1"

    _edit(xml, edit)
    with pytest.raises(UnsupportedFormatError, match="no OCT"):
        read_heyex_xml(xml)
