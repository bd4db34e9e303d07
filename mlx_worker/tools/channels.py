"""Generated text -> channels: content, reasoning, tool calls, markers.

Labels what the text stream (textstream.py) decides, with mlx-lm's own
``TextStateMachine`` built from the family's markers; a call opens and closes
only at the marker's own token (spelled-out markers are text); markers come
back as "marker" pieces, so the pieces always concatenate to the raw text.
Spec: protocol/README.md § Channels; the details: bench/results/design-notes.md § layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from mlx_lm.generate import TextStateMachine

# mlx-lm's state names -> channel names on the wire.
CHANNELS = {"normal": "content", "reasoning": "reasoning", "tool": "tool_call"}
MARKER = "marker"


def transitions_for(tokenizer) -> dict:
    """The transitions of ``mlx_lm.generate.make_text_state_machine``
    (without stop words: the text stream cuts those), plus a tool -> tool
    edge on the start marker for families without an end marker."""
    transitions: dict = {}
    if getattr(tokenizer, "has_thinking", False):
        transitions.setdefault("normal", []).append((tokenizer.think_start, "reasoning"))
        transitions["reasoning"] = [(tokenizer.think_end, "normal")]
    if getattr(tokenizer, "has_tool_calling", False):
        targets = {dst for edges in tokenizer.response_transitions.values() for _, dst in edges}
        if "tool" not in targets:
            transitions.setdefault("normal", []).append((tokenizer.tool_call_start, "tool"))
        if getattr(tokenizer, "has_thinking", False):
            transitions["reasoning"].append((tokenizer.tool_call_start, "tool"))
        end = tokenizer.tool_call_end
        transitions["tool"] = [(end, "normal")] if end else [(tokenizer.tool_call_start, "tool")]
    # A stray closing marker (or a second opening one) is still a marker:
    # it must not leak into the text of a channel.
    if getattr(tokenizer, "has_thinking", False):
        transitions.setdefault("normal", []).append((tokenizer.think_end, "normal"))
        transitions["reasoning"].append((tokenizer.think_start, "reasoning"))
    if getattr(tokenizer, "has_tool_calling", False) and tokenizer.tool_call_end:
        transitions.setdefault("normal", []).append((tokenizer.tool_call_end, "normal"))
        if "reasoning" in transitions:
            transitions["reasoning"].append((tokenizer.tool_call_end, "reasoning"))
    for marker in getattr(tokenizer, "structural_markers", ()) or ():
        transitions.setdefault("normal", []).append((marker, "normal"))
    for state, edges in (getattr(tokenizer, "response_transitions", None) or {}).items():
        transitions.setdefault(state, []).extend(edges)
    return transitions


def initial_state(tokenizer, prompt_tokens: Sequence[int]) -> str:
    """"reasoning" when the prompt opened a reasoning block it didn't close
    (a template that starts ``<think>`` in the generation prompt); "tool"
    when the prompt ends with a call's start marker (a host that prefills it)."""
    start = getattr(tokenizer, "tool_call_start_tokens", None) if getattr(tokenizer, "has_tool_calling", False) else None
    if getattr(tokenizer, "response_initial_state", None):  # the format's own start (its prompt ends in a header)
        start = None
    if start and len(prompt_tokens) >= len(start) and tuple(prompt_tokens[-len(start):]) == tuple(start):
        return "tool"
    state = "normal"
    if getattr(tokenizer, "has_thinking", False) and prompt_tokens:
        start = tokenizer.rfind_think_start(prompt_tokens)
        if start >= 0 and start > tokenizer.rfind_think_end(prompt_tokens):
            state = "reasoning"
    return getattr(tokenizer, "response_initial_state", None) or state


@dataclass
class Piece:
    channel: str
    text: str
    call: Optional[int] = None  # tool_call pieces: index of the call


@dataclass
class CallText:
    text: str = ""
    closed: bool = False  # its end marker (or the next call's start) was seen


