"""The app's routes, one module per concern, each an ``APIRouter`` that :mod:`histodetect.app.main` includes."""
