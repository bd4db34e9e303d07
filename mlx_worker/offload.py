"""The prompt thread: prompt work too long for the compute thread.

A generate or tokenize whose template render or tokenization does not fit the
compute thread's short budget (prompt_bounds.MustOffload) is redone here under
the full bounds, one at a time in arrival order; the compute thread hands the
outcomes on between two scheduler steps. Spec: protocol/README.md § Ordering and concurrency.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from . import prompt_bounds


@dataclass(eq=False)
class Task:
    job: Any
    work: Callable[[], object]  # runs on the prompt thread; returns or raises
    then: Callable[[object], None]  # on the compute thread: the outcome (a value or the exception)
    gen: Optional[Any] = None  # a generate's Request (holds its model until handed on)
    answered: bool = False  # answered meanwhile (a cancel): the outcome is dropped
    outcome: object = field(default=None, repr=False)


class Offload:
    def __init__(self, wake: Callable[[], None]):
        self._wake = wake  # tells the compute thread an outcome is ready
        self._cond = threading.Condition()
        self._todo: collections.deque[Task] = collections.deque()
        self._tasks: list[Task] = []  # submitted and not yet handed on, in arrival order
        self._thread: Optional[threading.Thread] = None
        self._current: Optional[Task] = None  # the task the prompt thread works on

    def submit(self, task: Task) -> None:
        with self._cond:
            self._tasks.append(task)
            self._todo.append(task)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="prompt", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def busy(self) -> bool:
        with self._cond:
            return bool(self._tasks)

    def has_generates(self) -> bool:
        """A generate is still in here: later ones queue behind it (arrival order)."""
        with self._cond:
            return any(t.gen is not None and not t.answered for t in self._tasks)

    def tasks(self) -> list[Task]:
        with self._cond:
            return list(self._tasks)

    def has_done(self) -> bool:
        with self._cond:
            return self._first_done()

    def _first_done(self) -> bool:
        return bool(self._tasks) and self._tasks[0] not in self._todo and self._tasks[0] is not self._current

    def take_done(self) -> list[Task]:
        """Finished tasks, in arrival order (a finished one waits behind an
        earlier unfinished one)."""
        out = []
        with self._cond:
            while self._first_done():
                out.append(self._tasks.pop(0))
        return out

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._todo)
                task = self._current = self._todo.popleft()
            try:
                if task.answered:
                    task.outcome = None
                else:
                    with prompt_bounds.within(task.job.should_stop, inline=False):
                        task.outcome = task.work()
            except BaseException as exc:  # handed to the compute thread, which answers with it
                task.outcome = exc
            with self._cond:
                self._current = None
            self._wake()
