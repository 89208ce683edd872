"""OME-NGFF (OME-Zarr) 0.5 metadata for the volumes of a store.

A volume group ``STORE.zarr/volumes/<volume_id>`` is an OME-Zarr image: its group
attributes hold ``"ome": {"version": "0.5", "multiscales": [...]}`` describing the
``image`` array (axes z, y, x of type ``space`` in millimetres, one scale per axis), so
napari (napari-ome-zarr) and other NGFF viewers open the group directly. The store is
Zarr v3, hence NGFF 0.5 (https://ngff.openmicroscopy.org/0.5/), which also requires the
array's Zarr ``dimension_names`` to equal the axis names (:data:`AXES`).

The metadata are plain dicts written here, so reading and writing a store needs no
OME library; the tests validate them with ``ome-zarr-models``. Nothing in octpipe reads
them back: the volume attribute ``spacing_mm`` stays the source of truth, and stores
written before the ``ome`` attributes existed read as before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["NGFF_VERSION", "AXES", "SPACE_UNIT", "display_scale", "multiscales_metadata"]

#: The OME-NGFF version written (the one for Zarr v3).
NGFF_VERSION = "0.5"

#: Axis names of a stored image, as the OME axes and the Zarr ``dimension_names``.
AXES = ("z", "y", "x")

#: Unit of the axes (a UDUNITS-2 name, as NGFF asks).
SPACE_UNIT = "millimeter"


def display_scale(spacing_mm: Sequence[float] | None) -> tuple[list[float], bool]:
    """The NGFF scale of an image with pixel spacing ``spacing_mm``, and whether it is in mm.

    NGFF viewers need a positive scale on every axis. A spacing of 0 (a single B-scan,
    or B-scans repeated at one position) or a non-finite one is shown with the smallest
    positive spacing of the other axes; the stored ``spacing_mm`` keeps the real value.

    Parameters
    ----------
    spacing_mm : sequence of 3 floats, or None
        (z, y, x) pixel spacing of the image in mm. None: unknown.

    Returns
    -------
    scale : list of 3 floats
        Positive scale per axis (z, y, x).
    physical : bool
        True when ``scale`` is in mm; False (scale 1 per pixel, no unit) when no axis
        has a positive finite spacing or ``spacing_mm`` is None.

    Raises
    ------
    ValueError
        If ``spacing_mm`` does not hold 3 numbers.

    Examples
    --------
    >>> display_scale([0.12, 0.00387, 0.0226])
    ([0.12, 0.00387, 0.0226], True)
    >>> display_scale([0.0, 0.00387, 0.0226])
    ([0.00387, 0.00387, 0.0226], True)
    >>> display_scale(None)
    ([1.0, 1.0, 1.0], False)
    """
    if spacing_mm is None:
        return [1.0, 1.0, 1.0], False
    try:
        values = [float(v) for v in spacing_mm]
    except (TypeError, ValueError):
        raise ValueError(f"spacing_mm must be 3 numbers (z, y, x) in mm, got {spacing_mm!r}") from None
    if len(values) != len(AXES):
        raise ValueError(f"spacing_mm must be 3 numbers (z, y, x) in mm, got {len(values)}: {values}")
    good = [v for v in values if math.isfinite(v) and v > 0]
    if not good:
        return [1.0, 1.0, 1.0], False
    fill = min(good)
    return [v if math.isfinite(v) and v > 0 else fill for v in values], True


def multiscales_metadata(
    spacing_mm: Sequence[float] | None,
    *,
    name: str | None = None,
    dataset_path: str = "image",
) -> dict[str, Any]:
    """The ``"ome"`` group attribute of a volume: an NGFF 0.5 single-level multiscale image.

    Parameters
    ----------
    spacing_mm : sequence of 3 floats, or None
        (z, y, x) pixel spacing of the array at ``dataset_path`` in mm (for a stored
        volume: its ``spacing_mm`` attribute, columns already downsampled). Zero or
        unknown entries are handled as :func:`display_scale` says; None writes a
        unit-less scale of 1 per pixel.
    name : str, optional
        Name of the multiscale image (the volume id; never a patient identifier).
    dataset_path : str
        Path of the array, relative to the group.

    Returns
    -------
    dict
        ``{"version": "0.5", "multiscales": [...]}``, JSON-serialisable; store it as the
        group attribute ``"ome"``.

    Raises
    ------
    ValueError
        If ``spacing_mm`` does not hold 3 numbers, or ``dataset_path`` is empty or absolute.

    Examples
    --------
    >>> ome = multiscales_metadata([0.12, 0.00387, 0.0226], name="v0123")
    >>> ome["version"], [a["name"] for a in ome["multiscales"][0]["axes"]]
    ('0.5', ['z', 'y', 'x'])
    >>> ome["multiscales"][0]["datasets"][0]
    {'path': 'image', 'coordinateTransformations': [{'type': 'scale', 'scale': [0.12, 0.00387, 0.0226]}]}
    """
    if not dataset_path or dataset_path.startswith("/"):
        raise ValueError(f"dataset_path must be a path relative to the group, got {dataset_path!r}")
    scale, physical = display_scale(spacing_mm)
    axes = [{"name": a, "type": "space", **({"unit": SPACE_UNIT} if physical else {})} for a in AXES]
    multiscale: dict[str, Any] = {
        "axes": axes,
        "datasets": [{"path": dataset_path, "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
    }
    if name is not None:
        multiscale = {"name": str(name), **multiscale}
    return {"version": NGFF_VERSION, "multiscales": [multiscale]}
