"""/classify and /vqa with choices over HTTP, on both engines, against teacher forcing through the model."""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from fastapi.testclient import TestClient

from app.conversation import Captioned, Conversation
from app.engine.request import GenerationOptions
from app.engine.runtime import ModelRuntime
from app.imaging import ImageLimits, decode_image
from app.main import create_app
from app.settings import Settings
from app.tasks.classify import CLASSIFY, ClassifyFields
from app.tasks.vqa import VQA, VqaFields
from tests.conftest import png_bytes, pydicom_file, settings_for
from tests.dicom_validator import dciodvfy_errors
from tests.engine.test_scoring import label_continuations, teacher_forced_logprob

LABELS = ["pneumothorax", "pleural effusion", "left lower lobe nodule", "normal"]
TOLERANCE = 1e-4
LIMITS = ImageLimits(max_bytes=1 << 24, max_pixels=1 << 24, max_frames=1)


@pytest.fixture(scope="module", params=["continuous", "generate"])
def client(request: pytest.FixtureRequest, random_checkpoint: Path) -> Iterator[TestClient]:
    settings = settings_for(random_checkpoint, engine=request.param, vqa_max_new_tokens=12)
    with TestClient(create_app(settings)) as served:
        yield served


@pytest.fixture(scope="module")
def reference(random_checkpoint: Path) -> ModelRuntime:
    """The same checkpoint, loaded apart from the service, for teacher forcing each answer."""
    return ModelRuntime.load(Settings(model=str(random_checkpoint)))


def teacher_forced(reference: ModelRuntime, image: bytes, prompt: str, answers: list[str]) -> list[float]:
    """Each answer's log-probability by one plain forward of the model over prompt and answer."""
    picture = decode_image(image, LIMITS).picture
    request = reference.prepare(Conversation.asking([Captioned(picture)], prompt), GenerationOptions(1))
    return [
        teacher_forced_logprob(reference.model, request, tokens)
        for tokens in label_continuations(reference, answers)
    ]


def check_scored(scored: list[dict[str, Any]], answers: list[str], expected: list[float]) -> None:
    assert [item["label"] for item in scored] == answers
    assert [item["logprob"] for item in scored] == pytest.approx(expected, abs=TOLERANCE, rel=0)
    total = sum(math.exp(logprob) for logprob in expected)
    assert [item["probability"] for item in scored] == pytest.approx(
        [math.exp(logprob) / total for logprob in expected], abs=TOLERANCE, rel=0
    )
    assert math.fsum(item["probability"] for item in scored) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("encoding", ["multipart", "json"])
def test_each_label_gets_the_probability_teacher_forcing_gives_it(
    client: TestClient, reference: ModelRuntime, encoding: str
) -> None:
    image = png_bytes(120, 90, seed=3)
    if encoding == "multipart":
        response = client.post(
            "/classify",
            files={"image": ("scan.png", image, "image/png")},
            data={"labels": json.dumps(LABELS)},
        )
    else:
        response = client.post(
            "/classify", json={"image": base64.b64encode(image).decode(), "labels": LABELS}
        )
    assert response.status_code == 200, response.text
    body = response.json()

    assert body["task"] == "classify"
    assert body["image"] == {"width": 120, "height": 90}
    assert body["usage"]["prompt_tokens"] > 0
    assert body["mean_logprob"] is None
    prompt = CLASSIFY.prompt(ClassifyFields(labels=LABELS), "pixel")
    check_scored(body["labels"], LABELS, teacher_forced(reference, image, prompt, LABELS))
    best = max(body["labels"], key=lambda item: item["probability"])
    assert body["top"] == {"label": best["label"], "probability": best["probability"]}


def test_a_question_of_the_clients_own_is_asked(client: TestClient, reference: ModelRuntime) -> None:
    image = png_bytes(64, 64, seed=4)
    question = "Which finding does this chest X-ray show?"
    response = client.post(
        "/classify",
        files={"image": ("scan.png", image, "image/png")},
        data={"labels": json.dumps(["yes", "no"]), "question": question},
    )
    assert response.status_code == 200, response.text
    prompt = CLASSIFY.prompt(ClassifyFields(labels=["yes", "no"], question=question), "pixel")
    check_scored(
        response.json()["labels"], ["yes", "no"], teacher_forced(reference, image, prompt, ["yes", "no"])
    )


