"""Paths match exactly: a stray trailing slash is a 404, never a redirect to an address built from Host."""

from __future__ import annotations

import httpx
import pytest

from bench.servers import RunningServer
from tests.conftest import LIVE_API_KEY, png_bytes


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/vqa/"), ("POST", "/ground/"), ("GET", "/info/"), ("GET", "/healthz/")]
)
def test_a_trailing_slash_is_not_found_and_not_redirected(
    live_server: RunningServer, method: str, path: str
) -> None:
    response = httpx.request(
        method,
        f"{live_server.url}{path}",
        headers={"Host": "attacker.example", "Authorization": f"Bearer {LIVE_API_KEY}"},
        files={"image": ("scan.png", png_bytes(), "image/png")} if method == "POST" else None,
        follow_redirects=False,
    )
    assert response.status_code == 404
    assert "location" not in response.headers
    assert response.json()["error"]["code"] == "not_found"
    assert "attacker.example" not in response.text
