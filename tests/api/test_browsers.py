"""What browsers are told on every answer, allowed hosts, CORS, and pages on other origins kept from the model.

The last test is an attack as a browser makes it: Chromium on a page served from another loopback port
tries every request a page can send without asking first (multipart and text/plain fetch(), in cors and
no-cors mode, and form submissions) against a server with no API keys, and the engine never runs.
"""

from __future__ import annotations

import base64
import functools
import http.server
import json
import threading
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from playwright.sync_api import sync_playwright
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import Message, Receive, Scope, Send

from app.api.browsers import BrowserGuard, same_origin
from app.main import create_app
from bench.servers import RunningServer, free_port, serve
from tests.api.test_viewer import CHROMIUM, CHROMIUM_ARGS
from tests.conftest import png_bytes, pydicom_file, settings_for

# The packaged files of the pages: the only answers that may be cached. Each mount's file to ask for.
PACKAGED_FILES = {"/viewer-assets": "/viewer-assets/viewer.js", "/docs-assets": "/docs-assets/swagger-ui.css"}
PATH_PARAMETERS = {
    "study_instance_uid": "1.2.3",
    "series_instance_uid": "1.2.3.4",
    "sop_instance_uid": "1.2.3.4.5",
}
UPLOAD_FIELDS = {
    "/vqa": {"question": "Is there an abnormality?"},
    "/report": {},
    "/ground": {},
    "/classify": {"labels": '["normal", "abnormal"]'},
    "/preview": {},
}
PAGES = ["/", "/docs", "/redoc"]
# Answers from the live server (httpx) and from TestClient (httpx2).
Answer = httpx.Response | httpx2.Response
CONFIGURED_ORIGIN = "https://viewer.example.org"
ALLOWED_HOST = "medmo.example.org"


def policy(response: Answer) -> dict[str, str]:
    directives = (
        part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";")
    )
    return {name: sources for name, sources in directives}


def assert_browser_headers(response: Answer, cacheable: bool = False) -> None:
    where = f"{response.request.method} {response.request.url.path} ({response.status_code})"
    assert response.headers["x-content-type-options"] == "nosniff", where
    assert response.headers["referrer-policy"] == "no-referrer", where
    directives = policy(response)
    assert directives["frame-ancestors"] == "'none'", where
    assert directives["script-src"] == "'self'", where
    assert directives["default-src"] == "'none'", where
    if not cacheable:
        assert response.headers["cache-control"] == "no-store", where


def every_route(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path) of every route and mount of the app, HEAD included where Starlette adds it."""
    return {
        (method, route.path or "")
        for route in iter_route_contexts(app.routes)
        for method in (route.methods or {"GET"})
    }


def call(client: TestClient, method: str, path: str, model_id: str) -> httpx2.Response:
    """A request the route takes: a real upload for the routes taking one, a real conversation for chat."""
    url = PACKAGED_FILES.get(path, path.format(**PATH_PARAMETERS))
    if method == "POST" and path in UPLOAD_FIELDS:
        upload = [("image", ("xray.png", png_bytes(), "image/png"))]
        return client.post(url, files=upload, data=UPLOAD_FIELDS[path])
    if method == "POST" and path == "/v1/chat/completions":
        question = [{"role": "user", "content": "Is the heart enlarged?"}]
        return client.post(url, json={"model": model_id, "messages": question, "max_tokens": 4})
    if method == "POST":
        return client.post(url, json={"question": "Is there an abnormality?"})  # DICOMweb, no PACS: 503
    return client.request(method, url)


def test_every_route_answers_with_the_browser_headers(random_client: TestClient) -> None:
    app = random_client.app
    assert isinstance(app, FastAPI)
    routes = every_route(app)
    documented = {
        (method.upper(), path) for path, operations in app.openapi()["paths"].items() for method in operations
    }
    assert documented <= routes
    assert {("GET", path) for path in [*PAGES, *PACKAGED_FILES, "/openapi.json"]} <= routes
    model_id = random_client.get("/v1/models").json()["data"][0]["id"]

    for method, path in sorted(routes):
        response = call(random_client, method, path, model_id)
        assert response.status_code < 500 or path.startswith("/dicomweb/"), (method, path, response.text)
        if (method, path) in documented and method == "POST" and not path.startswith("/dicomweb/"):
            assert response.status_code == 200, (path, response.text)  # the model ran on the upload
        assert_browser_headers(response, cacheable=path.startswith(tuple(PACKAGED_FILES)))

    # A refusal, an unknown path, a stream and a DICOM SR holding the patient's name are no different.
    assert_browser_headers(random_client.post("/vqa", content=b"x", headers={"Content-Type": "text/plain"}))
    assert_browser_headers(random_client.get("/no-such-page"))
    streamed = random_client.post(
        "/vqa",
        files=[("image", ("xray.png", png_bytes(), "image/png"))],
        data={"question": "Is there an abnormality?"},
        headers={"Accept": "text/event-stream"},
    )
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert_browser_headers(streamed)
    structured_report = random_client.post(
        "/report",
        content=pydicom_file("CT_small.dcm"),
        headers={"Content-Type": "application/dicom", "Accept": "application/dicom"},
    )
    assert structured_report.headers["content-type"] == "application/dicom", structured_report.text
    assert_browser_headers(structured_report)


class InlineCode(HTMLParser):
    """Script a page runs that is not a file of the service: inline <script>, on... attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "script" and not found.get("src"):
            self.found.append("inline <script>")
        self.found.extend(name for name in found if name.startswith("on"))


