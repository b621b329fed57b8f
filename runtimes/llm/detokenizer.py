"""Incremental detokenization with stop strings: token ids in, text deltas out.

    stream = TextStream(tokenizer, prompt_ids, stop=("\\n\\n",))
    stream.add(token_id)            # may set stream.stopped (a stop string appeared)
    delta = stream.take()           # text safe to send now
    delta = stream.take(final=True) # at the end: everything left

Decoding one token at a time is wrong for byte-level and SentencePiece vocabularies (a
character may span tokens, a leading space depends on the previous token), so each step
decodes a short window of recent tokens and keeps only what it adds, holding back text
that ends in an incomplete UTF-8 sequence (U+FFFD) until the next token completes it.

Stop strings: the text is cut right before the first stop string found, and the stream
stops. Until then, text that could still turn into a stop string (a suffix that is a
prefix of one) is held back, so a partial stop string is never sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# prompt tokens decoded with the first output tokens, so spacing and merges come out right
_PROMPT_CONTEXT = 6


class Decoding(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class TextStream:
    """The generated text of one sequence, growing by tokens."""

    __slots__ = ("_ids", "_prefix", "_read", "_sent", "_stop", "_stop_max", "_tokenizer", "stopped", "text")

    def __init__(self, tokenizer: Decoding, prompt_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_ids[-_PROMPT_CONTEXT:])
        self._prefix = 0            # window start
        self._read = len(self._ids)  # tokens before this are already turned into text
        self.text = ""              # generated text so far (cut at a stop string)
        self._sent = 0              # characters of text handed out by take()
        self._stop = tuple(stop)
        self._stop_max = max((len(s) for s in self._stop), default=0)
        self.stopped = False

    def add(self, token_id: int) -> None:
        """Append a generated token; its text (if complete) joins self.text."""
        if self.stopped:
            return
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix:self._read])
        after = decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._append(after[len(before):])
            self._prefix, self._read = self._read, len(self._ids)

    def _flush(self) -> None:
        """At the end: whatever the last tokens decode to, complete or not."""
        if self._read < len(self._ids):
            before = self._tokenizer.decode(self._ids[self._prefix:self._read])
            after = self._tokenizer.decode(self._ids[self._prefix:])
            self._read = len(self._ids)
            if len(after) > len(before):
                self._append(after[len(before):])

    def _append(self, delta: str) -> None:
        start = len(self.text)
        self.text += delta
        if not self._stop:
            return
        # a stop string may straddle the old end: search from stop_max - 1 characters before it
        search_from = max(0, start - self._stop_max + 1)
        found = [i for s in self._stop if (i := self.text.find(s, search_from)) != -1]
        if found:
            self.text = self.text[:min(found)]
            self.stopped = True

    def _held(self) -> int:
        """Characters at the end of text that may still become a stop string."""
        text = self.text
        for length in range(min(len(text), self._stop_max - 1), 0, -1):
            tail = text[-length:]
            if any(s.startswith(tail) for s in self._stop):
                return length
        return 0

    def take(self, final: bool = False) -> str:
        """The text not handed out yet that is safe to send (all of it when final or stopped)."""
        if final and not self.stopped:
            self._flush()
        end = len(self.text)
        if not (final or self.stopped) and self._stop:
            end -= self._held()
        if end <= self._sent:
            return ""
        delta = self.text[self._sent:end]
        self._sent = end
        return delta
