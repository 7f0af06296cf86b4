"""/docs and /redoc work on a network with no way out: every file they load comes from the service, and
they run in Chromium under the service's Content-Security-Policy, which allows no inline script."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, sync_playwright

from bench.servers import RunningServer
from tests.api.test_viewer import CHROMIUM, CHROMIUM_ARGS

# Anything a browser would fetch from elsewhere: absolute or protocol-relative URLs.
EXTERNAL = re.compile(r"(?:https?:)?//[\w.-]+", re.IGNORECASE)


class References(HTMLParser):
    """The scripts, stylesheets and icons a page loads, the schema it is pointed at, Swagger UI's settings."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[str] = []
        self.inline_scripts = 0
        self.links: list[str] = []
        self.spec_urls: list[str] = []
        self.swagger_ui_parameters: dict[str, object] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "script":
            if found.get("src"):
                self.scripts.append(str(found["src"]))
            else:
                self.inline_scripts += 1
        elif tag == "link" and found.get("href"):
            self.links.append(str(found["href"]))
        elif tag == "redoc" and found.get("spec-url"):
            self.spec_urls.append(str(found["spec-url"]))
        elif found.get("id") == "swagger-ui":
            self.spec_urls.append(str(found["data-openapi-url"]))
            self.swagger_ui_parameters = json.loads(str(found["data-parameters"]))


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
    assert references.inline_scripts == 0
    assert references.spec_urls == ["/openapi.json"]
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
    references = References()
    references.feed(httpx.get(f"{live_server.url}/docs").text)
    assert "validatorUrl" in references.swagger_ui_parameters
    assert references.swagger_ui_parameters["validatorUrl"] is None


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


# A Content-Security-Policy refusal as Chromium reports it: what was refused, then the directive.
REFUSED_LOAD = re.compile(r"^Loading the \w+ '([^']+)' violates the following Content Security Policy")


@pytest.mark.parametrize(
    ("page", "rendered", "title"),
    [("/docs", ".swagger-ui .info .title", "MedMO Serve"), ("/redoc", "h1", "MedMO Serve")],
    ids=["swagger-ui", "redoc"],
)
def test_documentation_pages_render_under_the_content_security_policy(
    browser: Browser, live_server: RunningServer, page: str, rendered: str, title: str
) -> None:
    tab = browser.new_page()
    console: list[str] = []
    errors: list[str] = []
    tab.on("console", lambda message: console.append(message.text) if message.type == "error" else None)
    tab.on("pageerror", lambda error: errors.append(str(error)))
    tab.goto(f"{live_server.url}{page}")
    tab.wait_for_selector(rendered)
    assert (tab.text_content(rendered) or "").startswith(title)
    if page == "/redoc":
        # Its search runs in a worker the page makes: the policy lets it.
        tab.fill("input[placeholder^='Search']", "preview")
        tab.wait_for_selector("[role=search] li")
    tab.close()
    assert errors == []
    # The policy refuses nothing of the service's own; what it does refuse is a load from elsewhere (ReDoc's
    # footer logo, from its CDN), which it keeps the page from fetching.
    refused = [REFUSED_LOAD.match(line) for line in console if "Content Security Policy" in line]
    assert all(refused), console
    assert [match.group(1) for match in refused if match and match.group(1).startswith(live_server.url)] == []
