"""Mutation fuzzing of the readers: seeds in every format, mutations, and one guarded read per case.

A *seed* is a valid file in one format (a phantom written by octpipe's writers, or a
real vendor file) with what is known about its structure: header boundaries (where a
truncation is most interesting), the offsets of integer fields that hold sizes
(rows, columns, B-scans, chunk lengths) and the byte ranges of float pixels. A
*mutation* truncates the file, flips bits, overwrites a size field with an extreme
value or writes NaN/Inf into the pixels. :func:`run_case` writes the mutated bytes to
a file, runs format detection and the reader through :func:`octpipe.io.read_volumes`
with a time limit and measures the peak Python/NumPy allocation (``tracemalloc``), and
classifies the outcome:

``ok``            a valid volume was read (finite where valid, non-empty, 3-D float32)
``error``         an :class:`~octpipe.errors.OctpipeError` raised by the reader itself
``error_wrapped`` an OctpipeError made by :func:`~octpipe.io.read_volumes` from an
                  unforeseen exception of the reader (still one line, but a reader gap)
``crash``         any other exception (a bug)
``hang``          the time limit ran out (a bug)
``oversize``      the peak allocation exceeded the budget (a bug)
``bad_volume``    a read that "succeeded" with an invalid volume (a bug)

The tests (``tests/io/test_fuzz.py``) drive mutations with hypothesis; the benchmark
(``benchmarks/fuzz.py``) with a seeded :class:`random.Random` and writes the counts.
"""

from __future__ import annotations

import gzip
import math
import random
import signal
import struct
import tempfile
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from octpipe.errors import OctpipeError

__all__ = ["Seed", "Mutation", "Outcome", "OUTCOMES", "BAD_OUTCOMES", "READER_FORMATS", "EXTREME_INTS",
           "build_seeds", "apply_mutation", "random_mutation", "run_case", "baseline_peak"]

#: Every outcome :func:`run_case` can return; the last four are bugs.
OUTCOMES = ("ok", "error", "error_wrapped", "crash", "hang", "oversize", "bad_volume")
BAD_OUTCOMES = ("crash", "hang", "oversize", "bad_volume")

#: reader module -> formats it reads (the fuzz report groups by reader module).
READER_FORMATS = {
    "heyex_vol": ("heyex-vol",),
    "heyex_e2e": ("heyex-e2e",),
    "heyex_xml": ("heyex-xml",),
    "dicom": ("dicom",),
    "nifti": ("nifti",),
    "images": ("image",),
    "octconverter": ("topcon-fda", "topcon-fds"),
}

#: Values written into size fields: zero, negative, largest, and just-too-large ones.
EXTREME_INTS = (0, 1, -1, -2, 2, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 4096, 8193,
                100000)

_NAN_INF = (float("nan"), float("inf"), float("-inf"), 3.4028235e38, -3.4028235e38, 1e30)


@dataclass
class Seed:
    """A valid file to mutate, with what is known of its structure."""

    name: str
    reader: str
    format: str
    data: bytes
    suffix: str
    #: Offsets where a header or chunk ends (truncation points).
    boundaries: list[int] = field(default_factory=list)
    #: ``(offset, size_bytes, signed, byteorder)`` of integer size fields.
    int_fields: list[tuple[int, int, bool, str]] = field(default_factory=list)
    #: ``(start, stop)`` byte ranges of little-endian float32 pixels.
    float_regions: list[tuple[int, int]] = field(default_factory=list)
    #: Other files that go beside the mutated one (the images of an XML export).
    extra_files: dict[str, bytes] = field(default_factory=dict)
    #: Name of the mutated file in its folder.
    filename: str = ""

    def __post_init__(self) -> None:
        if not self.filename:
            self.filename = f"case{self.suffix}"
        n = len(self.data)
        self.boundaries = sorted({b for b in self.boundaries if 0 <= b <= n} | {0, 1, n - 1})
        self.int_fields = [f for f in self.int_fields if f[0] + f[1] <= n]
        self.float_regions = [(a, min(b, n)) for a, b in self.float_regions if b - a >= 4 and a < n]