@pytest.mark.parametrize("page", PAGES)
def test_the_pages_run_only_the_services_own_scripts_and_are_framed_by_no_one(
    random_client: TestClient, page: str
) -> None:
    response = random_client.get(page)
    assert response.headers["content-type"].startswith("text/html")
    directives = policy(response)
    assert directives["script-src"] == "'self'"  # no 'unsafe-inline', no 'unsafe-eval', nowhere else
    assert directives["frame-ancestors"] == "'none'"
    assert directives["base-uri"] == "'none'"
    assert directives["connect-src"] == "'self'"
    if page != "/redoc":  # ReDoc's styled-components writes <style> elements (app/api/docs.py)
        assert directives["style-src"] == "'self'"
    inline = InlineCode()
    inline.feed(response.text)
    assert inline.found == []


@pytest.mark.parametrize(
    ("origin", "host", "same"),
    [
        ("http://127.0.0.1:8000", "127.0.0.1:8000", True),
        ("https://medmo.example.org", "medmo.example.org:443", True),
        ("https://MEDMO.example.org", "medmo.example.org", True),
        ("http://[::1]:8000", "[::1]:8000", True),
        # Behind a proxy terminating TLS the page is https and the service sees http: the scheme is not compared.
        ("https://medmo.example.org", "medmo.example.org", True),
        ("http://127.0.0.1:8001", "127.0.0.1:8000", False),
        ("http://medmo.example.org.evil.example", "medmo.example.org", False),
        ("http://medmo.example.org:8000", "medmo.example.org", False),
        ("null", "medmo.example.org", False),
        ("file://", "medmo.example.org", False),
        ("http://medmo.example.org:99999", "medmo.example.org:99999", False),
        ("http://medmo.example.org", None, False),
    ],
)
def test_same_origin_is_the_host_and_port_the_request_was_sent_to(
    origin: str, host: str | None, same: bool
) -> None:
    assert same_origin(origin, host) is same


