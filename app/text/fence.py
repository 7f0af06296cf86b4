"""The text fence: every client string bound for the prompt, checked in one place before anything is
tokenized, as the image fence (`app/imaging/fence.py`) checks every image before it is decoded.

A request's texts (a task's fields, captions, chat messages) are refused with 422 naming the field:

- past MEDMO_MAX_PROMPT_CHARS together: counted from the strings' lengths before any is read, so a huge
  text costs nothing more than its upload;
- not valid Unicode (a lone surrogate, which JSON can carry and no tokenizer can encode);
- holding a control character other than tab, newline and carriage return (nothing a report needs, and
  what terminals and logs misread);
- holding one of the model's control tokens as text (`<|im_start|>`, `<|im_end|>`, `<|image_pad|>`, ...).

Why refuse the control tokens rather than tokenize them as plain text: the processor tokenizes the whole
templated conversation in one call, where the template's own control tokens must stay control tokens, so it
cannot read a client's part as plain text alone. Typed into a question, `<|im_end|><|im_start|>system`
would open a turn of the client's choosing, and `<|image_pad|>` would claim image features that were never
sent. Refusing them keeps every turn of the prompt the service's own. Ordinary text never holds them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

# C0 and C1 control characters, but for tab, newline and carriage return.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
QUOTED_CHARS = 40  # of a field's name or a token, at most, in a message


class TextRefusedError(ValueError):
    """A client text the prompt cannot take; the message names the field and says why, never quotes it."""


@dataclass(frozen=True)
class TextFence:
    control_tokens: frozenset[str]  # the model's tokenizer's special tokens, as they are written
    max_chars: int  # MEDMO_MAX_PROMPT_CHARS: a request's texts together

    def check(self, texts: Iterable[tuple[str, str]]) -> None:
        """Check a request's (field, text) pairs; TextRefusedError for the first that cannot go in."""
        pairs = list(texts)
        total = sum(len(text) for _, text in pairs)
        if total > self.max_chars:
            raise TextRefusedError(
                f"the request's texts hold {total} characters together, more than the {self.max_chars} the "
                "prompt takes (MEDMO_MAX_PROMPT_CHARS)"
            )
        for field, text in pairs:
            self._check_one(field[:QUOTED_CHARS], text)

    def _check_one(self, field: str, text: str) -> None:
        if _SURROGATE.search(text):
            raise TextRefusedError(f"{field}: not valid Unicode (a lone surrogate)")
        if _CONTROL.search(text):
            raise TextRefusedError(f"{field}: holds a control character (only tab and line breaks are taken)")
        found = self._tokens.search(text) if self.control_tokens else None
        if found is not None:
            raise TextRefusedError(
                f"{field}: holds {found.group(0)[:QUOTED_CHARS]}, a control token of the model's tokenizer, "
                "which client text may not carry"
            )

    @cached_property
    def _tokens(self) -> re.Pattern[str]:
        # One pass over the text for all of them; the longest first, so a token is named whole.
        return re.compile("|".join(map(re.escape, sorted(self.control_tokens, key=len, reverse=True))))