@dataclass
class ChannelSplitter:
    machine: TextStateMachine
    edges: dict
    state: tuple
    call_markers: dict = field(default_factory=dict)  # call start/end marker -> its token (one-token markers)
    calls: list = field(default_factory=list)
    texts: dict = field(default_factory=lambda: {"content": "", "reasoning": ""})
    _marker_tokens_seen: dict = field(default_factory=dict)  # marker -> its tokens whose text is still to come
    lead: Optional[str] = None  # a format without a start marker: an output beginning so is a call
    text_lead: Optional[str] = None  # ... or: an output beginning so is text, any other output a call
    _lead_text: str = ""

    @classmethod
    def for_model(cls, tokenizer, prompt_tokens: Sequence[int]) -> "ChannelSplitter":
        transitions = transitions_for(tokenizer)
        machine = TextStateMachine(transitions or None)
        initial = initial_state(tokenizer, prompt_tokens)
        splitter = cls(machine, transitions, machine.make_state(initial))
        if getattr(tokenizer, "has_tool_calling", False):
            for text, ids in ((tokenizer.tool_call_start, tokenizer.tool_call_start_tokens),
                              (tokenizer.tool_call_end, getattr(tokenizer, "tool_call_end_tokens", None))):
                if text and ids is not None and len(ids) == 1:
                    splitter.call_markers[text] = ids[0]
        if initial == "tool":
            splitter.calls.append(CallText())
        fmt = getattr(tokenizer, "tool_format", None)
        if fmt is not None and fmt.lead and initial == "normal":
            splitter.lead = fmt.lead
        if fmt is not None and getattr(fmt, "text_lead", None) and initial == "header":
            splitter.lead, splitter.text_lead = fmt.text_lead, fmt.text_lead
        return splitter

    @property
    def channel(self) -> str:
        return CHANNELS.get(self.state[0], "content")

    @property
    def in_call(self) -> bool:
        return self.state[0] == "tool"

    def empty_piece(self) -> Piece:
        """No text, in the current channel (a token whose text is held)."""
        call = len(self.calls) - 1 if self.in_call and self.calls else None
        return Piece(self.channel, "", call)

    def push(self, text: str, token: Optional[int] = None) -> list[Piece]:
        """Label the text of ``token`` (None: text released at the end);
        text that may be the start of a marker is held until it is known."""
        for marker, marker_token in self.call_markers.items():
            if token == marker_token:
                self._marker_tokens_seen[marker] = self._marker_tokens_seen.get(marker, 0) + 1
        if not text:
            return []
        if self.lead is not None:
            # Held until the output's start says whether it begins a call.
            self._lead_text += text
            held = self._lead_text
            starts = held.startswith(self.lead)
            if not starts and self.lead.startswith(held):
                return []
            if starts != bool(self.text_lead):  # a call
                self.state = self.machine.make_state("tool")
                self.calls.append(CallText())
            self.lead, self._lead_text = None, ""
            text = held
        raw = self.state[3] + text
        self.state, segments = TextStateMachine.split(self.state, text)
        out = self._pieces(raw, segments)
        if not self.state[3]:  # all text out: a marker token not matched by now never will be
            self._marker_tokens_seen.clear()
        return out

    def finish(self) -> list[Piece]:
        """Release held text (the output is over)."""
        if self.lead is not None and self._lead_text:
            held, self.lead, self._lead_text = self._lead_text, None, ""
            return self.push(held) + self.finish()
        self.state, held, name = TextStateMachine.flush(self.state)
        return self._pieces(held, [(name, held)]) if held else []

    def _pieces(self, raw: str, segments: list) -> list[Piece]:
        out: list[Piece] = []
        pos = 0
        for i, (name, text) in enumerate(segments):
            if text:
                out.append(self._piece(name, text))
                pos += len(text)
            if i + 1 < len(segments):  # a marker took us to the next segment's state
                nxt = segments[i + 1][0]
                marker = max(
                    (m for m, dst in self.edges.get(name, ()) if dst == nxt and raw.startswith(m, pos)),
                    key=len,
                    default="",
                )
                if "tool" in (name, nxt) and marker in self.call_markers:
                    if not self._marker_tokens_seen.get(marker):
                        # Spelled in ordinary tokens: text of this state; the
                        # rest of the chunk is split again from here.
                        out.append(self._piece(name, marker))
                        self.state = self.machine.make_state(name)
                        rest = raw[pos + len(marker):]
                        self.state, segments = TextStateMachine.split(self.state, rest)
                        return out + self._pieces(rest, segments)
                    self._marker_tokens_seen[marker] -= 1
                pos += len(marker)
                if name == "tool" and self.calls:
                    self.calls[-1].closed = True
                if nxt == "tool":
                    self.calls.append(CallText())
                if marker:
                    out.append(Piece(MARKER, marker))
        return out

    def _piece(self, name: str, text: str) -> Piece:
        channel = CHANNELS.get(name, "content")
        if channel == "tool_call":
            if not self.calls:  # a response format that starts inside a call
                self.calls.append(CallText())
            self.calls[-1].text += text
            return Piece(channel, text, len(self.calls) - 1)
        self.texts[channel] = self.texts.get(channel, "") + text
        return Piece(channel, text)