async def test_a_request_from_another_origin_is_refused_before_its_body_is_read() -> None:
    reached: list[str] = []

    async def route(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append("route")

    async def receive() -> Message:
        reached.append("body")
        return {"type": "http.request", "body": b"", "more_body": False}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    guard = BrowserGuard(route, cors_origins=[], cacheable_paths=())
    headers = [(b"host", b"127.0.0.1:8000"), (b"origin", b"http://127.0.0.1:9000")]
    scope = {"type": "http", "method": "POST", "path": "/vqa", "headers": headers, "query_string": b""}
    await guard(scope, receive, send)
    assert reached == []
    assert sent[0]["status"] == 403
    assert json.loads(sent[1]["body"])["error"]["code"] == "cross_origin_refused"


def test_requests_from_the_services_own_pages_and_from_clients_without_an_origin_are_served(
    random_client: TestClient,
) -> None:
    # TestClient sends Host: testserver.
    assert random_client.get("/info", headers={"Origin": "http://testserver"}).status_code == 200
    assert random_client.get("/info").status_code == 200
    for foreign in ["http://testserver:8080", "https://elsewhere.example", "null"]:
        refused = random_client.get("/info", headers={"Origin": foreign})
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "cross_origin_refused"
        assert "access-control-allow-origin" not in refused.headers
    on_openai_route = random_client.get("/v1/models", headers={"Origin": "null"})
    assert on_openai_route.status_code == 403
    assert on_openai_route.json()["error"]["type"] == "permission_error"  # OpenAI's shape on /v1


def test_a_text_plain_chat_request_is_refused_before_inference(random_client: TestClient) -> None:
    model_id = random_client.get("/v1/models").json()["data"][0]["id"]
    question = {"model": model_id, "messages": [{"role": "user", "content": "Is the heart enlarged?"}]}
    before = generated_tokens(random_client.get("/metrics").text)
    refused = random_client.post(
        "/v1/chat/completions", content=json.dumps(question), headers={"Content-Type": "text/plain"}
    )
    assert refused.status_code == 415
    assert refused.json()["error"]["code"] == "unsupported_media_type"
    assert generated_tokens(random_client.get("/metrics").text) == before
    assert random_client.post("/v1/chat/completions", json={**question, "max_tokens": 2}).status_code == 200
    assert generated_tokens(random_client.get("/metrics").text) > before  # the measure can tell


def test_another_host_is_refused_in_the_error_shape(random_checkpoint: Path) -> None:
    # No lifespan: the host is checked before any route, loaded model or not.
    app = create_app(settings_for(random_checkpoint, allowed_hosts=f"{ALLOWED_HOST},*.hospital.example"))
    client = TestClient(app, base_url=f"http://{ALLOWED_HOST}")
    assert client.get("/healthz").status_code == 200
    assert client.get("/healthz", headers={"Host": "pacs.hospital.example"}).status_code == 200
    for host in ["10.1.2.3", "evil.example", "medmo.example.org.evil.example"]:
        refused = client.get("/healthz", headers={"Host": host})
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "unknown_host"
        assert_browser_headers(refused)
        assert "x-request-id" in refused.headers
    openai = client.get("/v1/models", headers={"Host": "evil.example"})
    assert openai.status_code == 400
    assert openai.json()["error"]["code"] == "unknown_host"


def test_cors_preflight_is_allowed_for_a_configured_origin_only(random_checkpoint: Path) -> None:
    app = create_app(
        settings_for(random_checkpoint, cors_origins=f"{CONFIGURED_ORIGIN}/,https://other.example")
    )
    client = TestClient(app)
    asking = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, x-api-key, x-request-timeout, x-request-id, content-type",
    }
    allowed = client.options("/vqa", headers={"Origin": CONFIGURED_ORIGIN, **asking})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == CONFIGURED_ORIGIN
    assert "POST" in allowed.headers["access-control-allow-methods"]
    allowed_headers = {
        name.strip().lower() for name in allowed.headers["access-control-allow-headers"].split(",")
    }
    assert {
        "authorization",
        "x-api-key",
        "content-type",
        "accept",
        "x-request-id",
        "x-request-timeout",
    } <= allowed_headers
    assert_browser_headers(allowed)

    refused = client.options("/vqa", headers={"Origin": "https://elsewhere.example", **asking})
    assert refused.status_code == 403
    assert "access-control-allow-origin" not in refused.headers

    simple = client.get("/healthz", headers={"Origin": CONFIGURED_ORIGIN})
    assert simple.headers["access-control-allow-origin"] == CONFIGURED_ORIGIN
    exposed = {name.strip().lower() for name in simple.headers["access-control-expose-headers"].split(",")}
    assert exposed == {"x-request-id", "retry-after"}

    # Off by default: no origin is allowed, so a preflight is refused.
    default = TestClient(create_app(settings_for(random_checkpoint)))
    unconfigured = default.options("/vqa", headers={"Origin": CONFIGURED_ORIGIN, **asking})
    assert unconfigured.status_code == 403
    assert "access-control-allow-origin" not in unconfigured.headers


