"""The run contract: how a run is configured (:mod:`.config`), what its folder holds (:mod:`.names`, :mod:`.layout`)
and how a model is read back from it (:mod:`.loading`). ``train`` writes runs; ``infer``, ``report``, ``app`` and the
CLI read them through this package.

The public names below are loaded on first use (PEP 562), so that importing :mod:`.names` alone, as the CLI does
to recognise its own folders, does not load PyTorch with the config and the loaders.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from histodetect.runs.config import ConfigError, TrainConfig, build_config
    from histodetect.runs.loading import load_config, load_model

__all__ = ["ConfigError", "TrainConfig", "build_config", "load_config", "load_model"]
_HOME = {
    "ConfigError": "config",
    "TrainConfig": "config",
    "build_config": "config",
    "load_config": "loading",
    "load_model": "loading",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'histodetect.runs' has no attribute {name!r}")
    return getattr(importlib.import_module(f"histodetect.runs.{_HOME[name]}"), name)
