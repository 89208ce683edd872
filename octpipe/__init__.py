"""octpipe: retinal OCT from vendor files to f-AnoGAN anomaly maps.

See README.md for the commands and DESIGN.md (in the project's shared notes)
for the data flow.
"""

from octpipe.errors import CorruptFileError, FormatError, OctpipeError, UnsupportedFormatError
from octpipe.volume import OctVolume, Provenance

__version__ = "0.1.0"

__all__ = [
    "OctVolume",
    "Provenance",
    "OctpipeError",
    "FormatError",
    "CorruptFileError",
    "UnsupportedFormatError",
    "__version__",
]
