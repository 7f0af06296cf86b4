"""Radiology report generation. MedMO's training targets are the findings, a blank line, the impression."""

from __future__ import annotations

import re

from app.schemas import Report, ReportFields
from app.tasks.text import strip_wrappers

# A heading is the word followed by a colon, or alone on its line (markdown # and ** allowed around it).
_HEADING = (
    r"(?:^|\n)[ \t]*(?:#+[ \t]*)?(?:\*\*)?[ \t]*{name}[ \t]*(?:\*\*)?[ \t]*"
    r"(?::[ \t]*(?:\*\*)?|(?=\n|$))[ \t]*"
)
_FINDINGS = re.compile(_HEADING.format(name="findings"), re.IGNORECASE)
_IMPRESSION = re.compile(_HEADING.format(name="(?:impressions?|conclusions?)"), re.IGNORECASE)
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def report_prompt(fields: ReportFields) -> str:
    subject = f"{fields.modality} image" if fields.modality else "medical image"
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