@dataclass(frozen=True)
class Mutation:
    """One mutation: ``kind`` in truncate, bitflip, int_field, nan_pixels, splice."""

    kind: str
    params: tuple = ()

    def describe(self) -> str:
        """One line naming the mutation."""
        return f"{self.kind}{self.params}"


@dataclass(frozen=True)
class Outcome:
    """What one fuzz case ended in."""

    kind: str
    detail: str = ""
    peak_bytes: int = 0
    seconds: float = 0.0


# --------------------------------------------------------------------------- mutations


def apply_mutation(seed: Seed, mutation: Mutation) -> bytes:
    """Return the seed's bytes with ``mutation`` applied (the seed is not changed)."""
    data = bytearray(seed.data)
    kind, p = mutation.kind, mutation.params
    if kind == "truncate":
        return bytes(data[: p[0]])
    if kind == "bitflip":
        for pos, bit in p:
            data[pos % len(data)] ^= 1 << (bit % 8)
        return bytes(data)
    if kind == "int_field":
        index, value = p
        offset, size, signed, order = seed.int_fields[index % len(seed.int_fields)]
        bits = 8 * size
        value = value % (1 << bits)  # two's complement for negatives
        if signed and value >= 1 << (bits - 1):
            value -= 1 << bits
        data[offset:offset + size] = value.to_bytes(size, order, signed=signed)
        return bytes(data)
    if kind == "nan_pixels":
        index, frac, value, count = p
        start, stop = seed.float_regions[index % len(seed.float_regions)]
        n = (stop - start) // 4
        first = start + 4 * int(frac * max(n - count, 0))
        packed = struct.pack("<f", value)
        for k in range(min(count, n)):
            data[first + 4 * k:first + 4 * k + 4] = packed
        return bytes(data)
    if kind == "splice":  # overwrite a run of bytes with a constant (zeros, 0xFF)
        pos, length, byte = p
        pos %= len(data)
        data[pos:pos + length] = bytes([byte]) * len(data[pos:pos + length])
        return bytes(data)
    raise ValueError(f"unknown mutation kind {kind!r}")


def mutation_kinds(seed: Seed) -> list[str]:
    """The mutation kinds that apply to ``seed``."""
    kinds = ["truncate", "bitflip", "splice"]
    if seed.int_fields:
        kinds.append("int_field")
    if seed.float_regions:
        kinds.append("nan_pixels")
    return kinds


def random_mutation(seed: Seed, rng: random.Random) -> Mutation:
    """A random mutation of ``seed`` (the benchmark's driver; the tests use hypothesis)."""
    kind = rng.choice(mutation_kinds(seed))
    n = len(seed.data)
    if kind == "truncate":
        at = rng.choice(seed.boundaries) if rng.random() < 0.7 else rng.randrange(n)
        return Mutation(kind, (max(0, min(n - 1, at + rng.choice((0, 0, -1, 1)))),))
    if kind == "bitflip":
        head = min(n, 4096)
        flips = tuple((rng.randrange(head) if rng.random() < 0.7 else rng.randrange(n), rng.randrange(8))
                      for _ in range(rng.randint(1, 8)))
        return Mutation(kind, flips)
    if kind == "int_field":
        value = rng.choice(EXTREME_INTS) if rng.random() < 0.8 else rng.randrange(-(1 << 31), 1 << 32)
        return Mutation(kind, (rng.randrange(len(seed.int_fields)), value))
    if kind == "nan_pixels":
        return Mutation(kind, (rng.randrange(len(seed.float_regions)), rng.random(), rng.choice(_NAN_INF),
                               rng.choice((1, 7, 64, 1 << 20))))
    return Mutation(kind, (rng.randrange(n), rng.choice((1, 4, 16, 256)), rng.choice((0, 0xFF))))


# --------------------------------------------------------------------------- one case


class _Timeout(BaseException):
    """Raised by the alarm inside a reader that ran past its time limit."""


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _write_case(seed: Seed, data: bytes, folder: Path) -> Path:
    for name, content in seed.extra_files.items():
        target = folder / name
        if not target.exists():
            target.write_bytes(content)
    path = folder / seed.filename
    path.write_bytes(data)
    return path


