"""Project-wide fixtures: the real patches every test starts from.

``sample_dir`` is the sample embedded in the package (240 labeled training patches, 16 test patches, in the
competition's own layout), so it always exists. ``shared_subset`` is ``../shared/data/hcd-subset`` (5,000 + 43
patches) and skips the test when that folder is absent. ``sample_store`` is the embedded sample ingested once
per session; treat it as read-only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from histodetect.data.ingest import ingest
from histodetect.data.store import Store
from histodetect.sample import sample_dir

SAMPLE_DIR = sample_dir()
REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_SUBSET = REPO_ROOT.parent / "shared/data/hcd-subset"


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
