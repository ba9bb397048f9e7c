"""Save and load tools as ``config.json`` + ``weights.safetensors`` under a local path or ``s3://``.

``config.json`` holds ``{"tool": name, "config": <tool.state() config>}``; the weights file holds
``tool.state()`` arrays (safetensors, no pickle). The weights are written first and the config
last, so a directory with a config is complete. Ragged arrays (histories) travel as
``pack_ragged`` values + offsets.

A tool class whose config names member tools (the ensemble: ``config["members"]``) is rebuilt
from those members: passed in by name, or loaded from sibling directories ``<parent>/<name>``.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any, Mapping, Sequence

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from reasonrec.config import StorageConfig
from reasonrec.io import filesystem
from reasonrec.tools.base import Tool, tool_class

CONFIG = "config.json"
WEIGHTS = "weights.safetensors"
FORMAT = 1


def save_tool(tool: Tool, url: str, storage: StorageConfig | None = None) -> None:
    """Write ``tool`` to the folder ``url`` (created if needed, files overwritten)."""
    config, arrays = tool.state()
    fs, path = filesystem(url, storage)
    fs.makedirs(path, exist_ok=True)
    blob = st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
    with fs.open(posixpath.join(path, WEIGHTS), "wb") as f:
        f.write(blob)
    with fs.open(posixpath.join(path, CONFIG), "w") as f:
        json.dump({"tool": tool.name, "format": FORMAT, "config": config}, f, indent=2, sort_keys=True)


def load_tool(url: str, storage: StorageConfig | None = None, members: Mapping[str, Tool] | None = None) -> Tool:
    """Inverse of :func:`save_tool`. ``members`` supplies already-loaded member tools by name for
    tools that have them (else they are loaded from ``<parent of url>/<member name>``)."""
    fs, path = filesystem(url, storage)
    cfg_path = posixpath.join(path, CONFIG)
    if not fs.exists(cfg_path):
        raise FileNotFoundError(f"no saved tool at {url} (missing {CONFIG})")
    with fs.open(cfg_path, "r") as f:
        meta = json.load(f)
    with fs.open(posixpath.join(path, WEIGHTS), "rb") as f:
        arrays = st_load(f.read())
    cls = tool_class(meta["tool"])
    config = meta["config"]
    if "members" in config and getattr(cls, "has_members", False):
        given = dict(members or {})
        parent = url.rstrip("/").rsplit("/", 1)[0]
        resolved = {n: given[n] if n in given else load_tool(f"{parent}/{n}", storage) for n in config["members"]}
        return cls.from_state(config, arrays, members=resolved)
    return cls.from_state(config, arrays)


def pack_ragged(seqs: Sequence[np.ndarray], dtype: Any = np.int64) -> tuple[np.ndarray, np.ndarray]:
    """A list of 1-d arrays as (values, offsets[len+1])."""
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate([np.asarray(s, dtype=dtype) for s in seqs]) if len(seqs) else np.zeros(0, dtype)
    return values.astype(dtype, copy=False), offsets


def unpack_ragged(values: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