def _check_volumes(volumes: Sequence[object]) -> str:
    """Empty string when every volume is valid, else what is wrong."""
    from octpipe.volume import OctVolume

    for vol in volumes:
        if not isinstance(vol, OctVolume):
            return f"reader returned {type(vol).__name__}"
        data = vol.data
        if data.ndim != 3 or min(data.shape) < 1:
            return f"shape {data.shape}"
        if data.dtype != np.float32:
            return f"dtype {data.dtype}"
        valid = data if vol.invalid is None else data[~vol.invalid]
        if not np.isfinite(valid).all():
            return "non-finite pixels not marked invalid"
        if not all(math.isfinite(s) and s >= 0 for s in vol.spacing_mm):
            return f"spacing {vol.spacing_mm}"
    return ""


def run_case(seed: Seed, data: bytes, *, folder: str | Path | None = None, timeout_s: float = 20.0,
             budget_bytes: int | None = None) -> Outcome:
    """Write ``data`` as the seed's file, detect its format and read it; classify what happened.

    Parameters
    ----------
    seed : Seed
        The seed the bytes came from (format, file name, files that go beside it).
    data : bytes
        The (mutated) file content.
    folder : path, optional
        Where to write the case; default a new temporary folder, removed afterwards.
    timeout_s : float
        Time limit of the read; past it the outcome is ``hang``.
    budget_bytes : int, optional
        Largest allowed peak allocation during the read; above it the outcome is
        ``oversize`` (default: no limit).

    Returns
    -------
    Outcome
    """
    from octpipe.io import read_volumes
    from octpipe.io.detect import detect_format

    if folder is None:
        with tempfile.TemporaryDirectory(prefix="octpipe-fuzz-") as tmp:
            return run_case(seed, data, folder=tmp, timeout_s=timeout_s, budget_bytes=budget_bytes)
    path = _write_case(seed, data, Path(folder))
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    kind, detail = "ok", ""
    try:
        with _time_limit(timeout_s):
            try:
                detect_format(path)
            except OctpipeError:
                pass
            volumes = read_volumes(path, format=seed.format)
        bad = _check_volumes(volumes)
        if bad:
            kind, detail = "bad_volume", bad
        del volumes
    except _Timeout:
        kind, detail = "hang", f"no result within {timeout_s} s"
    except OctpipeError as exc:
        text = str(exc)
        kind = "error_wrapped" if " reader failed: " in text else "error"
        detail = text
        if "\n" in text:
            kind, detail = "crash", f"multi-line OctpipeError: {text!r}"
    except Exception as exc:  # noqa: BLE001 - classifying is the point
        kind, detail = "crash", f"{type(exc).__name__}: {exc}"
    finally:
        peak = tracemalloc.get_traced_memory()[1] - base
        if not was_tracing:
            tracemalloc.stop()
        path.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    if budget_bytes is not None and peak > budget_bytes and kind not in ("crash", "hang"):
        kind, detail = "oversize", f"peak {peak} bytes > budget {budget_bytes} ({kind}: {detail})"
    return Outcome(kind, detail.splitlines()[0][:300] if detail else "", peak, seconds)


def baseline_peak(seed: Seed) -> int:
    """Peak allocation of reading the unmutated seed (raises if the seed itself does not read)."""
    out = run_case(seed, seed.data)
    if out.kind != "ok":
        raise RuntimeError(f"seed {seed.name} does not read cleanly: {out.kind} {out.detail}")
    return out.peak_bytes


# --------------------------------------------------------------------------- seeds


def _find_ints(data: bytes, values: Sequence[int], *, limit: int, sizes: Sequence[int] = (2, 4),
               orders: Sequence[str] = ("little",)) -> list[tuple[int, int, bool, str]]:
    """Offsets in ``data[:limit]`` of ``values`` stored as aligned-or-not unsigned ints (size fields)."""
    found = []
    head = data[:limit]
    for size in sizes:
        for order in orders:
            for v in set(values):
                if not 0 < v < 1 << (8 * size):
                    continue
                needle = v.to_bytes(size, order)
                start = head.find(needle)
                while start >= 0 and len(found) < 400:
                    found.append((start, size, False, order))
                    start = head.find(needle, start + 1)
    return sorted(set(found))


