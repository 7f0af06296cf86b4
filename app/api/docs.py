"""/docs (Swagger UI) and /redoc (ReDoc), served with everything they load from this service itself.

FastAPI's own pages load their scripts and stylesheets from a CDN (and ReDoc its fonts from Google), so
they stay blank on a hospital network with no way out. The files come from fastapi-offline, which
vendors released Swagger UI and ReDoc builds and keeps them current; the pages are FastAPI's own
templates pointed at those files.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"
# Where the package keeps the files: fastapi_offline/static (swagger-ui-bundle.js, swagger-ui.css,
# redoc.standalone.js, favicon.png).
_ASSETS_PACKAGE = ("fastapi_offline", "static")
# Swagger UI would otherwise send the schema's address to validator.swagger.io for a validity badge.
_SWAGGER_UI_PARAMETERS = {"validatorUrl": None}


def install_docs(app: FastAPI) -> None:
    """Serve /docs, /redoc and their files. The app must be built with docs_url=None, redoc_url=None."""
    assert app.openapi_url, "the documentation pages render the app's schema"
    openapi_url = app.openapi_url
    app.mount(ASSETS_URL, StaticFiles(packages=[_ASSETS_PACKAGE]), name="docs-assets")

    def prefix(request: Request) -> str:
        # Behind a proxy that strips a path prefix, the page must ask for its files under that prefix.
        root_path: str = request.scope.get("root_path", "")
        return root_path.rstrip("/")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = prefix(request)
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            swagger_ui_parameters=_SWAGGER_UI_PARAMETERS,
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = prefix(request)
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )
