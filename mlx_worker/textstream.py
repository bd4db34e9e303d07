"""Generated token ids -> the exact text to append, streamed.

The text is decode(prompt + generated) - decode(prompt), decoded from a window
that starts inside the prompt's tail, holding back an incomplete UTF-8
character and a possible stop string's start; a stop string ends generation
at the token that completes it. Spec: protocol/README.md § Text.
"""

from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"
PROMPT_TAIL = 4
MAX_INCOMPLETE_TOKENS = 3


class TextStream:
    def __init__(
        self,
        decode: Callable[[list[int]], str],
        prompt_tokens: Sequence[int],
        stop: Sequence[str] = (),
    ):
        self._decode = decode
        self._ids: list[int] = list(prompt_tokens[-PROMPT_TAIL:])
        self._prefix = 0  # window start: text before it is settled
        self._read = len(self._ids)  # text up to here has been handed out
        self._stops = [s for s in stop if s]
        self._held = ""  # decoded, but possibly the start of a stop string
        self.stop_string: str | None = None

    @property
    def stopped(self) -> bool:
        return self.stop_string is not None

    def push(self, token: int) -> str:
        """Add one generated token; return the text that is now safe to emit."""
        self._ids.append(token)
        new_text = self._decode(self._ids[self._prefix :])
        end = len(self._ids)
        if new_text.endswith(REPLACEMENT):
            # The characters before the incomplete one are final: a stop
            # string among them ends the generation at this token, not at the
            # token that completes the character.
            settled = new_text[len(self._decode(self._ids[self._prefix : self._read])) : -1]
            if self._stop_in(self._held + settled):
                self._prefix, self._read = self._read, end
                return self._filter(settled)
            # An incomplete character spans at most its last 3 bytes, so at
            # most 3 tokens. Held longer, the bytes before those can never
            # complete: release them if they decode the same on their own
            # (the cut is then at a character boundary).
            end -= MAX_INCOMPLETE_TOKENS
            if end <= self._read or not new_text.startswith(self._decode(self._ids[self._prefix : end])):
                return ""
            new_text = self._decode(self._ids[self._prefix : end])
        delta = new_text[len(self._decode(self._ids[self._prefix : self._read])) :]
        self._prefix, self._read = self._read, end
        return self._filter(delta)

    def finish(self) -> str:
        """Release everything held: the generation is over."""
        if self.stopped:
            return ""
        delta = ""
        if self._read < len(self._ids):
            new_text = self._decode(self._ids[self._prefix :])
            delta = new_text[len(self._decode(self._ids[self._prefix : self._read])) :]
            self._read = len(self._ids)
        text = self._filter(delta)
        if not self.stopped:
            text += self._held
            self._held = ""
        return text

    def _stop_in(self, text: str) -> bool:
        return any(s in text for s in self._stops)

    def _filter(self, delta: str) -> str:
        if not self._stops:
            return delta
        buf = self._held + delta
        cut = -1
        for s in self._stops:
            i = buf.find(s)
            if i >= 0 and (cut < 0 or i < cut):
                cut, self.stop_string = i, s
        if cut >= 0:
            self._held = ""
            return buf[:cut]
        keep = _partial_stop_len(buf, self._stops)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]


def _partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that begins some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
