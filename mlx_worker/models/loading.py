"""Loads a host can watch and cancel: ``load_progress`` events and a stop
check between groups of weights (protocol/README.md, "Load progress and cancel").

The libraries load lazily (``lazy=True`` builds the model over unread
weights in milliseconds); ``evaluate_weights`` then reads them group by
group — embeddings, norms and head first, then each layer — so the bytes
reported are bytes really read, and a cancel takes effect at the next group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from .. import errors, protocol
from ..errors import WorkerError

# A parameter's group: its name up to the first numbered child (layers.3, blocks.0).
_NUMBERED = re.compile(r"^(.*?\.\d+)\.")
# Top-level modules of a vision-language model that belong to the vision side.
_VISION_ROOTS = ("vision_tower", "vision_model", "visual", "vision", "multi_modal_projector", "mm_projector")


class LoadCancelled(WorkerError):
    def __init__(self) -> None:
        super().__init__(errors.CANCELLED, "the load was cancelled; nothing of it stays loaded")


@dataclass
class LoadProgress:
    """What the load code reports to and asks of its request."""

    request_id: protocol.RequestId
    on_progress: Callable[[protocol.LoadProgressEvent], None] = lambda event: None
    should_stop: Callable[[], bool] = lambda: False

    def report(self, phase: str, done: int, total: int) -> None:
        self.on_progress(protocol.LoadProgressEvent(id=self.request_id, phase=phase, done=done, total=total))

    def check(self) -> None:
        if self.should_stop():
            raise LoadCancelled()

    def step(self, phase: str, work: Callable):
        """A phase that is one step: 0 of 1, the work, 1 of 1."""
        self.check()
        self.report(phase, 0, 1)
        result = work()
        self.report(phase, 1, 1)
        return result


def weight_groups(model) -> dict[str, list[list]]:
    """Phase -> groups of parameter arrays, in the order they are read: the
    ungrouped ones (embeddings, final norm, head) first, then each numbered
    block. An array shared by two modules (tied embeddings) is read once."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    phases: dict[str, dict[str, list]] = {}
    seen: set[int] = set()
    for name, array in tree_flatten(model.parameters()):
        if not isinstance(array, mx.array) or id(array) in seen:
            continue
        seen.add(id(array))
        phase = "vision_tower" if name.split(".", 1)[0] in _VISION_ROOTS else "weights"
        match = _NUMBERED.match(name)
        groups = phases.setdefault(phase, {"": []})
        groups.setdefault(match.group(1) if match else "", []).append(array)
    order = ("vision_tower", "weights")  # a VLM's tower first: the language model is most of the bytes
    return {p: [g for g in phases[p].values() if g] for p in order if p in phases}


def evaluate_weights(model, progress: LoadProgress) -> None:
    """Read every weight of a lazily loaded model, reporting bytes per phase.

    The next group is scheduled (``async_eval``) before waiting on the
    current one: reading one group at a time alone was measurably slower than
    mlx-lm's single ``eval`` of everything, which lets MLX overlap the reads.
    So a cancel stops the load after at most one more group."""
    import mlx.core as mx

    phases = weight_groups(model)
    queue = [(phase, group) for phase, groups in phases.items() for group in groups]
    totals = {phase: sum(a.nbytes for g in groups for a in g) for phase, groups in phases.items()}
    done = dict.fromkeys(phases, 0)
    if queue:
        mx.async_eval(queue[0][1])
    for i, (phase, group) in enumerate(queue):
        if done[phase] == 0 and (i == 0 or queue[i - 1][0] != phase):
            progress.report(phase, 0, totals[phase])
        progress.check()
        if i + 1 < len(queue):
            mx.async_eval(queue[i + 1][1])
        mx.eval(group)
        done[phase] += sum(a.nbytes for a in group)
        progress.report(phase, done[phase], totals[phase])
