"""/docs and /redoc work on a network with no way out: every file they load comes from the service."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from bench.servers import RunningServer

# Anything a browser would fetch from elsewhere: absolute or protocol-relative URLs.
EXTERNAL = re.compile(r"(?:https?:)?//[\w.-]+", re.IGNORECASE)


class References(HTMLParser):
    """The scripts, stylesheets and icons a page loads, and the schema ReDoc is pointed at."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[str] = []
        self.links: list[str] = []
        self.spec_urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "script" and found.get("src"):
            self.scripts.append(str(found["src"]))
        elif tag == "link" and found.get("href"):
            self.links.append(str(found["href"]))
        elif tag == "redoc" and found.get("spec-url"):
            self.spec_urls.append(str(found["spec-url"]))


@pytest.mark.parametrize(
    ("page", "interface"), [("/docs", b"SwaggerUIBundle"), ("/redoc", b"Redoc")], ids=["swagger-ui", "redoc"]
)
def test_documentation_pages_load_everything_from_the_service(
    live_server: RunningServer, page: str, interface: bytes
) -> None:
    response = httpx.get(f"{live_server.url}{page}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert EXTERNAL.findall(response.text) == []

    references = References()
    references.feed(response.text)
    assert references.scripts, "the page loads no script"
    # Swagger UI's page names the schema in its inline script; ReDoc's in its element.
    assert "'/openapi.json'" in response.text or references.spec_urls == ["/openapi.json"]
    loaded: dict[str, httpx.Response] = {}
    for reference in [*references.scripts, *references.links, "/openapi.json"]:
        url = urljoin(str(response.url), reference)
        assert urlsplit(url).netloc == urlsplit(live_server.url).netloc, reference
        loaded[reference] = httpx.get(url)
        assert loaded[reference].status_code == 200, reference

    bundle = b"".join(loaded[script].content for script in references.scripts)
    assert interface in bundle
    for reference, answer in loaded.items():
        if reference.endswith(".css"):
            assert answer.headers["content-type"].startswith("text/css")
            # A stylesheet could still pull fonts or images from elsewhere.
            assert not re.findall(r"@import|url\(\s*['\"]?(?:https?:)?//", answer.text), reference


def test_swagger_ui_sends_the_schema_address_to_no_validator(live_server: RunningServer) -> None:
    # Swagger UI's default reports the schema's URL to validator.swagger.io for a badge.
    page = httpx.get(f"{live_server.url}/docs").text
    assert '"validatorUrl": null' in page
