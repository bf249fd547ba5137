"""The run contract: how a run is configured (:mod:`.config`), what its folder holds (:mod:`.layout`) and how a
model is read back from it (:mod:`.loading`). ``train`` writes runs; ``infer``, ``report``, ``app`` and the CLI read
them through this package.
"""

from histodetect.runs.config import ConfigError, TrainConfig, build_config
from histodetect.runs.loading import load_config, load_model

__all__ = ["ConfigError", "TrainConfig", "build_config", "load_config", "load_model"]
