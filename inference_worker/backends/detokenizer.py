"""Turn a stream of token ids into a stream of text without splitting characters."""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decodes token by token; emits text only once it is complete.

    Byte-level BPE can split one UTF-8 character over several tokens: a decode that
    ends in U+FFFD is held back until the next token completes it. Decoding a short
    window (prefix_offset..) keeps the cost per token constant, and concatenating
    every piece gives exactly `tokenizer.decode(all_ids, skip_special_tokens=True)`.
    """

    def __init__(self, tokenizer: Any, shown: dict[int, str] | None = None) -> None:
        self._tokenizer = tokenizer
        # Special tokens that are part of the answer's text (a tool-call marker), as
        # they are written; every other special token is left out.
        self._shown = shown or {}
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def add(self, token_id: int) -> str:
        if token_id in self._shown:
            return self.flush() + self._shown[token_id]
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]


class TokenTexts:
    """Each token's own text (for log probabilities), decoded once per id."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
            # Decoded alone, a SentencePiece token loses the space it starts with
            # ("▁word"); byte-level BPE keeps it ("Ġword" decodes to " word").
            piece = self._tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" "):
                text = " " + text
            self._texts[token_id] = text
        return text
