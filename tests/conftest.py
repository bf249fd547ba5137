"""Project-wide fixtures: the real patches every test starts from.

``sample_dir`` is the sample embedded in the package (240 labeled training patches, 16 test patches, in the
competition's own layout), so it always exists. ``shared_subset`` is ``../shared/data/hcd-subset`` (5,000 + 43
patches) and skips the test when that folder is absent. ``sample_store`` is the embedded sample ingested once
per session; treat it as read-only.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from histodetect.data.ingest import ingest
from histodetect.data.mosaic import write_pyramid
from histodetect.data.store import Store
from histodetect.sample import sample_dir

SAMPLE_DIR = sample_dir()
REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_SUBSET = REPO_ROOT.parent / "shared/data/hcd-subset"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """``$HISTODETECT_CACHE`` in a folder of the session: the ONNX exports of its freshly trained runs (the CPU
    engine's, ``infer.onnx_graph.cached_onnx``) and embeddings never land in the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HISTODETECT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """Picks a free 127.0.0.1 port for a server a test starts itself (loopback only)."""

    def pick() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    return pick


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The embedded sample: ``train/`` + ``train_labels.csv``, ``test/`` + ``sample_submission.csv``."""
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def shared_subset() -> Path:
    """The 5,000-patch competition subset beside the repository; skips when it is not there."""
    if not SHARED_SUBSET.is_dir():
        pytest.skip("../shared/data/hcd-subset not present")
    return SHARED_SUBSET


@pytest.fixture(scope="session")
def sample_store(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> Store:
    """The embedded sample ingested into a store (splits ``train``: 240 labeled, ``test``: 16 unlabeled)."""
    result = ingest(sample_dir, tmp_path_factory.mktemp("sample_store") / "store", progress=False)
    assert result.exit_code == 0 and result.store is not None, result.report
    return result.store


# ---------------------------------------------------------------------------------------------------- slide files
@dataclass(frozen=True)
class Mosaic:
    """Real patches side by side on white glass at their own scale (0.972 um/px); ``centres`` holds each patch's
    centre cell (row, col) in the 32 px grid, whose window is exactly the patch."""

    image: np.ndarray
    patches: np.ndarray
    labels: np.ndarray
    centres: list[tuple[int, int]]


def build_mosaic(store: Store, per_class: int, n_cols: int) -> Mosaic:
    """``per_class`` tumour and as many normal training patches of ``store``, ``n_cols`` a row, 64 px of glass above
    and 96 px to the left; the right and bottom margins (80 px) end inside a cell."""
    labels = store.labels
    rows = np.sort(np.concatenate([np.flatnonzero(labels == 1)[:per_class], np.flatnonzero(labels == 0)[:per_class]]))
    patches = store.read(rows)
    top, left, n_rows = 64, 96, -(-len(rows) // n_cols)
    image = np.full((top + 96 * n_rows + 80, left + 96 * n_cols + 80, 3), 255, dtype=np.uint8)
    centres = []
    for k, patch in enumerate(patches):
        y, x = top + 96 * (k // n_cols), left + 96 * (k % n_cols)
        image[y : y + 96, x : x + 96] = patch
        centres.append((y // 32 + 1, x // 32 + 1))
    return Mosaic(image, patches, labels[rows], centres)


@pytest.fixture(scope="session")
def mosaic(sample_store: Store) -> Mosaic:
    """24 real training patches of the sample (half tumour) in 4 rows of 6."""
    return build_mosaic(sample_store, 12, 6)


@pytest.fixture(scope="session")
def wide_mosaic(sample_store: Store) -> Mosaic:
    """64 real training patches of the sample (half tumour) in 8 rows of 8: enough pairs for a ROC AUC that moves
    by less than 0.001 when two patches swap places."""
    return build_mosaic(sample_store, 32, 8)


@pytest.fixture(scope="session")
def make_slide() -> Callable[..., Path]:
    """``make_slide(path, image, mpp, aperio=..., compression=..., levels=..., tile=...)``: a tiled pyramidal TIFF or
    an Aperio SVS as a scanner writes one (:func:`histodetect.data.mosaic.write_pyramid`)."""
    return write_pyramid
