"""A lazy tool-call constraint as an mlx-lm logits processor.

Outside a call the output is free (``auto``; only the start marker for
``required``; marker or EOS after a call for families without an end marker)
and costs no work over the vocabulary: only the last sampled token is read.
The start marker opens a matcher for one call (llguidance, compiled by the
constraint machinery) that masks every step until the call's grammar is
complete. Spec: protocol/README.md § `tool_choice`; design-notes.md § tools.
"""

from __future__ import annotations

import numpy as np

import mlx.core as mx

from ..constraints import mask
from ..constraints.processor import TAKEN, WORDS, MatcherProcessor
from .device_mask import DeviceMask


class ToolCallProcessor(MatcherProcessor):
    what = "tool-call generation"
    field = "params.tools"

    def __init__(self, program, info, trigger, first: str, after_call: str, opens=None, is_text=None):
        """``trigger``: the start marker's token, or None for a format without
        one (a call is an output whose first token the grammar accepts).
        ``first``/``after_call``: the free mode at the start and after a
        call: "free" (anything), "call_only" (the start marker), "call_or_end"
        (the start marker or EOS), "end" (EOS). ``opens(prompt_tokens)``: True
        when the prompt ends where the grammar begins (the family's generation
        prompt ends inside a message header). ``is_text(tokens)``: True when
        the completed grammar was a text header, not a call (Functionary's
        ``all\n``): free text follows, whatever follows a call."""
        super().__init__(info)
        self.program = program
        self.info = info
        self.trigger = trigger
        self.after_call = after_call
        self.opens = opens
        self.is_text = is_text
        self._call_from = 0  # where the grammar's tokens begin in ``known``
        self.mode = first
        self.m = None  # the matcher of the call being written
        self.known: list[int] = []  # generated tokens known on the CPU
        self.observed = 0
        self.steps = 0  # processor calls so far
        self.ready = None  # batch_masks.py took this step's token (TAKEN) and filled its mask (WORDS), or its failure
        self._bases: dict = {}
        self._device_mask = DeviceMask(self.words, self.vocab)
        if trigger is not None:
            self._start_of_call = self._first_call_mask()

    # ------------------------------------------------------------ protocol

    def observe(self, token: int) -> None:
        """The generation loop received ``token`` (in order, every token)."""
        self.observed += 1
        if self.observed > len(self.known):
            self.known.append(token)

    @property
    def generated(self) -> int:
        return len(self.known)

    # -------------------------------------------------------------- steps

    def _step(self, tokens: mx.array, logits: mx.array) -> mx.array:
        ready, self.ready = self.ready, None
        if isinstance(ready, BaseException):
            raise ready
        if ready is not None:  # batch_masks took this step's token (TAKEN), and filled the mask (WORDS)
            mx.async_eval(tokens)
            return self._call_mask(logits, filled=ready is WORDS)
        step, self.steps = self.steps, self.steps + 1
        if step == 0:
            # Only the prompt: a prompt that ends with the start marker
            # opens a call the output must complete.
            if self.opens is not None and self.opens(tokens):
                self._open_call([])
                return self._call_mask(logits)
            if self.trigger is None:
                if self.mode == "call_only":
                    self._open_call([])
                    return self._call_mask(logits)
                return logits
            if int(tokens[-1].item()) == self.trigger:
                self._open_call()
                return self._call_mask(logits)
            base = self._base(self.mode)
            return logits if base is None else mx.where(base, logits, mask.NEG_INF)
        if self.trigger is None and self.m is None:
            # No start marker: the first token decides (the grammar accepts
            # it: a call; anything else: free text to the end).
            if step == 1 and self.mode == "free":
                first = self._read_last(tokens, logits, step)
                m = self.program.matcher()
                if first not in self.eos and m.consume(first):
                    self.known = [first]
                    self.m = m
                    return self._call_mask(logits)
                self.mode = "done"
            base = self._base(self.mode)
            return logits if base is None else mx.where(base, logits, mask.NEG_INF)
        last = self._read_last(tokens, logits, step)
        if self.m is None:
            # Free text: nothing on the device unless this token starts a
            # call (the mode's mask, where it has one, bans what can't follow).
            if last != self.trigger:
                base = self._base(self.mode)
                return logits if base is None else mx.where(base, logits, mask.NEG_INF)
            self._open_call()
            return mx.where(self._start_of_call, logits, mask.NEG_INF)
        self._consume(last)
        return self._call_mask(logits)

    # ---------------------------------------------- batched (batch_masks.py)

    def batch_take(self, token: int) -> bool:
        """A batched step, before the call: inside a call, take ``token``
        (the one this step feeds) as the call would, and want the call's
        mask (True); anywhere else leave the step to the call (False). A
        failure is kept for the call to raise."""
        step = self.steps
        if step == 0 or self.m is None or len(self.known) < step - 1:
            return False
        self.steps += 1
        if len(self.known) < step:
            self.known.append(token)
        try:
            self._consume(token)
        except BaseException as exc:
            self.ready = self._kept(exc)
            return False
        self.ready = TAKEN
        return True

    def batch_words(self, words: np.ndarray) -> None:
        """The batch filled the call's mask into ``words``: the call applies it."""
        self.words[:] = words
        self.ready = WORDS

    def batch_undo(self) -> None:
        """The batch failed after this step's token was taken: the call fills the mask."""
        if self.ready is WORDS:
            self.ready = TAKEN

    def _read_last(self, tokens: mx.array, logits: mx.array, step: int) -> int:
        """The token sampled last, read on the CPU. Its read is queued right
        behind the step that samples it, then this step's forward pass, so
        the matcher works while the model runs (as the constraint processor
        does) and the wait is the one the loop makes anyway to read it."""
        if len(self.known) < step - 1:  # not observed (a caller without observe): read them
            self.known = [int(t) for t in np.asarray(tokens[tokens.shape[-1] - (step - 1) - 1 : -1])]
        last_token = tokens[-1]
        mx.async_eval(last_token)
        mx.async_eval(logits)
        last = int(last_token.item())
        if len(self.known) < step:
            self.known.append(last)
        return last

    def _call_mask(self, logits: mx.array, filled: bool = False) -> mx.array:
        # EOS never ends a call; an EOS token the call's syntax itself needs
        # (harmony's <|call|>) is allowed while the call is not complete.
        if not (self.m.fill(self._ptr, self._nbytes) if not filled else not self.m.failed()):
            raise self._failure(self.m.error())
        if self.m.accepting():
            mask.set_bits(self.words, self.eos, False)
        allowed = self._device_mask.current()
        if allowed is None:
            if not self.m.accepting():
                raise self._failure("the tool call grammar allows no token here")
            text = self.is_text is not None and self.is_text(self.known[self._call_from :])
            self.m, self.mode = None, "free" if text else self.after_call  # complete: free again
            base = self._base(self.mode)
            return logits if base is None else mx.where(base, logits, mask.NEG_INF)
        return mx.where(allowed, logits, mask.NEG_INF)

    def _open_call(self, prefix=None) -> None:
        self._call_from = max(0, len(self.known) - (1 if prefix is None else 0))
        self.m = self.program.matcher()
        for token in ([self.trigger] if prefix is None else prefix):
            self._consume(token)

    def _consume(self, token: int) -> None:
        if not self.m.consume(token):
            why = self.m.error() if token not in self.eos else "EOS inside a tool call"
            raise self._failure(f"token {token} was refused inside a tool call: {why}")

    # -------------------------------------------------------------- masks

    def _first_call_mask(self) -> mx.array:
        m = self.program.matcher()
        if not m.consume(self.trigger):
            raise self._failure("the tool call grammar refuses its own start marker")
        self._fill(m, False)
        return mx.array(mask.unpack(self.words, self.vocab))

    def _base(self, mode: str):
        """None for "free" (no mask), else the allowed tokens as an mx array."""
        if mode in ("free", "done"):
            return None
        if mode not in self._bases:
            allowed = np.zeros(self.vocab, dtype=np.bool_)
            if mode == "no_call":
                allowed[:] = True
                if self.trigger is not None:
                    allowed[self.trigger] = False
            elif mode != "end" and self.trigger is not None:
                allowed[self.trigger] = True
            if mode in ("call_or_end", "end"):
                allowed[[e for e in self.eos if e < self.vocab]] = True
            self._bases[mode] = mx.array(allowed)
        return self._bases[mode]
