"""RecBole atomic files: ``<name>.inter`` (required), ``<name>.item`` and ``<name>.user`` (optional)
in ``cfg.path``; ``<name>`` is ``cfg.dataset_name`` or, when unset, the stem of the only ``.inter``.

Tab-separated, first line a header of ``field:type`` (token, token_seq, float, float_seq; a field
without a type is a token). Common field names are mapped onto RAW_*; other fields are ignored.
Without a ``timestamp`` field ts is the line's byte offset (file order). Without a ``.item``
file there are no item rows: prepare stubs every item the interactions reference (key only).
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from reasonrec.config import SourceConfig, StorageConfig
from reasonrec.data.schemas import RAW_INTERACTIONS, RAW_ITEMS, RAW_USERS, conform
from reasonrec.data.sources import register
from reasonrec.data.sources._common import (
    Chunk,
    FolderSource,
    csv_chunk,
    decode,
    error_rows,
    fingerprint,
    first_line,
    key,
    line_chunks,
    read_chunk,
    short,
    table,
    to_float,
)

# RAW column <- the first of these RecBole field names that the file has.
INTER_FIELDS = {
    "user_key": ("user_id", "uid", "user"),
    "item_key": ("item_id", "iid", "item", "business_id"),
    "ts": ("timestamp", "time", "ts"),
    "rating": ("rating", "score", "stars"),
    "review": ("review", "review_text", "text", "comment"),
}
ITEM_FIELDS = {
    "item_key": ("item_id", "iid", "item", "business_id"),
    "title": ("title", "movie_title", "item_name", "name"),
    "brand": ("brand", "manufacturer"),
    "categories": ("categories", "category", "genre", "class", "tags"),
    "price": ("price",),
    "description": ("description", "desc", "overview"),
}
USER_KEY_FIELDS = ("user_id", "uid", "user")


class Header(NamedTuple):
    names: tuple[str, ...]
    types: tuple[str, ...]

    @classmethod
    def parse(cls, line: str) -> Header:
        names, types = [], []
        for col in line.split("\t"):
            name, _, typ = col.strip().partition(":")
            names.append(name)
            types.append(typ or "token")
        return cls(tuple(names), tuple(types))

    def index(self, candidates: tuple[str, ...]) -> int | None:
        return next((self.names.index(c) for c in candidates if c in self.names), None)


def seq_values(value: str) -> list[str]:
    """A token_seq: RecBole separates by spaces, but some exported catalogs list names with
    commas ("'Skin Care', 'Face'"), which must not be split at the inner spaces."""
    if "," in value:
        parts = (p.strip().strip("'\"").strip() for p in value.split(","))
    else:
        parts = iter(value.split())
    return [p for p in parts if p]


def convert(value: str, typ: str) -> Any:
    """A field as a Python value; '' -> None. Raises ValueError for a bad float."""
    if value.strip() == "":
        return None
    if typ == "float":
        return float(value)
    if typ == "token_seq":
        return seq_values(value)
    if typ == "float_seq":
        return [float(v) for v in value.split()]
    return value.strip()


class Shard(NamedTuple):
    table: str  # inter | item
    chunk: Chunk
    header: Header


@register("recbole")
class RecBoleSource(FolderSource):
    kind, needs = "recbole", "folder with <name>.inter"

    def __init__(self, cfg: SourceConfig, storage: StorageConfig):
        super().__init__(cfg, storage)
        self._name: str | None = cfg.dataset_name

    def name(self) -> str:
        if self._name is None:
            inters = [n for n in self.loc.listdir() if n.endswith(".inter")]
            if len(inters) != 1:
                raise ValueError(
                    f"recbole source: found {inters} under {self.cfg.path}; set data.sources[].dataset_name"
                )
            self._name = inters[0][: -len(".inter")]
        return self._name

    def path(self, ext: str) -> str | None:
        p = self.loc.join(f"{self.name()}.{ext}")
        return p if ext == "inter" or self.loc.fs.exists(p) else None

    def _shards(self, which: str) -> list[Shard]:
        path = self.path(which)
        if path is None:
            return []
        header = Header.parse(first_line(self.loc.fs, path))
        return [
            Shard(which, c, header)
            for c in line_chunks(self.loc.fs, path, skip_header=True, shard_bytes=self.shard_bytes)
        ]

    def _rows(self, shard: Shard, fields: dict[str, tuple[str, ...]]):
        """Yield (order, {raw column: value}, error) per line."""
        h = shard.header
        where = {col: h.index(names) for col, names in fields.items()}
        for order, raw in read_chunk(self.loc.fs, shard.chunk):
            if not raw.strip():
                continue
            try:
                values = decode(raw).split("\t")
            except UnicodeDecodeError as exc:
                yield order, {}, f"bad utf-8: {short(exc)}"
                continue
            if len(values) != len(h.names):
                yield order, {}, f"expected {len(h.names)} tab-separated fields, got {len(values)}"
                continue
            out, err = {}, None
            for col, i in where.items():
                if i is None:
                    continue
                try:
                    out[col] = convert(values[i], h.types[i])
                except ValueError as exc:
                    err = err or f"bad {h.types[i]} in {h.names[i]}: {short(exc)}"
            yield order, out, err

    # -------------------------------------------------------------------------------- items
    def item_shards(self) -> list[Any]:
        return self._shards("item")

    def read_items(self, shard: Shard) -> pa.Table:
        names = ("item_key", "title", "brand", "categories", "price", "description", "error")
        cols: dict[str, list] = {c: [] for c in names}
        for _, row, err in self._rows(shard, ITEM_FIELDS):
            row["item_key"] = key(row.get("item_key"))
            for col in ("title", "brand", "description"):  # token_seq text fields read as words
                if isinstance(row.get(col), list):
                    row[col] = " ".join(row[col])
            cats = row.get("categories")
            row["categories"] = [cats] if isinstance(cats, str) else cats
            if isinstance(row.get("price"), list):
                row["price"] = None
            row["error"] = err
            for c in names:
                cols[c].append(row.get(c))
        n = len(cols["item_key"])
        cols["domain"] = [self.cfg.domain] * n
        return table(cols, RAW_ITEMS, n)

    # ------------------------------------------------------------------------- interactions
    def interaction_shards(self) -> list[Any]:
        return self._shards("inter")

    def read_interactions(self, shard: Shard) -> pa.Table:
        h = shard.header
        # RecBole fields are never quoted: a '"' is part of the value.
        t, bad = csv_chunk(self.loc.fs, shard.chunk, h.names, delimiter="\t", quoting=False)
        n = t.num_rows
        cols: dict[str, Any] = {}
        err = pa.nulls(n, pa.string())
        for col, candidates in INTER_FIELDS.items():
            i = h.index(candidates)
            if i is None:
                continue
            values = t.column(i)
            if col in ("ts", "rating"):
                values, not_number = to_float(values)
                if col == "ts":  # NaN / inf cannot be a time
                    not_number = pc.or_(not_number, pc.invert(pc.is_finite(values)).fill_null(False))
                    values = pc.if_else(not_number, pa.scalar(None, pa.float64()), values)
                    values = pc.cast(pc.floor(values), pa.int64())
                err = pc.if_else(
                    pc.and_(pc.is_null(err), not_number),
                    pc.binary_join_element_wise(f"bad float in {h.names[i]}: ", t.column(i), ""),
                    err,
                )
            cols[col] = values
        if "ts" not in cols:
            # No time field: the position in the file keeps the order (chunk starts are byte
            # offsets, more than a chunk's row count apart).
            cols["ts"] = pa.array(range(shard.chunk.start, shard.chunk.start + n), pa.int64())
        cols["error"] = err
        cols["domain"] = pa.array([self.cfg.domain] * n, pa.string())
        return pa.concat_tables(
            [conform(pa.table(cols), RAW_INTERACTIONS), error_rows(bad, RAW_INTERACTIONS, self.cfg.domain)]
        )

    # -------------------------------------------------------------------------------- users
    def read_users(self) -> pa.Table | None:
        """The ``.user`` file as RAW_USERS (other fields as a JSON object), or None without one.
        Not part of the Source protocol: user side information is optional for every stage."""
        shards = self._shards("user")
        if not shards:
            return None
        h = shards[0].header
        ui = h.index(USER_KEY_FIELDS)
        keys, attrs = [], []
        for shard in shards:
            for _, raw in read_chunk(self.loc.fs, shard.chunk):
                values = decode(raw).split("\t") if raw.strip() else []
                if len(values) != len(h.names):
                    continue
                keys.append(key(values[ui]) if ui is not None else None)
                attrs.append(
                    json.dumps(
                        {n: v for j, (n, v) in enumerate(zip(h.names, values)) if j != ui},
                        ensure_ascii=False,
                        sort_keys=True,
                    )
                )
        return table(
            {"user_key": keys, "attributes": attrs, "domain": [self.cfg.domain] * len(keys)}, RAW_USERS, len(keys)
        )

    def fingerprint(self) -> str:
        urls = [self.loc.to_url(p) for p in (self.path("inter"), self.path("item"), self.path("user")) if p]
        return fingerprint(urls, self.storage, {"kind": "recbole"})
