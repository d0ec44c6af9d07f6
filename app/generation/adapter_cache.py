"""The LoRA adapters attached to a generation engine's model: at most a few, least recently used out.

:class:`AdapterCache` fetches adapters from an :class:`~app.model.adapters.AdapterStore`, attaches
them to the engine's model under PEFT names of its own, evicts the least recently used one when
``capacity`` are attached, and frees an adapter's memory when it goes. It also holds the lock that
serialises the model: a generation holds it from start to end (:meth:`AdapterCache.using`), and
attaching or deleting an adapter waits for it, so an adapter never changes under a running
generation. Adapters are fetched from the store before the lock is taken.
"""

from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from peft import PeftModel

from app.generation.engine import GenerationEngine
from app.generation.protocol import GenerationRequestError, UnknownModelError
from app.model.adapters import AdapterManifest, AdapterNotFoundError, AdapterStore, check_adapter_id

__all__ = ["AdapterCache"]


class AdapterCache:
    """Up to ``capacity`` stored adapters of ``base_model`` attached to ``engine.model``.

    Args:
        engine: the engine whose model the adapters attach to (``engine.model`` becomes a
            ``PeftModel`` with the first, and the plain model again when the last goes).
        store: where adapters come from.
        base_model: the name adapters must have been trained on (their manifest's ``base_model``).
        capacity: adapters attached at once; attaching one more evicts the least recently used.
    """

    def __init__(self, engine: GenerationEngine, store: AdapterStore, *, base_model: str, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.engine = engine
        self.store = store
        self.base_model = base_model
        self.capacity = capacity
        self._lock = threading.Lock()  # the model: one generation, or one adapter change, at a time
        self._table_lock = threading.Lock()  # the table below, so reading it never waits for a generation
        self._adapters: OrderedDict[str, str] = OrderedDict()  # adapter id -> PEFT adapter name, LRU first
        self._names = 0

    def loaded(self) -> list[str]:
        """Ids of the attached adapters, least recently used first."""
        with self._table_lock:
            return list(self._adapters)

    def load(self, adapter_id: str) -> AdapterManifest:
        """Attach a stored adapter (a no-op apart from marking it used if it is attached), between
        generations. Raises as :meth:`fetch` does."""
        manifest = self.fetch(adapter_id)
        with self._lock:
            self._attach_locked(adapter_id)
        return manifest

    def unload(self, adapter_id: str) -> bool:
        """Detach an adapter and free its memory; False if it was not attached."""
        with self._lock:
            if adapter_id not in self.loaded():
                return False
            self._detach_locked(adapter_id)
            return True

    def fetch(self, adapter_id: str) -> AdapterManifest:
        """The manifest of a stored adapter for this base model, its files made local (outside the
        lock: a download must not hold up generation).

        Raises:
            UnknownModelError: no such adapter in the store.
            GenerationRequestError: the adapter was trained on another base model.
        """
        try:
            check_adapter_id(adapter_id)
            manifest = self.store.manifest(adapter_id)
            self.store.local_path(adapter_id)
        except (AdapterNotFoundError, ValueError) as exc:
            raise UnknownModelError(
                f"no adapter {adapter_id!r} in {self.store.root} ({exc}); attached: {self.loaded()}"
            ) from None
        if manifest.base_model != self.base_model:
            raise GenerationRequestError(
                "model",
                f"adapter {adapter_id!r} was trained on base model {manifest.base_model!r}, "
                f"but this generator serves {self.base_model!r}",
            )
        return manifest

    @contextmanager
    def using(self, adapter_id: str | None) -> Iterator[None]:
        """Hold the model, with ``adapter_id`` (None: the plain base model) the one that answers."""
        with self._lock:
            model = self.engine.model
            if adapter_id is None:
                with model.disable_adapter() if isinstance(model, PeftModel) else nullcontext():
                    yield
                return
            name = self._attach_locked(adapter_id)
            # set_adapter marks the adapter trainable; harmless here, generate runs without gradients.
            self.engine.model.set_adapter(name)
            yield

    def _attach_locked(self, adapter_id: str) -> str:
        with self._table_lock:
            name = self._adapters.get(adapter_id)
            if name is not None:
                self._adapters.move_to_end(adapter_id)
                return name
        while len(self._adapters) >= self.capacity:
            self._detach_locked(next(iter(self._adapters)))
        # PEFT adapter names become module keys, where '.' is not allowed (adapter ids may have it).
        self._names += 1
        name = f"kaizen_{self._names}"
        self.engine.model = self.store.attach(self.engine.model, adapter_id, adapter_name=name)
        with self._table_lock:
            self._adapters[adapter_id] = name
        return name

    def _detach_locked(self, adapter_id: str) -> None:
        model = self.engine.model
        with self._table_lock:
            name = self._adapters.pop(adapter_id)
            remaining = len(self._adapters)
        if remaining:
            if model.active_adapter == name:  # PEFT would warn, then pick one itself
                model.set_adapter(next(iter(self._adapters.values())))
            model.delete_adapter(name)
        else:
            # PEFT cannot delete a model's last adapter; unwrapping gives back the base model.
            self.engine.model = model.unload()
        gc.collect()
        if self.engine.device.type == "cuda":
            torch.cuda.empty_cache()
