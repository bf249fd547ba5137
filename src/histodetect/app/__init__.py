"""The web app behind ``histodetect serve``: FastAPI on uvicorn, a page at ``/``, the HTTP API under it.

The layer above ``infer``: it scores through the same :class:`~histodetect.infer.engine.Predictor` as ``predict``,
explains with ``infer.explain`` and draws regions with ``infer.slide``; only the CLI imports it.
"""

from histodetect.app.main import create_app
from histodetect.app.settings import Settings

__all__ = ["Settings", "create_app"]
