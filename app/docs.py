"""``/docs`` (Swagger UI) and ``/redoc`` from assets the service serves itself.

FastAPI's pages load their JavaScript, CSS, favicon and fonts from CDNs, so on a machine without
internet access (an air-gapped cluster, a laptop offline) they stay blank. The same pages here
point at ``/docs/assets/``: Swagger UI and ReDoc's bundles as the ``fastapi-offline`` package
ships them.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs/assets"


def _root(request: Request) -> str:
    """The prefix a proxy serves us under (``root_path``), for every URL a page names."""
    return request.scope.get("root_path", "").rstrip("/")


def install(app: FastAPI) -> None:
    """Add the two pages; the app must be created with ``docs_url=None, redoc_url=None``."""
    app.mount(ASSETS, StaticFiles(directory=str(files("fastapi_offline") / "static")), name="docs-assets")
    redirect = app.swagger_ui_oauth2_redirect_url

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = _root(request)
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{redirect}" if redirect else None,
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    if redirect:
        app.get(redirect, include_in_schema=False)(get_swagger_ui_oauth2_redirect_html)

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = _root(request)
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS}/favicon.png",
            with_google_fonts=False,
        )
