"""Shared fixtures: where the real vendor files are, and small seeded phantoms."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

#: ../shared/data/real beside the repository (never copied into it).
REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"

#: Small geometry for fast tests: the Spectralis field of view at half resolution.
SMALL_SHAPE = (5, 248, 256)
SMALL_SPACING = (0.24, 0.00774, 0.0226)


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data folder {REAL_DATA} not present")
    return REAL_DATA


def older_store_copy(store: Path, dest: Path, edit_attrs: Callable[[dict], dict]) -> Path:
    """A copy of ``store`` at ``dest`` as an older octpipe wrote it: each volume group's attributes
    passed through ``edit_attrs``, and the image arrays without ``dimension_names``."""
    from octpipe.store import volume_ids

    shutil.copytree(store, dest)
    for vid in volume_ids(dest):
        for path, edit in ((dest / "volumes" / vid / "zarr.json", "attributes"),
                           (dest / "volumes" / vid / "image" / "zarr.json", "dimension_names")):
            meta = json.loads(path.read_text())
            if edit == "attributes":
                meta["attributes"] = edit_attrs(meta["attributes"])
            else:
                meta.pop("dimension_names", None)
            path.write_text(json.dumps(meta))
    return dest


def small_phantom(seed: int = 0, lesions: str = "", **kwargs):
    from octpipe.testing.phantoms import make_phantom, parse_lesion_specs

    return make_phantom(np.random.default_rng(seed), shape=kwargs.pop("shape", SMALL_SHAPE),
                        spacing_mm=kwargs.pop("spacing_mm", SMALL_SPACING),
                        lesions=parse_lesion_specs(lesions), **kwargs)


def pytest_collection_modifyitems(config, items):
    """Tests under a ``gpu`` folder or named ``*_gpu`` are marked gpu automatically."""
    for item in items:
        if "gpu" in item.nodeid.split("::")[0] or item.name.endswith("_gpu"):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared CPU: one thread is faster and avoids oversubscription stalls."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
