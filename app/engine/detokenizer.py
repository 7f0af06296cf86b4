"""Text as the tokens arrive: the new text each batch of tokens adds, for streamed answers.

Decoding the whole answer again at every token costs time quadratic in its length. Decoding only a short
window does not: the text of the tokens from an offset, minus the text of the tokens already shown from
that offset (the method vLLM and TGI use). A token that ends inside a multi-byte character decodes to
U+FFFD until the next token completes it, so text ending in one is held back. The deltas put together are
the text that decoding all the tokens at once gives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class Detokenizer:
    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._tokens: list[int] = []
        self._window = 0  # where the decoding window starts
        self._shown = 0  # tokens whose text has been handed out
        self.text = ""  # all the text handed out so far

    def push(self, token_ids: Sequence[int]) -> str:
        """The text these tokens add to what was handed out before ("" while a character is incomplete)."""
        self._tokens.extend(token_ids)
        shown_text = self._decode(self._tokens[self._window : self._shown])
        window_text = self._decode(self._tokens[self._window :])
        if len(window_text) <= len(shown_text) or window_text.endswith(REPLACEMENT):
            return ""
        delta = window_text[len(shown_text) :]
        self._window, self._shown = self._shown, len(self._tokens)
        self.text += delta
        return delta

    def finish(self, full_text: str) -> str:
        """The rest of `full_text` (all the tokens decoded at once) after what was handed out."""
        if not full_text.startswith(self.text):
            return ""  # cannot happen with a consistent tokenizer; never hand out text twice
        delta = full_text[len(self.text) :]
        self.text = full_text
        return delta