@pytest.fixture(scope="module")
def probe_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def open_server(
    random_checkpoint: Path, probe_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """No API keys (the case the attack needs), allowed hosts set, and a probe port."""
    env = {
        "MEDMO_ALLOWED_HOSTS": "127.0.0.1",
        "MEDMO_PROBE_PORT": str(probe_port),
        "MEDMO_VQA_MAX_NEW_TOKENS": "4",
        "MEDMO_CHAT_MAX_NEW_TOKENS": "4",
    }
    log = tmp_path_factory.mktemp("browsers") / "server.log"
    with serve(random_checkpoint, log, env=env) as server:
        yield server


def test_kubernetes_probes_with_the_pod_ip_as_host_are_answered_on_the_probe_port(
    open_server: RunningServer, probe_port: int
) -> None:
    pod_ip = {"Host": "10.1.2.3"}
    probes = f"http://127.0.0.1:{probe_port}"
    assert httpx.get(f"{probes}/healthz", headers=pod_ip, timeout=10).status_code == 200
    assert httpx.get(f"{probes}/readyz", headers=pod_ip, timeout=10).json() == {"status": "ready"}
    refused = httpx.get(f"{open_server.url}/healthz", headers=pod_ip, timeout=10)
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "unknown_host"


def generated_tokens(metrics: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "medmo_generated_tokens_total"
    )


def post_statuses(server: RunningServer) -> list[int]:
    """The status of every POST in the server's access log, in order."""
    time.sleep(0.2)  # let the last access lines reach the file
    lines = (json.loads(line) for line in server.log().splitlines() if line.startswith("{"))
    return [
        int(entry["status"])
        for entry in lines
        if entry.get("logger") == "medmo.access" and entry.get("method") == "POST"
    ]


def tokens_generated(server: RunningServer) -> float:
    return generated_tokens(httpx.get(f"{server.url}/metrics", timeout=10).text)


# Every request a page can send without a preflight: multipart and text/plain, by fetch() in both modes and
# by form submission. Each resolves to what the page could see of the answer.
ATTACK = """
async ([server, png]) => {
  const image = () => new File([Uint8Array.from(atob(png), (c) => c.charCodeAt(0))], "xray.png", {type: "image/png"});
  const upload = () => {
    const form = new FormData();
    form.append("image", image());
    form.append("question", "Is there an abnormality?");
    return form;
  };
  const chat = JSON.stringify({model: "any", messages: [{role: "user", content: "Is the heart enlarged?"}]});
  const seen = {};
  const attempts = {
    "multipart fetch": () => fetch(`${server}/vqa`, {method: "POST", body: upload()}),
    "multipart fetch, no-cors": () => fetch(`${server}/vqa`, {method: "POST", body: upload(), mode: "no-cors"}),
    "text/plain chat fetch": () => fetch(`${server}/v1/chat/completions`,
      {method: "POST", body: chat, headers: {"Content-Type": "text/plain"}}),
    "text/plain chat fetch, no-cors": () => fetch(`${server}/v1/chat/completions`,
      {method: "POST", body: chat, headers: {"Content-Type": "text/plain"}, mode: "no-cors"}),
  };
  for (const [name, attempt] of Object.entries(attempts)) {
    try {
      const response = await attempt();
      seen[name] = `${response.type} ${response.status}`;
    } catch (error) {
      seen[name] = `failed: ${error.name}`;
    }
  }
  const submit = (form) => new Promise((resolve) => {
    const frame = document.createElement("iframe");
    frame.name = `sink-${Math.random()}`;
    frame.onload = () => resolve("submitted");
    document.body.append(frame);
    form.target = frame.name;
    form.method = "POST";
    document.body.append(form);
    form.submit();
  });
  const multipart = document.createElement("form");
  multipart.action = `${server}/vqa`;
  multipart.enctype = "multipart/form-data";
  const file = document.createElement("input");
  file.type = "file";
  file.name = "image";
  const files = new DataTransfer();
  files.items.add(image());
  file.files = files.files;
  const question = Object.assign(document.createElement("input"), {name: "question", value: "Is there?"});
  multipart.append(file, question);
  seen["multipart form"] = await submit(multipart);
  // The classic text/plain form: name and value joined by "=" make a JSON body.
  const plain = document.createElement("form");
  plain.action = `${server}/v1/chat/completions`;
  plain.enctype = "text/plain";
  const field = document.createElement("input");
  field.name = chat.slice(0, -1) + ', "padding": "';
  field.value = '"}';
  plain.append(field);
  seen["text/plain form"] = await submit(plain);
  return seen;
}
"""


@pytest.fixture
def other_origin(tmp_path: Path) -> Iterator[str]:
    """An empty page on another loopback port: another origin, as a site on the web is."""
    (tmp_path / "index.html").write_text("<!doctype html><title>elsewhere</title><body></body>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_page_on_another_origin_cannot_make_a_browser_run_the_model(
    open_server: RunningServer, other_origin: str
) -> None:
    png = base64.b64encode(png_bytes()).decode()
    tokens_before = tokens_generated(open_server)
    posts_before = len(post_statuses(open_server))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{other_origin}/index.html")
            seen: dict[str, Any] = page.evaluate(ATTACK, [open_server.url, png])
            tokens_after_attack = tokens_generated(open_server)

            # The service's own page, in the same browser, is served: the refusal is about the origin.
            own = browser.new_page()
            own.goto(f"{open_server.url}/")
            status = own.evaluate(
                """async ([png]) => {
                  const form = new FormData();
                  form.append("image", new Blob([Uint8Array.from(atob(png), (c) => c.charCodeAt(0))]), "x.png");
                  form.append("question", "Is there an abnormality?");
                  return (await fetch("/vqa", {method: "POST", body: form})).status;
                }""",
                [png],
            )
        finally:
            browser.close()

    # The page learnt nothing, every attempt reached the service and was refused there, and the model did
    # not run; on the service's own page it did, so the measure can tell.
    assert seen == {
        "multipart fetch": "failed: TypeError",
        "multipart fetch, no-cors": "opaque 0",
        "text/plain chat fetch": "failed: TypeError",
        "text/plain chat fetch, no-cors": "opaque 0",
        "multipart form": "submitted",
        "text/plain form": "submitted",
    }
    assert post_statuses(open_server)[posts_before:] == [403] * len(seen) + [200]
    assert tokens_after_attack == tokens_before
    assert status == 200
    assert tokens_generated(open_server) > tokens_after_attack