def _vol_seed(name: str, data: bytes) -> Seed:
    from octpipe.io import heyex_vol as hv

    header = hv.unpack(hv._FILE_HEADER_FIELDS, hv._FILE_STRUCT, data)
    offsets, pos = {}, 0
    for f in hv._FILE_HEADER_FIELDS:
        offsets[f.name] = pos
        pos += struct.calcsize("<" + f.fmt)
    size_x, size_z, n = int(header["SizeX"]), int(header["SizeZ"]), int(header["NumBScans"])
    slo = int(header["SizeXSlo"]) * int(header["SizeYSlo"])
    hdr = int(header["BScanHdrSize"])
    bounds = sorted(offsets.values()) + [2048, 2048 + slo]
    ints = [(offsets[k], 4, False, "little") for k in ("SizeX", "NumBScans", "SizeZ", "SizeXSlo", "SizeYSlo",
                                                      "BScanHdrSize", "ScanPattern")]
    floats = []
    pos = 2048 + slo
    for i in range(n):
        bounds += [pos + 12, pos + 16, pos + 48, pos + 56, pos + 256, pos + hdr]
        if i < 2:
            ints += [(pos + 12, 4, False, "little"), (pos + 48, 4, False, "little"), (pos + 52, 4, False, "little")]
        floats.append((pos + 256, pos + 256 + 2 * 4 * size_x))  # boundary rows
        pos += hdr
        floats.append((pos, pos + 4 * size_x * size_z))
        bounds.append(pos + 4 * size_x * size_z)
        pos += 4 * size_x * size_z
    return Seed(name, "heyex_vol", "heyex-vol", data, ".vol", bounds, ints, floats)


def _e2e_seed(name: str, data: bytes) -> Seed:
    """E2E: every chunk header and directory entry found by its magic; ints are the header fields."""
    bounds, ints = [36, 88], []
    for magic in (b"MDbData\0", b"MDbDir\0", b"MDbMDir\0"):
        pos = data.find(magic)
        while pos >= 0:
            bounds += [pos, pos + 12, pos + 60]
            if len(ints) < 300:
                # chunk header fields after the 12-byte magic are uint32s (pos, size, ids, type...)
                ints += [(pos + k, 4, False, "little") for k in range(12, 60, 4)]
            pos = data.find(magic, pos + 1)
    # image chunk headers: size, type, n_values, height, width (after the 60-byte chunk header)
    return Seed(name, "heyex_e2e", "heyex-e2e", data, ".E2E", bounds, ints, [])


def _dicom_seed(name: str, data: bytes) -> Seed:
    """DICOM (explicit VR little endian): every element end is a boundary; Rows, Columns, bits are size fields."""
    bounds, ints, pos = [128, 132], [], 132
    long_vrs = {b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"OD", b"OL", b"OV", b"UC", b"UR"}
    sizes = {0x00280010, 0x00280011, 0x00280100, 0x00280101, 0x00280002, 0x00280103, 0x00280008}
    while pos + 8 <= len(data) and len(bounds) < 2000:
        group, elem = struct.unpack_from("<HH", data, pos)
        tag = group << 16 | elem
        if group == 0xFFFE:  # item / delimiters: tag + uint32 length, step inside
            pos += 8
            bounds.append(pos)
            continue
        vr = data[pos + 4:pos + 6]
        if vr in long_vrs:
            length = struct.unpack_from("<I", data, pos + 8)[0]
            head = 12
        else:
            length = struct.unpack_from("<H", data, pos + 6)[0]
            head = 8
            ints.append((pos + 6, 2, False, "little"))  # the element's own length field
        if tag in sizes:
            ints.append((pos + head, min(2, max(length, 1)), False, "little"))
        if vr == b"SQ" or length == 0xFFFFFFFF:
            pos += head
        else:
            pos += head + length
        bounds.append(pos)
    return Seed(name, "dicom", "dicom", data, ".dcm", bounds, ints[:400], [])


