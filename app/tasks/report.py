"""Radiology report generation. MedMO's training targets are the findings, a blank line, the impression."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

import highdicom as hd
from pydantic import BaseModel, Field
from pydicom.sr.codedict import codes

from app.imaging import DicomSource
from app.outputs.dicom_sr import container_item, text_item
from app.outputs.results import Results
from app.schemas import BoxConvention, TaskFields, TaskResponse
from app.tasks.base import Reading, Task
from app.tasks.text import strip_wrappers

# A heading is the word followed by a colon, or alone on its line (markdown # and ** allowed around it).
_HEADING = (
    r"(?:^|\n)[ \t]*(?:#+[ \t]*)?(?:\*\*)?[ \t]*{name}[ \t]*(?:\*\*)?[ \t]*"
    r"(?::[ \t]*(?:\*\*)?|(?=\n|$))[ \t]*"
)
_FINDINGS = re.compile(_HEADING.format(name="findings"), re.IGNORECASE)
_IMPRESSION = re.compile(_HEADING.format(name="(?:impressions?|conclusions?)"), re.IGNORECASE)
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


class ReportFields(TaskFields):
    modality: str | None = Field(
        None,
        max_length=64,
        description="Imaging modality, if known; it is named in the prompt.",
        examples=["chest X-ray"],
    )
    indication: str | None = Field(
        None,
        max_length=4000,
        description="Clinical context (indication, history) given to the model with the image.",
        examples=["Fever and cough for three days."],
    )


class Report(BaseModel):
    findings: str = Field(description="The findings section.", examples=["The lungs are clear."])
    impression: str | None = Field(
        description="The impression section; null when the model wrote none.",
        examples=["No acute cardiopulmonary process."],
    )
    text: str = Field(
        description="The report exactly as the model wrote it.",
        examples=["The lungs are clear.\n\nNo acute cardiopulmonary process."],
    )


class ReportResponse(TaskResponse):
    task: Literal["report"] = Field("report", description="The task that answered.", examples=["report"])
    report: Report = Field(
        description="The report, split into its sections.",
        examples=[
            {
                "findings": "The lungs are clear.",
                "impression": "No acute cardiopulmonary process.",
                "text": "The lungs are clear.\n\nNo acute cardiopulmonary process.",
            }
        ],
    )


def report_prompt(fields: ReportFields, images: int = 1) -> str:
    subject = f"{fields.modality} image" if fields.modality else "medical image"
    subject += "s" if images > 1 else ""
    prompt = f"Generate a detailed radiology report based on the given {subject}."
    if fields.indication:
        prompt += f"\nClinical indication: {fields.indication}"
    return prompt


def parse_report(text: str) -> Report:
    """Split a report into findings and impression, by headings if present, else by the last blank line."""
    body = strip_wrappers(text)
    impression: str | None = None
    heading = _last_match(_IMPRESSION, body)
    if heading is not None:
        findings, impression = body[: heading.start()], body[heading.end() :]
    else:
        paragraphs = _BLANK_LINE.split(body)
        if len(paragraphs) > 1:
            findings, impression = "\n\n".join(paragraphs[:-1]), paragraphs[-1]
        else:
            findings = body
    findings = _FINDINGS.sub("", findings, count=1).strip()
    impression = impression.strip() if impression is not None else None
    return Report(findings=findings, impression=impression or None, text=text)


def _last_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    found = None
    for found in pattern.finditer(text):  # noqa: B007 - the last one is wanted
        pass
    return found


class RadiologyReport(Task[ReportFields, Report]):
    name = "report"
    summary = "Write a radiology report (findings and impression) for an image"
    fields = ReportFields
    response = ReportResponse
    default_max_new_tokens = 1024
    report_title = "report"

    def prompt(self, fields: ReportFields, box_convention: BoxConvention, images: int = 1) -> str:
        return report_prompt(fields, images)

    def parse(self, text: str, reading: Reading) -> Report:
        return parse_report(text)

    def answer(self, parsed: Report, texts: Sequence[str], box_convention: BoxConvention) -> dict[str, Any]:
        return {"report": parsed}

    def results(self, fields: ReportFields, parsed: Report, texts: Sequence[str]) -> Results:
        """The indication the client gave, then the findings and the impression as the parser split them
        (the whole text as findings when it found no sections)."""
        sections = [("Indication", fields.indication)] if fields.indication else []
        sections.append(("Findings", parsed.findings or parsed.text))
        if parsed.impression:
            sections.append(("Impression", parsed.impression))
        return Results(task=self.name, texts=tuple(sections))

    def report_content(
        self, fields: ReportFields, parsed: Report, sources: Sequence[DicomSource]
    ) -> Sequence[hd.sr.ContentItem]:
        items: list[hd.sr.ContentItem] = []
        if fields.indication:
            items.append(text_item(codes.DCM.IndicationsForProcedure, fields.indication))
        findings = text_item(codes.DCM.Finding, parsed.findings or parsed.text)
        items.append(container_item(codes.DCM.Findings, [findings]))
        if parsed.impression:
            items.append(
                container_item(codes.DCM.Impressions, [text_item(codes.DCM.Impression, parsed.impression)])
            )
        return items


REPORT = RadiologyReport()
