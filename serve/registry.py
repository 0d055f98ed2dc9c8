"""The served models: name -> where its weights are. Registering only records the model; the
engine loads it on first use, so a fine-tuning job can register `ft:<base>:<suffix>:<job-id>`
into a running server and the first request for it pays the load."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelSpec:
    name: str
    """The name clients put in `model`."""
    path: str
    """Model folder (or hub id) holding full weights; for an adapter, its base."""
    adapter: str | None = None
    """LoRA adapter folder applied on top of `path`."""
    parent: str | None = None
    """Served name of the model this one derives from (a fine-tune's or adapter's base)."""
    created: int = field(default_factory=lambda: int(time.time()))
    owned_by: str = "tunedesk"


Listener = Callable[[str, ModelSpec | None], None]


class ModelRegistry:
    def __init__(self) -> None:
        self._specs: dict[str, ModelSpec] = {}
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self.default: str | None = None
        """The first model registered: the base /ready waits for."""

    def register(
        self,
        name: str,
        path: str,
        *,
        adapter: str | None = None,
        parent: str | None = None,
        replace: bool = False,
    ) -> ModelSpec:
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"served model name {name!r} must be non-empty without spaces")
        spec = ModelSpec(name=name, path=str(path), adapter=adapter, parent=parent)
        with self._lock:
            if name in self._specs and not replace:
                raise ValueError(f"a model named {name!r} is already served")
            self._specs[name] = spec
            if self.default is None:
                self.default = name
            listeners = list(self._listeners)
        for listener in listeners:
            listener(name, spec)
        return spec

    def unregister(self, name: str) -> None:
        with self._lock:
            self._specs.pop(name, None)
            if self.default == name:
                self.default = next(iter(self._specs), None)
            listeners = list(self._listeners)
        for listener in listeners:
            listener(name, None)

    def get(self, name: str) -> ModelSpec | None:
        return self._specs.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def list(self) -> list[ModelSpec]:
        with self._lock:
            return list(self._specs.values())

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(name, spec)` on register (spec) and unregister (None)."""
        with self._lock:
            self._listeners.append(listener)