def _nifti_seed(name: str, data: bytes, compressed: bool) -> Seed:
    # NIfTI-1 header field offsets (bytes): sizeof_hdr 0, dim 40 (8 int16), datatype 70, bitpix 72,
    # pixdim 76 (8 float32), vox_offset 108 (float32), scl_slope 112, scl_inter 116, magic 344
    bounds = [4, 40, 56, 70, 72, 76, 108, 112, 120, 148, 228, 252, 344, 348, 352]
    ints = [(40 + 2 * k, 2, True, "little") for k in range(8)] + [(70, 2, True, "little"), (72, 2, True, "little"),
                                                                   (0, 4, True, "little")]
    floats = [(76, 108), (108, 112), (112, 120), (352, len(data))]
    if compressed:  # mutate the compressed bytes: truncation and flips only (plus re-compressed variants)
        return Seed(name, "nifti", "nifti", data, ".nii.gz", [10, len(data) // 2], [], [])
    return Seed(name, "nifti", "nifti", data, ".nii", bounds, ints, floats)


def _png_seed(name: str, data: bytes) -> Seed:
    bounds, ints, pos = [8], [], 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        ctype = data[pos + 4:pos + 8]
        bounds += [pos + 4, pos + 8, pos + 8 + length, pos + 12 + length]
        if ctype == b"IHDR":
            ints += [(pos + 8, 4, False, "big"), (pos + 12, 4, False, "big"), (pos + 16, 1, False, "big"),
                     (pos + 17, 1, False, "big")]
        ints.append((pos, 4, False, "big"))
        pos += 12 + length
    return Seed(name, "images", "image", data, ".png", bounds, ints, [])


def _tiff_seed(name: str, data: bytes, shape: tuple[int, int]) -> Seed:
    ints = _find_ints(data, list(shape), limit=len(data) if len(data) < 4096 else 4096, sizes=(2, 4))
    return Seed(name, "images", "image", data, ".tif", [8, 16], ints, [])


def _topcon_seed(name: str, fmt: str, data: bytes) -> Seed:
    # 15-byte header (FOCT, type, versions), then chunks: uint8 name length, name, uint32 size, payload
    bounds, ints, pos = [4, 7, 11, 15], [], 15
    seen = 0
    while pos + 1 < len(data) and seen < 200:
        n = data[pos]
        if n == 0:
            break
        size_at = pos + 1 + n
        if size_at + 4 > len(data):
            break
        size = int.from_bytes(data[size_at:size_at + 4], "little")
        bounds += [pos + 1, size_at, size_at + 4, size_at + 4 + size]
        ints.append((size_at, 4, False, "little"))
        # the first image header words of each chunk (types, B-scan counts, height, width)
        ints += [(size_at + 5 + k, 4, False, "little") for k in range(0, 24, 4)
                 if size_at + 9 + k <= len(data)]
        pos = size_at + 4 + size
        seen += 1
    return Seed(name, "octconverter", fmt, data, "." + fmt.split("-")[1], bounds, ints, [])


def _xml_seed(name: str, folder: Path, shape: tuple[int, int, int]) -> Seed:
    xml = (folder / "export.xml").read_bytes()
    extra = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "export.xml" and p.is_file()}
    bounds, ints = [], []
    pos = xml.find(b"<")
    while pos >= 0:
        bounds.append(pos)
        pos = xml.find(b"<", pos + 1)
    # numbers in the XML text: overwrite digits of Width/Height/NumImages-like fields
    for tag in (b"<Width>", b"<Height>", b"<NumImages>", b"<ScaleX>", b"<ScaleY>", b"<Distance>"):
        p = xml.find(tag)
        while p >= 0 and len(ints) < 60:
            ints.append((p + len(tag), 1, False, "little"))
            p = xml.find(tag, p + 1)
    return Seed(name, "heyex_xml", "heyex-xml", xml, ".xml", bounds, ints, [], extra_files=extra,
                filename="export.xml")


def build_seeds(workdir: str | Path, *, real_dir: str | Path | None = None,
                include_real: bool = True) -> dict[str, list[Seed]]:
    """Write small phantom files in every reader's format and collect real files; return seeds per reader.

    Parameters
    ----------
    workdir : path
        Scratch folder for the phantom files.
    real_dir : path, optional
        ``shared/data/real``; its Spectralis ``.vol``, E2E, Topcon and PNG files are added
        when present.
    include_real : bool
        Add the real files (default true).

    Returns
    -------
    dict
        Reader module name -> seeds.
    """
    from octpipe.io.nifti import write_nifti
    from octpipe.io.writers.dicom import write_dicom_opt
    from octpipe.io.writers.heyex_vol import write_heyex_vol
    from octpipe.io.writers.heyex_xml import write_heyex_xml
    from octpipe.preprocess.intensity import linear_to_display
    from octpipe.testing.heyex_e2e_files import write_heyex_e2e_minimal

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shape = (3, 24, 16)
    linear = (rng.random(shape) * 0.5 + 0.01).astype(np.float32)
    layers = {"ILM": np.full(shape[::2], 5.0), "BM": np.full(shape[::2], 18.0)}
    display = linear_to_display(linear)
    u8 = np.round(display * 255).astype(np.uint8)
    seeds: dict[str, list[Seed]] = {k: [] for k in READER_FORMATS}

    vol = write_heyex_vol(work / "p.vol", linear, spacing_mm=(0.12, 0.0039, 0.011), laterality="OD", layers=layers,
                          slo=np.zeros((8, 8), np.uint8), overwrite=True)
    seeds["heyex_vol"].append(_vol_seed("phantom.vol", vol.read_bytes()))

    e2e = write_heyex_e2e_minimal(work / "p.E2E", [linear, linear[:2]], lateralities=["OD", "OS"],
                                  layers=[{0: layers["ILM"], 1: layers["BM"]}, None], overwrite=True)
    seeds["heyex_e2e"].append(_e2e_seed("phantom.E2E", e2e.read_bytes()))

    xml_dir = work / "xml"
    write_heyex_xml(xml_dir, u8, spacing_mm=(0.12, 0.0039, 0.011), laterality="OS", layers=layers, overwrite=True)
    seeds["heyex_xml"].append(_xml_seed("phantom-export.xml", xml_dir, shape))

    dcm = write_dicom_opt(work / "p.dcm", u8, spacing_mm=(0.12, 0.0039, 0.011), laterality="OD",
                          patient_id="fuzz", overwrite=True)
    seeds["dicom"].append(_dicom_seed("phantom.dcm", dcm.read_bytes()))

    nii = write_nifti(work / "p.nii", display, spacing_mm=(0.12, 0.0039, 0.011), overwrite=True)
    seeds["nifti"].append(_nifti_seed("phantom.nii", nii.read_bytes(), compressed=False))
    niigz = work / "p.nii.gz"
    niigz.write_bytes(gzip.compress(nii.read_bytes(), mtime=0))
    seeds["nifti"].append(_nifti_seed("phantom.nii.gz", niigz.read_bytes(), compressed=True))

    from PIL import Image

    png = work / "p.png"
    Image.fromarray(u8[0]).save(png)
    seeds["images"].append(_png_seed("phantom.png", png.read_bytes()))
    tif = work / "p.tif"
    Image.fromarray(u8[1]).save(tif)
    seeds["images"].append(_tiff_seed("phantom.tif", tif.read_bytes(), u8.shape[1:]))

    if include_real and real_dir is not None and Path(real_dir).is_dir():
        real = Path(real_dir)
        v = real / "halirutan_spectralis-raw-data" / "test-data" / "valid.vol"
        if v.is_file():
            seeds["heyex_vol"].append(_vol_seed("real:valid.vol", v.read_bytes()))
        oct_dir = real / "DIAGNijmegen_rse-panimg" / "tests" / "resources" / "oct"
        if (oct_dir / "e2e_minimized.E2E").is_file():
            seeds["heyex_e2e"].append(_e2e_seed("real:e2e_minimized.E2E", (oct_dir / "e2e_minimized.E2E").read_bytes()))
        for fname, fmt in (("fda_minimized.fda", "topcon-fda"), ("fds_minimized.fds", "topcon-fds")):
            if (oct_dir / fname).is_file():
                seeds["octconverter"].append(_topcon_seed(f"real:{fname}", fmt, (oct_dir / fname).read_bytes()))
        p = real / "ashkan-abbasi66_OCTseg-Zeiss" / "my-example-datasets" / "onh-3subsets" / "test" / "img"
        p = p / "im0100.png"
        if p.is_file():
            seeds["images"].append(_png_seed("real:im0100.png", p.read_bytes()))
    return seeds