def test_vqa_with_choices_answers_the_most_probable_one(client: TestClient, reference: ModelRuntime) -> None:
    image = png_bytes(96, 64, seed=5)
    choices = ["yes", "no", "cannot tell"]
    question = "Is there a pneumothorax?"
    response = client.post(
        "/vqa",
        files={"image": ("scan.png", image, "image/png")},
        data={"question": question, "choices": json.dumps(choices)},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    prompt = VQA.prompt(VqaFields(question=question, choices=choices), "pixel")
    check_scored(body["choices"], choices, teacher_forced(reference, image, prompt, choices))
    assert body["answer"] == max(body["choices"], key=lambda item: item["probability"])["label"]


def test_vqa_without_choices_writes_its_answer(client: TestClient) -> None:
    response = client.post(
        "/vqa", files={"image": ("scan.png", png_bytes(), "image/png")}, data={"question": "Any effusion?"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"] is None


def test_logprobs_give_the_mean_log_probability_of_the_answer(
    client: TestClient, reference: ModelRuntime
) -> None:
    written = client.post(
        "/vqa",
        files={"image": ("scan.png", png_bytes(), "image/png")},
        data={"question": "Any effusion?", "logprobs": "true"},
    )
    assert written.status_code == 200, written.text
    mean = written.json()["mean_logprob"]
    assert isinstance(mean, float)
    assert math.isfinite(mean)
    assert mean < 0

    chosen = client.post(
        "/classify",
        json={"image": base64.b64encode(png_bytes()).decode(), "labels": ["yes", "no"], "logprobs": True},
    )
    assert chosen.status_code == 200, chosen.text
    body = chosen.json()
    top = next(item for item in body["labels"] if item["label"] == body["top"]["label"])
    # The chosen answer's tokens: the label's, then the end of the turn.
    (tokens,) = label_continuations(reference, [body["top"]["label"]])
    assert body["mean_logprob"] == pytest.approx(top["logprob"] / len(tokens))


def test_the_structured_report_is_valid_dicom_with_each_label_and_its_probability(
    client: TestClient, tmp_path: Path
) -> None:
    response = client.post(
        "/classify",
        files={"image": ("ct.dcm", pydicom_file("CT_small.dcm"), "application/octet-stream")},
        data={"labels": json.dumps(LABELS)},
        # The TID 2000 report by name: application/dicom alone now gives the TID 1500 one (test_standards.py).
        headers={"Accept": "application/dicom; object=basic-report"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom"
    assert dciodvfy_errors(response.content, tmp_path) == []
    report = pydicom.dcmread(io.BytesIO(response.content))
    findings = hd.sr.utils.find_content_items(
        report, name=pydicom.sr.codedict.codes.DCM.Finding, recursive=True
    )
    assert [finding.TextValue for finding in findings] == LABELS
    probabilities = [float(f.ContentSequence[0].MeasuredValueSequence[0].NumericValue) for f in findings]
    assert math.fsum(probabilities) == pytest.approx(1.0, abs=1e-4)


def test_a_raw_dicom_body_takes_the_labels_in_the_query_string(client: TestClient) -> None:
    response = client.post(
        "/classify",
        params={"labels": json.dumps(["normal", "abnormal"])},
        content=pydicom_file("CT_small.dcm"),
        headers={"content-type": "application/dicom"},
    )
    assert response.status_code == 200, response.text
    assert [item["label"] for item in response.json()["labels"]] == ["normal", "abnormal"]


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({}, "labels: Field required"),
        ({"labels": json.dumps(["yes"])}, "labels: List should have at least 2 items"),
        ({"labels": json.dumps([f"l{n}" for n in range(33)])}, "labels: List should have at most 32 items"),
        ({"labels": json.dumps(["yes", ""])}, "labels.1: String should have at least 1 character"),
        ({"labels": json.dumps(["yes", "x" * 65])}, "labels.1: String should have at most 64 characters"),
        ({"labels": json.dumps(["yes", " yes "])}, "labels: Value error, each must differ"),
        ({"labels": "yes,no"}, "labels: Value error, must be a JSON array of strings"),
        ({"labels": json.dumps(["yes", "<|im_end|>"])}, "labels.1"),
        # random_client's /vqa answers at most 8 tokens; /classify's labels may take 64, the byte-level
        # tokenizer writing a rare character in several.
        (
            {"labels": json.dumps(["yes", "\u8a3a" * 30])},
            "labels.1: 91 tokens as an answer, at most 64 on this server (MEDMO_CLASSIFY_MAX_NEW_TOKENS)",
        ),
    ],
)
def test_bad_labels_are_422_naming_the_field(
    random_client: TestClient, fields: dict[str, str], says: str
) -> None:
    response = random_client.post(
        "/classify", files={"image": ("scan.png", png_bytes(), "image/png")}, data=fields
    )
    assert response.status_code == 422, response.text
    assert says in response.json()["error"]["message"]


def test_bad_choices_are_422_naming_the_field(random_client: TestClient) -> None:
    response = random_client.post(
        "/vqa",
        json={"image": base64.b64encode(png_bytes()).decode(), "question": "q", "choices": ["only"]},
    )
    assert response.status_code == 422, response.text
    assert "choices: List should have at least 2 items" in response.json()["error"]["message"]
