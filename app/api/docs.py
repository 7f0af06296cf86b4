"""/docs (Swagger UI) and /redoc (ReDoc), served with everything they load from this service itself.

FastAPI's own pages load their scripts and stylesheets from a CDN (and ReDoc its fonts from Google), so
they stay blank on a hospital network with no way out. The files come from fastapi-offline, which
vendors released Swagger UI and ReDoc builds and keeps them current.

The pages are FastAPI's templates without their inline script, so that they run under the service's
Content-Security-Policy (app/api/browsers.py), which allows none: Swagger UI's start-up call is served
beside the bundle, as /docs-assets/swagger-ui-init.js, and reads the schema's address and its settings
from the page's markup. It is written here rather than as a file of the package, so that it ships in the
wheel with the module that needs it.
"""

from __future__ import annotations

import json
from html import escape

from fastapi import FastAPI, Request
from fastapi.openapi.docs import swagger_ui_default_parameters
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from app.api.browsers import PAGE_POLICY, content_security_policy

ASSETS_URL = "/docs-assets"
# Where the package keeps the files: fastapi_offline/static (swagger-ui-bundle.js, swagger-ui.css,
# redoc.standalone.js, favicon.png).
_ASSETS_PACKAGE = ("fastapi_offline", "static")
SWAGGER_UI_INIT = "swagger-ui-init.js"
# Swagger UI would otherwise send the schema's address to validator.swagger.io for a validity badge.
SWAGGER_UI_PARAMETERS = {**swagger_ui_default_parameters, "validatorUrl": None}

# FastAPI's inline start-up script, with the schema's address and the parameters read from the page, so
# that one script serves every page (and every proxy prefix).
_SWAGGER_UI_INIT_SCRIPT = """\
const element = document.getElementById("swagger-ui");
window.ui = SwaggerUIBundle({
  url: element.dataset.openapiUrl,
  ...JSON.parse(element.dataset.parameters),
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
});
"""

# ReDoc styles itself with styled-components, which writes <style> elements, and its bundle has no way to
# give them a nonce. Inline styles run no script, and with images and fonts from this service only they
# cannot carry anything away; the page holds no key. Its search runs in a worker made from a blob: URL by
# its own script.
REDOC_POLICY = content_security_policy(
    {**PAGE_POLICY, "style-src": "'self' 'unsafe-inline'", "worker-src": "blob:"}
)

_SWAGGER_UI_PAGE = """\
<!DOCTYPE html>
<html>
<head>
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<link type="text/css" rel="stylesheet" href="{assets}/swagger-ui.css">
<link rel="shortcut icon" href="{assets}/favicon.png">
<title>{title}</title>
</head>
<body>
<div id="swagger-ui" data-openapi-url="{openapi_url}" data-parameters="{parameters}"></div>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script src="{assets}/{init}"></script>
</body>
</html>
"""

_REDOC_PAGE = """\
<!DOCTYPE html>
<html>
<head>
<title>{title}</title>
<meta charset="utf-8"/>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="shortcut icon" href="{assets}/favicon.png">
<style>
  body {{ margin: 0; padding: 0; }}
</style>
</head>
<body>
<noscript>ReDoc requires Javascript to function. Please enable it to browse the documentation.</noscript>
<redoc spec-url="{openapi_url}"></redoc>
<script src="{assets}/redoc.standalone.js"></script>
</body>
</html>
"""


def install_docs(app: FastAPI) -> None:
    """Serve /docs, /redoc and their files. The app must be built with docs_url=None, redoc_url=None."""
    assert app.openapi_url, "the documentation pages render the app's schema"
    openapi_url = app.openapi_url

    # Before the mount below, which would otherwise answer for it.
    @app.get(f"{ASSETS_URL}/{SWAGGER_UI_INIT}", include_in_schema=False)
    async def swagger_ui_init() -> Response:
        return Response(_SWAGGER_UI_INIT_SCRIPT, media_type="text/javascript")

    app.mount(ASSETS_URL, StaticFiles(packages=[_ASSETS_PACKAGE]), name="docs-assets")

    def prefix(request: Request) -> str:
        # Behind a proxy that strips a path prefix, the page must ask for its files under that prefix.
        root_path: str = request.scope.get("root_path", "")
        return root_path.rstrip("/")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = prefix(request)
        return HTMLResponse(
            _SWAGGER_UI_PAGE.format(
                title=escape(f"{app.title} - Swagger UI"),
                assets=escape(root + ASSETS_URL),
                openapi_url=escape(root + openapi_url),
                parameters=escape(json.dumps(SWAGGER_UI_PARAMETERS)),
                init=SWAGGER_UI_INIT,
            )
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = prefix(request)
        return HTMLResponse(
            _REDOC_PAGE.format(
                title=escape(f"{app.title} - ReDoc"),
                assets=escape(root + ASSETS_URL),
                openapi_url=escape(root + openapi_url),
            ),
            headers={"Content-Security-Policy": REDOC_POLICY},
        )
