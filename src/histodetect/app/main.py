"""``create_app(settings)``: the FastAPI app with its model loaded, limits on, routes and page mounted.

The model is loaded here, before any socket is bound, so a bad run folder is a one-line error from the CLI rather
than a server that starts and then fails every request. Errors all answer JSON ``{"error": "..."}``: the user's
(not a patch, too many files...) 400 with the reason, a full queue 503, anything unexpected 500 (and the log).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from histodetect import __version__
from histodetect.app.batching import Busy
from histodetect.app.limits import LimitsMiddleware
from histodetect.app.model import ModelService
from histodetect.app.routers import health, page, patches, regions
from histodetect.app.security import HostCheckMiddleware, TokenMiddleware
from histodetect.app.settings import Settings
from histodetect.errors import UserError

DESCRIPTION = (
    "Probability of metastatic tumour in 96x96 H&E patches (the centre 32x32 pixels), Grad-CAM overlays and "
    "heatmaps over region images. When the server was started with a token, every route but /health needs "
    "`Authorization: Bearer <token>` (or the session cookie a browser gets by opening `/?token=<token>`). "
    'Errors answer `{"error": "..."}`.'
)


def create_app(settings: Settings) -> FastAPI:
    service = ModelService(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.batcher.start()
        try:
            yield
        finally:
            await service.batcher.stop()

    app = FastAPI(title="histodetect", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.service = service
    app.add_middleware(TokenMiddleware, token=settings.token)  # inside the limits: a refused body is still bounded
    app.add_middleware(LimitsMiddleware, max_body=settings.max_body, request_timeout=settings.request_timeout)
    if settings.allowed_hosts is not None and "*" not in settings.allowed_hosts:  # outermost: checked first
        app.add_middleware(HostCheckMiddleware, allowed=settings.allowed_hosts)
    app.add_exception_handler(UserError, _user_error)
    app.add_exception_handler(Busy, _busy)
    app.add_exception_handler(HTTPException, _http_error)
    for module in (health, patches, regions, page):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=page.STATIC), name="static")
    return app


async def _user_error(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=400)


async def _busy(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "1"})


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)
