"""The networks: ``create_model`` builds a ``Classifier`` (the contract in DEVELOPERS.md) from a name."""

from histodetect.models.classifier import Classifier
from histodetect.models.pretrained import LoadReport, ModelError, load_weights
from histodetect.models.registry import create_model, freeze_backbone, list_models, unfreeze_top

__all__ = [
    "Classifier",
    "LoadReport",
    "ModelError",
    "create_model",
    "freeze_backbone",
    "list_models",
    "load_weights",
    "unfreeze_top",
]
