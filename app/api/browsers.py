"""What browsers are told, and which browser requests are refused, for the pages and for the API.

Every answer carries a Content-Security-Policy that lets a page load scripts, styles and data from this
service only, run no inline script and be framed by no one (the viewer page at /, where the API key is
typed, and /docs and /redoc); `X-Content-Type-Options: nosniff`; `Referrer-Policy: no-referrer`; and
`Cache-Control: no-store`, since answers are derived from a patient's images and text (a DICOM SR holds
the patient's name) and must stay out of browser and proxy caches. Only the packaged files of the pages
(scripts, stylesheets) may be cached.

Cross-origin requests. A page on another origin can make a browser send a request the browser does not ask
about first (a CORS "simple request": multipart/form-data or text/plain, from fetch() or a form). It
cannot read the answer, but without API keys the work would still be done: a page anywhere on the web
could make a browser inside the hospital run the model. CORS does not stop this, and Content-Type checks
alone cannot, because the task routes document multipart/form-data, which is "simple". So a request
carrying an `Origin` header that is neither this service's own origin (the same host and port as its
Host header) nor listed in MEDMO_CORS_ORIGINS is refused with 403 before any route runs: before a key is
checked or an upload read. Browsers send `Origin` on every request that is not a GET or HEAD (every route
that does work is a POST), and on every cross-origin fetch(); a request from a page whose origin is
opaque (a sandboxed frame, a file:// page) carries `Origin: null` and is refused too. Clients that are not
browsers (curl, the SDKs) send no `Origin` and are unaffected, as are the viewer and the docs pages,
which are served from the same origin. `Sec-Fetch-Site` says the same for current browsers only, and
refusing on it would also refuse a link to /docs followed from another site, so it is not used.

The scheme is not compared: behind a proxy that terminates TLS the service sees http while pages are on
https. A proxy that rewrites the Host header makes the service's own pages look foreign: list their origin
in MEDMO_CORS_ORIGINS. A DNS rebinding page is same-origin by this rule (its host name is the one the
browser sent): MEDMO_ALLOWED_HOSTS is what refuses it, with Starlette's TrustedHostMiddleware, answering
400 in the error shape. MEDMO_CORS_ORIGINS turns on Starlette's CORSMiddleware for the listed origins.

The probe app (/healthz and /readyz on MEDMO_PROBE_PORT) gets none of this: Kubernetes probes send the
pod's IP as their Host.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import Failure, failure_response
from app.settings import Settings

# `default-src 'none'`: whatever is not named below is refused. Canvas pictures and Swagger UI's icons
# are data: and blob: URLs made by the pages' own scripts. A route may answer with a policy of its own.
PAGE_POLICY = {
    "default-src": "'none'",
    "script-src": "'self'",
    "style-src": "'self'",
    "img-src": "'self' data: blob:",
    "font-src": "'self'",
    "connect-src": "'self'",
    "form-action": "'self'",
    "base-uri": "'none'",
    "frame-ancestors": "'none'",
}


def content_security_policy(directives: Mapping[str, str]) -> str:
    return "; ".join(f"{name} {sources}" for name, sources in directives.items())


CONTENT_SECURITY_POLICY = content_security_policy(PAGE_POLICY)
BROWSER_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# What a client may send and read across origins, when MEDMO_CORS_ORIGINS allows it to call at all.
CORS_REQUEST_HEADERS = (
    "Authorization",
    "X-API-Key",
    "Content-Type",
    "Accept",
    "X-Request-ID",
    "X-Request-Timeout",
)
CORS_EXPOSED_HEADERS = ("X-Request-ID", "Retry-After")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def install_browser_protections(app: FastAPI, settings: Settings, cacheable_paths: Collection[str]) -> None:
    """Add the middleware, innermost first: CORS, then allowed hosts, then the headers and origin check.

    `cacheable_paths` are the prefixes of the packaged files, the only answers that may be cached. Call
    before the request-context middleware is added, so that refusals are logged with a request id."""
    cors_origins = listed(settings.cors_origins)
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=CORS_REQUEST_HEADERS,
            expose_headers=CORS_EXPOSED_HEADERS,
        )
    allowed_hosts = listed(settings.allowed_hosts)
    if allowed_hosts:
        app.add_middleware(AllowedHosts, allowed_hosts=allowed_hosts)
    app.add_middleware(BrowserGuard, cors_origins=cors_origins, cacheable_paths=tuple(cacheable_paths))


def listed(setting: str | None) -> list[str]:
    """A comma-separated setting's entries; an origin written with a trailing slash still matches."""
    return [entry.strip().rstrip("/") for entry in (setting or "").split(",") if entry.strip()]


class BrowserGuard:
    """The headers on every answer, and 403 for a request from a page on an origin not allowed."""

    def __init__(self, app: ASGIApp, cors_origins: Collection[str], cacheable_paths: tuple[str, ...]) -> None:
        self.app = app
        self.any_origin = "*" in cors_origins
        self.cors_origins = frozenset(cors_origins)
        self.cacheable_paths = cacheable_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cacheable = self._is_packaged_file(scope)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in BROWSER_HEADERS.items():
                    headers.setdefault(name, value)
                if not cacheable:
                    headers["Cache-Control"] = "no-store"  # replaces a stream's no-cache: stronger
            await send(message)

        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is not None and not self._allowed(origin, headers.get("host")):
            failure = Failure(
                403,
                "cross_origin_refused",
                "requests from pages on other origins are refused; an operator can allow an origin with "
                "MEDMO_CORS_ORIGINS",
            )
            await failure_response(Request(scope), failure)(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    def _allowed(self, origin: str, host: str | None) -> bool:
        return self.any_origin or origin in self.cors_origins or same_origin(origin, host)

    def _is_packaged_file(self, scope: Scope) -> bool:
        path: str = scope["path"]
        root_path: str = scope.get("root_path", "")
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        return path.startswith(self.cacheable_paths)


def same_origin(origin: str, host: str | None) -> bool:
    """Whether `origin` names the host and port the request was sent to (its Host header)."""
    if host is None:
        return False
    page = urlsplit(origin)
    served = urlsplit(f"//{host}")
    default_port = _DEFAULT_PORTS.get(page.scheme)
    try:
        page_port, served_port = page.port, served.port
    except ValueError:  # a port that is not a number
        return False
    return (
        default_port is not None
        and page.hostname is not None
        and page.hostname == served.hostname
        and (page_port or default_port) == (served_port or default_port)
    )


_HOST_ACCEPTED = "medmo.host_accepted"


class AllowedHosts:
    """Starlette's TrustedHostMiddleware, its refusal answered in the service's error shape.

    The check is Starlette's; it answers a refusal in plain text itself, so that answer is replaced: a
    request whose host passed has reached the app behind the check before anything is sent."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str]) -> None:
        self.app = app
        self.check = TrustedHostMiddleware(self._accepted, allowed_hosts=allowed_hosts, www_redirect=False)

    async def _accepted(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[_HOST_ACCEPTED] = True
        await self.app(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def refusal_in_error_shape(message: Message) -> None:
            if scope.get(_HOST_ACCEPTED):
                await send(message)
            elif message["type"] == "http.response.start":
                failure = Failure(400, "unknown_host", "this service does not answer to that host name")
                await failure_response(Request(scope), failure)(scope, receive, send)
            # else: the body of Starlette's plain-text refusal, already answered above

        await self.check(scope, receive, refusal_in_error_shape)
