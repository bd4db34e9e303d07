"""What a loader is: one family's way to load a model folder (text, vision,
embedding, distributed). The layer above hands the registry a map of them; the
registry tries them in order and loads with the first that claims the folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .. import protocol
from .loaded import Parallel
from .loading import LoadProgress


@dataclass(eq=False)
class Loaded:
    """What a loader built: the registry makes it a LoadedModel."""

    kind: str  # "text" | "vision" | "embedding"
    model: Any
    tokenizer: Any  # mlx_lm TokenizerWrapper
    vision: Any = None
    parallel: Optional[Parallel] = None
    pooling: Optional[str] = None
    dimensions: Optional[int] = None

    def chat_templates(self) -> list:
        """The templates this model renders with (a vision processor may hold its own)."""
        owners = [getattr(self.tokenizer, "_tokenizer", self.tokenizer), getattr(self.vision, "processor", None)]
        return [getattr(owner, "chat_template", None) for owner in owners]

    def release(self) -> None:
        """Whatever outlives the arrays (a distributed model's shards on the other ranks)."""
        if self.parallel is not None:
            self.parallel.release()


def _always(path: Path, config: dict, params: protocol.LoadParams) -> bool:
    return True


def _nothing(path: Path, config: dict, params: protocol.LoadParams) -> None:
    return None


@dataclass(frozen=True)
class Loader:
    """``load`` builds the model; ``claims`` says whether this folder and
    params are this loader's (it may refuse options the family can't take);
    ``check`` refuses, before any weight is read, what the family can't load."""

    load: Callable[[Path, dict, protocol.LoadParams, LoadProgress], Loaded]
    claims: Callable[[Path, dict, protocol.LoadParams], bool] = _always
    check: Callable[[Path, dict, protocol.LoadParams], None] = _nothing


def model_id_of(params: protocol.LoadParams, path: Path) -> str:
    """The id a load registers under: the one asked for, else the folder's name."""
    return params.model_id or path.name
