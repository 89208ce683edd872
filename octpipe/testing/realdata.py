"""The real B-scans of ``../shared/data`` and the truth that comes with them.

Used by the slow real-data tests and by ``benchmarks/layers_real.py``. Nothing here is
copied from the data: it reads the files in place (they may not be copied into the
repository) and knows each source's layout and truth:

- ``real/BilalHassan90_OCT-Biomarker-Segmentation``: 20 multi-vendor raw scans whose
  label maps (360x480, resized) give the retina; the ILM is the top edge of the retina
  labels (every label but background 1 and vitreomacular traction 10), rescaled to the raw
  scan. ``OCT Volumes/1``: 19 B-scans of one volume with label maps of the same kind.
- ``real/halirutan_spectralis-raw-data``: Spectralis ``.vol`` with the device's own ILM/BM.
- ``real/DIAGNijmegen_rse-panimg``: one real E2E and one Topcon FDA B-scan.
- ``real/ashkan-abbasi66_OCTseg-Zeiss``: Cirrus optic-nerve-head B-scans with layer masks
  (240 = outside the retina): the ILM is the first retina row.
- ``cohorts/``: OCTDL (Optovue), Kermany OCT2017 (Spectralis) and Kermany B-scans with
  lesion polygons (YOLO segmentation format), see its SOURCES.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = ["RealBscan", "shared_data", "real_bscans", "label_ilm", "zeiss_ilm", "lesion_polygons",
           "rasterise_polygons", "VITREOUS_LESIONS", "LESION_CLASSES"]

#: Classes of the Kermany lesion outlines (``data.yaml``).
LESION_CLASSES = ("intraretinal_cyst", "lamellar_macular_rupture", "neuroepithelium_detachment", "retinal_drusen",
                  "subretinal_fluid", "subretinal_hyperreflective_material", "vitreomacular_traction",
                  "vitreous_detachment")
#: Lesion classes that lie in the vitreous, above the ILM, by definition.
VITREOUS_LESIONS = (6, 7)

_BILAL = "real/BilalHassan90_OCT-Biomarker-Segmentation"
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class RealBscan:
    """One real input: a file with its source, device and the truth available for it.

    ``truth`` is ``"labels"`` (a label map: ILM), ``"device"`` (the file's own ILM/BM),
    ``"zeiss_mask"`` (layer mask: ILM), ``"lesions"`` (lesion polygons) or ``""``.
    """

    path: Path
    source: str
    vendor: str
    truth: str = ""
    truth_path: Path | None = None


def shared_data(start: str | Path | None = None) -> Path | None:
    """``../shared/data`` beside the checkout (or beside ``start``), or None when absent."""
    here = Path(start) if start is not None else Path(__file__).resolve().parents[2]
    for base in (here, *here.parents):
        cand = base.parent / "shared" / "data" if base.name != "shared" else base / "data"
        if (cand / "real").is_dir():
            return cand
    return None


def _natural(name: str) -> list[tuple[int, int | str]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name.lower()) if p]


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES), key=lambda p: _natural(p.name))


def real_bscans(data: Path, *, cohorts: bool = True, per_folder: int | None = None) -> Iterator[RealBscan]:
    """Every real B-scan input under ``data`` (``../shared/data``), with its truth.

    Parameters
    ----------
    data : Path
        The shared data folder (with ``real/`` and ``cohorts/``).
    cohorts : bool
        Include ``cohorts/``.
    per_folder : int, optional
        At most this many files per cohort folder (a fixed sample: the first in
        natural order); all when None.
    """
    bilal = data / _BILAL
    raw = _images(bilal / "Raw Scans")
    labels = {int(m.group(1)): p for p in _images(bilal / "Ground Truth Labels")
              if (m := re.match(r"Label_(\d+)", p.stem))}
    for k, path in enumerate(raw, start=1):
        vendor = path.stem.split("_")[0].lower()
        yield RealBscan(path, "bilalhassan-raw", vendor, "labels" if k in labels else "", labels.get(k))
    vol_dir = bilal / "OCT Volumes" / "1"
    vlabels = {int(m.group(1)): p for p in _images(vol_dir / "Ground Truth Labels")
               if (m := re.match(r"Label_(\d+)", p.stem))}
    for path in _images(vol_dir / "Raw Scans"):
        m = re.search(r"(\d+)", path.stem)
        k = int(m.group(1)) if m else -1
        yield RealBscan(path, "bilalhassan-volume", "unknown", "labels" if k in vlabels else "", vlabels.get(k))
    for path in sorted((data / "real" / "halirutan_spectralis-raw-data" / "test-data").glob("*.vol")):
        yield RealBscan(path, "spectralis-vol", "spectralis", "device")
    panimg = data / "real" / "DIAGNijmegen_rse-panimg" / "tests" / "resources" / "oct"
    for name, vendor in (("e2e_minimized.E2E", "spectralis"), ("fda_minimized.fda", "topcon")):
        if (panimg / name).is_file():
            yield RealBscan(panimg / name, "panimg", vendor)
    zeiss = data / "real" / "ashkan-abbasi66_OCTseg-Zeiss" / "my-example-datasets" / "onh-3subsets"
    for sub in ("train", "eval", "test", "predict"):
        for path in _images(zeiss / sub / "img"):
            mask = zeiss / sub / "mask" / f"{path.stem}.png"
            yield RealBscan(path, "zeiss-onh", "cirrus", "zeiss_mask" if mask.is_file() else "",
                            mask if mask.is_file() else None)
    if not cohorts:
        return
    co = data / "cohorts"
    octdl = co / "code-world-ad_OpticIntel-OCT-Disease-Detection-System" / "dataset"
    for split in ("train", "val"):
        for cls in sorted(p.name for p in (octdl / split).glob("*") if p.is_dir()):
            for path in _images(octdl / split / cls)[:per_folder]:
                yield RealBscan(path, f"octdl-{split}-{cls}", "optovue")
    kermany = co / "Goodsea_heysaw" / "deploy" / "val"
    for cls in sorted(p.name for p in kermany.glob("*") if p.is_dir()):
        for path in _images(kermany / cls)[:per_folder]:
            yield RealBscan(path, f"kermany-{cls}", "spectralis")
    outl = co / "akulistus_oct-segmentation-model" / "annotation" / "YOLO-style-annotations-raw" / "train"
    for path in _images(outl / "images")[:per_folder]:
        lab = outl / "labels" / f"{path.stem}.txt"
        yield RealBscan(path, "kermany-lesions", "spectralis", "lesions" if lab.is_file() else "",
                        lab if lab.is_file() else None)


def label_ilm(label_path: Path, raw_shape: tuple[int, int]) -> npt.NDArray[np.float64]:
    """ILM rows per raw-scan A-scan from a BilalHassan label map (NaN where no retina).

    The ILM is the top edge of the retina labels (label 1 is background, 10 vitreomacular
    traction, which lies above the retina); the label map is resized, so its edge (row
    ``r - 0.5`` of the first retina pixel) is mapped to the raw scan's rows and columns.
    """
    from PIL import Image

    lab = np.asarray(Image.open(label_path))
    if lab.ndim == 3:
        lab = lab[..., 0]
    retina = (lab != 1) & (lab != 10) & (lab != 0)
    h, w = lab.shape
    has = retina.any(axis=0)
    top = np.where(has, np.argmax(retina, axis=0), -1).astype(np.float64)
    edge = np.where(has, top - 0.5, np.nan)  # label-map row coordinate of the edge
    H, W = raw_shape
    edge_raw = (edge + 0.5) * (H / h) - 0.5
    xs = (np.arange(W) + 0.5) * (w / W) - 0.5  # raw column centres in label-map columns
    cols = np.clip(np.round(xs).astype(int), 0, w - 1)
    return edge_raw[cols]


def zeiss_ilm(mask_path: Path) -> npt.NDArray[np.float64]:
    """ILM rows per A-scan from a Zeiss ONH layer mask (240 = outside the retina)."""
    from PIL import Image

    m = np.asarray(Image.open(mask_path))
    if m.ndim == 3:
        m = m[..., 0]
    retina = m != 240
    has = retina.any(axis=0)
    return np.where(has, np.argmax(retina, axis=0) - 0.5, np.nan).astype(np.float64)


def lesion_polygons(label_path: Path) -> list[tuple[int, npt.NDArray[np.float64]]]:
    """(class, vertices) of a YOLO segmentation label file; vertices (n, 2) as (x, y) in [0, 1]."""
    out = []
    for line in Path(label_path).read_text().splitlines():
        parts = line.split()
        if len(parts) < 7:
            continue
        coords = np.asarray([float(v) for v in parts[1:]], dtype=np.float64)
        if coords.size % 2:
            coords = coords[:-1]
        out.append((int(float(parts[0])), coords.reshape(-1, 2)))
    return out


def rasterise_polygons(polygons: list[tuple[int, npt.NDArray[np.float64]]], shape: tuple[int, int],
                       *, exclude: tuple[int, ...] = ()) -> npt.NDArray[np.int16]:
    """Label image (class + 1, 0 = none) of normalised polygons on an image of ``shape`` (H, W)."""
    from PIL import Image, ImageDraw

    h, w = shape
    img = Image.new("I", (w, h), 0)
    draw = ImageDraw.Draw(img)
    for cls, verts in polygons:
        if cls in exclude or len(verts) < 3:
            continue
        pts = [(float(x * w - 0.5), float(y * h - 0.5)) for x, y in verts]
        draw.polygon(pts, fill=cls + 1)
    return np.asarray(img, dtype=np.int32).astype(np.int16)
