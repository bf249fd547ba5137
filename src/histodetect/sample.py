"""Where the real sample embedded in the package lives (the demo, export's check and the tests read it)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def sample_dir() -> Path:
    """The embedded real sample: 240 labeled training patches, 16 test patches and their sample submission."""
    return Path(str(resources.files("histodetect") / "assets" / "sample"))
