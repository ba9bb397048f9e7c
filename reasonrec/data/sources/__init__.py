"""Source readers: each turns one input format into RAW_ITEMS / RAW_INTERACTIONS Arrow tables.

A reader splits its input into *shards* (small picklable descriptors: a file, a byte range, a
user-id range) so ``prepare`` can read them in parallel with Ray Data, and never needs the whole
source in one process. Readers know nothing of Ray; they emit every row they see, and put a
reason in the ``error`` column for a row they could not parse, so nothing is dropped silently.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import pyarrow as pa

from reasonrec.config import SourceConfig, StorageConfig


class Source(Protocol):
    cfg: SourceConfig

    def item_shards(self) -> list[Any]: ...
    def read_items(self, shard: Any) -> pa.Table: ...  # RAW_ITEMS
    def interaction_shards(self) -> list[Any]: ...
    def read_interactions(self, shard: Any) -> pa.Table: ...  # RAW_INTERACTIONS
    def fingerprint(self) -> str: ...  # changes when the input changes


_REGISTRY: dict[str, Callable[[SourceConfig, StorageConfig], Source]] = {}


def register(kind: str):
    def deco(cls):
        _REGISTRY[kind] = cls
        return cls

    return deco


def get_source(cfg: SourceConfig, storage: StorageConfig | None = None) -> Source:
    # Import the reader module of this kind only: one broken format never breaks the others.
    import importlib

    if cfg.kind not in _REGISTRY:
        try:
            importlib.import_module(f"{__name__}.{cfg.kind}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{cfg.kind}":
                raise
    if cfg.kind not in _REGISTRY:
        raise ValueError(f"unknown source kind '{cfg.kind}'; known: {sorted(_REGISTRY)}")
    return _REGISTRY[cfg.kind](cfg, storage or StorageConfig())


def read_all_items(src: Source) -> pa.Table:
    """Convenience for tests and small sources: every item shard, concatenated."""
    return pa.concat_tables([src.read_items(s) for s in src.item_shards()])


def read_all_interactions(src: Source) -> pa.Table:
    return pa.concat_tables([src.read_interactions(s) for s in src.interaction_shards()])
