"""octpipe: retinal OCT from vendor files to f-AnoGAN anomaly maps.

See README.md for the commands, ``docs/api.md`` for the notebook API (``import octpipe as
op; op.read_volume, op.prepare, op.load_model, op.anomaly_map, op.open_store``) and DESIGN.md
(in the project's shared notes) for the data flow.
"""

from octpipe.errors import CorruptFileError, FormatError, OctpipeError, UnsupportedFormatError
from octpipe.volume import OctVolume, Provenance

__version__ = "0.1.0"

#: The notebook API (:mod:`octpipe.api`), imported on first use so that ``import octpipe`` stays light.
_API = ("read_volume", "read_volumes", "segment_layers", "prepare", "load_model", "anomaly_map", "open_store",
        "Store")

__all__ = [
    "OctVolume",
    "Provenance",
    "OctpipeError",
    "FormatError",
    "CorruptFileError",
    "UnsupportedFormatError",
    "__version__",
    *_API,
]


def __getattr__(name: str):
    if name in _API:
        from octpipe import api

        return getattr(api, name)
    raise AttributeError(f"module 'octpipe' has no attribute {name!r}")
