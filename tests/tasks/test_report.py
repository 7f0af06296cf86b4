from __future__ import annotations

import pytest

from app.tasks.report import ReportFields, parse_report, report_prompt


def test_findings_blank_line_impression_as_medmo_was_trained() -> None:
    text = "The lungs are clear.\nNo effusion.\n\nNo acute cardiopulmonary process."
    report = parse_report(text)
    assert report.findings == "The lungs are clear.\nNo effusion."
    assert report.impression == "No acute cardiopulmonary process."
    assert report.text == text


@pytest.mark.parametrize(
    "text",
    [
        "Findings: Clear lungs.\nImpression: Normal chest.",
        "FINDINGS:\nClear lungs.\n\nIMPRESSION:\nNormal chest.",
        "**Findings:** Clear lungs.\n\n**Impression:** Normal chest.",
        "## Findings\nClear lungs.\n## Conclusion\nNormal chest.",
    ],
)
def test_headed_sections(text: str) -> None:
    report = parse_report(text)
    assert report.findings == "Clear lungs."
    assert report.impression == "Normal chest."


def test_a_single_paragraph_has_no_impression() -> None:
    report = parse_report("Heart size is normal. Lungs are clear.")
    assert report.findings == "Heart size is normal. Lungs are clear."
    assert report.impression is None


def test_findings_paragraphs_stay_together_before_the_last_one() -> None:
    report = parse_report("Para one.\n\nPara two.\n\nImpression text.")
    assert report.findings == "Para one.\n\nPara two."
    assert report.impression == "Impression text."


def test_prompt_carries_modality_and_indication() -> None:
    prompt = report_prompt(ReportFields(modality="CT", indication="trauma"))
    assert prompt.startswith("Generate a detailed radiology report based on the given CT image.")
    assert "Clinical indication: trauma" in prompt
    assert report_prompt(ReportFields()) == (
        "Generate a detailed radiology report based on the given medical image."
    )
