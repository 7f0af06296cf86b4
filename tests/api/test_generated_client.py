"""A client generated from the live /openapi.json with openapi-python-client, used as another team would."""

from __future__ import annotations

import base64
import importlib
import io
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import httpx
import pytest

from bench.servers import RunningServer, console_script
from tests.conftest import LIVE_API_KEY, png_bytes, pydicom_file


@pytest.fixture(scope="module")
def medmo_client(
    live_server: RunningServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModuleType]:
    folder = tmp_path_factory.mktemp("generated")
    spec = folder / "openapi.json"
    spec.write_text(httpx.get(f"{live_server.url}/openapi.json").text)
    generated = subprocess.run(
        [
            console_script("openapi-python-client"),
            "generate",
            "--path",
            str(spec),
            "--output-path",
            str(folder / "medmo_client"),
            "--meta",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert generated.returncode == 0, generated.stdout + generated.stderr
    # The generator knows no application/dicom request body (raw DICOM, for PACS); generated clients send
    # DICOM as the multipart file instead. Nor does it read picture responses (the preview, findings
    # drawn): those stay untyped bytes. Any other warning is a defect in the schema.
    warnings = re.findall(r"WARNING parsing (.+?)\n\n(.+?)\n", generated.stderr)
    assert warnings, "expected the generator to report the raw DICOM bodies it skips"
    expected = re.compile(r"Unsupported content type application/dicom|.*Unsupported content_type image/")
    assert all(expected.match(reason) for _, reason in warnings), warnings
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module("medmo_client")
    finally:
        sys.path.remove(str(folder))
        for name in [
            name for name in sys.modules if name == "medmo_client" or name.startswith("medmo_client.")
        ]:
            del sys.modules[name]


def api(medmo_client: ModuleType, name: str) -> Any:
    return importlib.import_module(f"medmo_client.{name}")


@pytest.fixture
def connect(medmo_client: ModuleType, live_server: RunningServer) -> Iterator[Callable[..., Any]]:
    """Make authenticated clients of the generated package; close them after the test."""
    opened: list[Any] = []

    def client(**options: Any) -> Any:
        made = medmo_client.AuthenticatedClient(base_url=live_server.url, timeout=60, **options)
        opened.append(made)
        return made

    yield client
    for made in opened:
        made.get_httpx_client().close()


def upload(medmo_client: ModuleType, data: bytes, name: str = "scan.png", mime: str = "image/png") -> Any:
    return api(medmo_client, "types").File(payload=io.BytesIO(data), file_name=name, mime_type=mime)


def test_typed_calls_with_a_bearer_key(medmo_client: ModuleType, connect: Callable[..., Any]) -> None:
    models = api(medmo_client, "models")
    client = connect(token=LIVE_API_KEY)

    answer = api(medmo_client, "api.tasks.vqa").sync(
        client=client,
        body=models.VqaUpload(image=[upload(medmo_client, png_bytes(120, 80))], question="Effusion?"),
    )
    assert isinstance(answer, models.VqaResponse)
    assert isinstance(answer.answer, str)
    assert (answer.image.width, answer.image.height) == (120, 80)
    assert answer.usage.completion_tokens > 0

    report = api(medmo_client, "api.tasks.report").sync(
        client=client,
        body=models.ReportUpload(
            image=[upload(medmo_client, png_bytes())], modality="chest X-ray", indication="cough"
        ),
    )
    assert isinstance(report, models.ReportResponse)
    assert isinstance(report.report, models.Report)
    assert isinstance(report.report.findings, str)

    grounded = api(medmo_client, "api.tasks.ground").sync(
        client=client, body=models.GroundUpload(image=[upload(medmo_client, png_bytes())], target="nodule")
    )
    assert isinstance(grounded, models.GroundResponse)
    assert isinstance(grounded.findings, list)
    assert grounded.box_convention.value == "pixel"

    study = api(medmo_client, "api.tasks.report").sync(
        client=client,
        body=models.ReportUpload(
            image=[upload(medmo_client, png_bytes(96, 64)), upload(medmo_client, png_bytes(64, 96))],
            caption=["frontal", "lateral"],
        ),
    )
    assert isinstance(study, models.ReportResponse)
    assert [(image.index, image.caption, image.width) for image in study.images] == [
        (0, "frontal", 96),
        (1, "lateral", 64),
    ]


def test_json_bodies_dicom_uploads_and_the_x_api_key_header(
    medmo_client: ModuleType, connect: Callable[..., Any]
) -> None:
    models = api(medmo_client, "models")
    client = connect(token=LIVE_API_KEY, prefix="", auth_header_name="X-API-Key")
    body = models.VqaJson(image=base64.b64encode(png_bytes()).decode(), question="Normal?")
    assert isinstance(api(medmo_client, "api.tasks.vqa").sync(client=client, body=body), models.VqaResponse)
    dicom = upload(medmo_client, pydicom_file("CT_small.dcm"), "ct.dcm", "application/dicom")
    report = api(medmo_client, "api.tasks.report").sync(
        client=client, body=models.ReportUpload(image=[dicom], window="lung")
    )
    assert isinstance(report, models.ReportResponse)
    assert report.dicom.modality == "CT"
    assert report.dicom.window.source == "lung"


def test_errors_come_back_typed(medmo_client: ModuleType, connect: Callable[..., Any]) -> None:
    models = api(medmo_client, "models")
    vqa = api(medmo_client, "api.tasks.vqa")
    unreadable = models.VqaUpload(image=[upload(medmo_client, b"not an image")], question="q")
    error = vqa.sync(client=connect(token=LIVE_API_KEY), body=unreadable)
    assert isinstance(error, models.ErrorResponse)
    assert error.error.code == "unreadable_image"
    denied = vqa.sync_detailed(client=connect(token="not-the-key-of-this-server"), body=unreadable)
    assert denied.status_code == 401
    assert isinstance(denied.parsed, models.ErrorResponse)
