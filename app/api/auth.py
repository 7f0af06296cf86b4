"""Access control for the routes: an API key as a Bearer token or in X-API-Key, or a 401.

Task routes and /info always require a key when keys are configured; /metrics only with
MEDMO_METRICS_REQUIRE_KEY; /healthz and /readyz never, so probes work without secrets.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.api.deps import get_service
from app.api.errors import ApiError

bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: <API key>")
BearerKey = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
HeaderKey = Annotated[str | None, Security(api_key_header)]


async def require_api_key(
    request: Request,
    credentials: BearerKey,
    header_key: HeaderKey,
) -> None:
    keys = get_service(request).api_keys
    if not keys.enabled:
        return
    presented = credentials.credentials if credentials is not None else header_key
    if not presented or not keys.verify(presented):
        raise ApiError(
            401,
            "unauthorized",
            "a valid API key is required: Authorization: Bearer <key>, or X-API-Key: <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def require_api_key_for_metrics(
    request: Request,
    credentials: BearerKey,
    header_key: HeaderKey,
) -> None:
    if get_service(request).settings.metrics_require_key:
        await require_api_key(request, credentials, header_key)
