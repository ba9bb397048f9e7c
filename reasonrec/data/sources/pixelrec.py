"""PixelRec (Pixel200K / 1M / 8M / PixelRec50K): interaction CSV, item-info CSV, cover images.

Files are found under ``cfg.path`` (up to two folder levels, matching both the flat layout and
the released ``pixelrec_interaction/``, ``pixelrec_iteminfo/``, ``cover/`` folders) and told
apart by their CSV header, so names and column order do not matter:
* interactions: a CSV whose header has ``user_id`` and ``item_id`` (e.g. ``Pixel200K.csv``,
  ``*inter*.csv``), optionally ``timestamp``;
* item info: a CSV with ``item_id`` but no ``user_id`` (e.g. ``item_info.csv``,
  ``Pixel200K_items.csv``), lenient about which of ``title, tag, description, view_number, ...``
  it has.
When a folder holds several of a kind (e.g. Pixel200K and Pixel1M side by side), name the ones
to read with ``cfg.reviews_file`` (interactions) and ``cfg.meta_file`` (item info).

Covers: ``<item_id>.jpg`` (or .png) in ``cfg.images_dir``, else ``images/`` or ``cover/`` under
``cfg.path``. The covers run to 100+ GB, so items carry the cover's URL in ``image_uri``
(opened with ``reasonrec.io.filesystem``) rather than the bytes; a missing cover leaves it null.

Every interacted item whose cover exists gets it, item info or not: an item_id that the
interactions reference but the item-info CSV lacks (or every item_id, without that file)
becomes a cover-only item row (key and ``image_uri``) instead of a key-only stub in ``prepare``;
the item shard streams the interactions' item_id column once more to find them.
"""

from __future__ import annotations

import csv
import io
import posixpath
import re
from datetime import UTC, datetime
from typing import Any, Iterator, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from reasonrec.config import SourceConfig, StorageConfig
from reasonrec.data.schemas import RAW_INTERACTIONS, RAW_ITEMS, conform
from reasonrec.data.sources import register
from reasonrec.data.sources._common import (
    Chunk,
    FolderSource,
    Loc,
    append_row,
    csv_chunk,
    csv_records,
    error_rows,
    fingerprint,
    first_line,
    key,
    line_chunks,
    photo_listing,
    photo_only_items,
    short,
    table,
    to_float,
)

IMAGE_FOLDERS = ("images", "cover", "covers")
_TAG_SEP = re.compile(r"[,，;；|]")


def parse_time(value: str) -> int | None:
    """Unix seconds from a number (seconds, or milliseconds when it is that large) or an ISO
    date/time; '' -> None; anything else raises ValueError."""
    value = value.strip()
    if not value:
        return None
    try:
        t = float(value)
    except ValueError:
        dt = datetime.fromisoformat(value)
        return int((dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp())
    if t != t or t in (float("inf"), float("-inf")):
        raise ValueError(f"not a time: {value}")
    return int(t / 1000) if t > 1e11 else int(t)


def times(col: pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """(unix seconds, error reason) per value: vectorised for the usual all-numeric column, one
    by one (ISO dates, garbage) otherwise."""
    vals, not_number = to_float(col)
    if not pc.any(not_number).as_py() and pc.all(pc.is_finite(vals)).as_py() is not False:
        secs = pc.if_else(pc.greater(vals, 1e11), pc.divide(vals, 1000.0), vals)
        return pc.cast(pc.floor(secs), pa.int64()), pa.nulls(len(vals), pa.string())
    ts, err = [], []
    for v in col.to_pylist():
        try:
            ts.append(parse_time(v) if v is not None else None)
            err.append(None)
        except ValueError as exc:
            ts.append(None)
            err.append(f"bad timestamp: {short(exc)}")
    return pa.array(ts, pa.int64()), pa.array(err, pa.string())


def header_of(line: str) -> list[str]:
    return [c.strip().lower() for c in next(csv.reader([line]))] if line.strip() else []


class Shard(NamedTuple):
    chunk: Chunk
    header: tuple[str, ...]


@register("pixelrec")
class PixelRecSource(FolderSource):
    kind, needs, lazy = "pixelrec", "folder with the CSV files", ("_images",)

    def __init__(self, cfg: SourceConfig, storage: StorageConfig):
        super().__init__(cfg, storage)
        self._files: tuple[str, str | None] | None = None

    # ------------------------------------------------------------------------------ files
    def files(self) -> tuple[str, str | None]:
        """(interaction CSV, item-info CSV or None), bare paths."""
        if self._files is not None:
            return self._files
        fs = self.loc.fs
        if self.cfg.reviews_file and self.cfg.meta_file:
            self._files = (self.loc.join(self.cfg.reviews_file), self.loc.join(self.cfg.meta_file))
            return self._files
        inter, info = [], []
        for rel, path in self._csv_files():
            cols = header_of(first_line(fs, path))
            if "item_id" in cols and "user_id" in cols:
                inter.append(rel)
            elif "item_id" in cols:
                info.append(rel)
        inter_name = self.cfg.reviews_file or self._one(inter, "interaction", "reviews_file", required=True)
        info_name = self.cfg.meta_file or self._one(info, "item-info", "meta_file", required=False)
        self._files = (self.loc.join(inter_name), self.loc.join(info_name) if info_name else None)
        return self._files

    def _csv_files(self) -> list[tuple[str, str]]:
        """(relative name, path) of the CSVs at the top and one folder down; cover folders are
        not listed (hundreds of thousands of files)."""
        out = []
        for entry in self.loc.fs.ls(self.loc.path, detail=True):
            name = posixpath.basename(entry["name"].rstrip("/"))
            if entry["type"] == "directory" and name.lower() not in IMAGE_FOLDERS:
                out += [
                    (f"{name}/{posixpath.basename(p)}", p)
                    for p in self.loc.fs.ls(entry["name"], detail=False)
                    if p.lower().endswith(".csv")
                ]
            elif entry["type"] != "directory" and name.lower().endswith(".csv"):
                out.append((name, entry["name"]))
        return sorted(out)

    def _one(self, found: list[str], what: str, option: str, required: bool) -> str | None:
        if len(found) == 1:
            return found[0]
        if not found and not required:
            return None
        raise ValueError(
            f"pixelrec source: {len(found)} {what} CSV files under {self.cfg.path} ({found}); "
            f"set data.sources[].{option}"
        )

    def images(self) -> dict[str, str]:
        """item_id -> cover URL, from one listing of the cover folder."""
        if self._images is None:
            if self.cfg.images_dir:
                img = Loc(self.cfg.images_dir, self.storage)
            else:
                sub = next((d for d in IMAGE_FOLDERS if self.loc.fs.isdir(self.loc.join(d))), None)
                img = Loc(self.loc.to_url(self.loc.join(sub)), self.storage) if sub else None
            self._images = photo_listing(img)
        return self._images

    # -------------------------------------------------------------------------------- items
    def item_shards(self) -> list[Any]:
        _, info = self.files()
        # One shard: titles and descriptions may hold quoted newlines, which a byte-range split
        # would cut through (the item file is small next to the interactions anyway). Without
        # the item-info file the shard ("") still yields the cover-only rows.
        return [info] if info else ([""] if self.images() else [])

    def read_items(self, shard: str) -> pa.Table:
        names = ("item_key", "title", "categories", "description", "image_uri", "error")
        cols: dict[str, list] = {c: [] for c in names}
        images = self.images()
        seen: set[str] = set()
        with self.loc.fs.open(shard, "rb") if shard else io.BytesIO(b"") as f:
            for get, err in csv_records(f, lower_header=True):
                row = dict.fromkeys(names)
                if err is None:
                    row["item_key"] = key(get("item_id"))
                    row["title"] = get("title")
                    row["description"] = get("description")
                    tag = get("tag") or get("tags") or get("category")
                    row["categories"] = [t.strip() for t in _TAG_SEP.split(tag) if t.strip()] if tag else []
                    row["image_uri"] = images.get(row["item_key"]) if row["item_key"] else None
                    if row["item_key"]:
                        seen.add(row["item_key"])
                row["error"] = err
                for c in names:
                    cols[c].append(row[c])
        if images:  # interacted items without an item-info row but with a cover: cover-only rows
            for item, uri in photo_only_items(self._interacted(), seen, images.get):
                append_row(cols, item_key=item, categories=[], image_uri=uri)
        n = len(cols["item_key"])
        cols["domain"] = [self.cfg.domain] * n
        return table(cols, RAW_ITEMS, n)

    # ------------------------------------------------------------------------- interactions
    def interaction_shards(self) -> list[Any]:
        inter, _ = self.files()
        header = tuple(header_of(first_line(self.loc.fs, inter)))
        if "user_id" not in header or "item_id" not in header:
            raise ValueError(f"pixelrec source: {inter} has no user_id/item_id header (got {list(header)})")
        return [
            Shard(c, header) for c in line_chunks(self.loc.fs, inter, skip_header=True, shard_bytes=self.shard_bytes)
        ]

    def read_interactions(self, shard: Shard) -> pa.Table:
        t, bad = csv_chunk(self.loc.fs, shard.chunk, shard.header)
        n = t.num_rows
        h = shard.header
        tcol = next((c for c in ("timestamp", "time", "ts") if c in h), None)
        err = pa.nulls(n, pa.string())
        if tcol is None:
            # Without a time column, the position in the file keeps the order (chunk starts are
            # byte offsets or line numbers, both more than a chunk's row count apart).
            ts = pa.array(range(shard.chunk.start, shard.chunk.start + n), pa.int64())
        else:
            ts, err = times(t.column(tcol))
        good = pa.table(
            {
                "user_key": t.column("user_id"),
                "item_key": t.column("item_id"),
                "ts": ts,
                "error": err,
                "domain": pa.array([self.cfg.domain] * n, pa.string()),
            }
        )
        return pa.concat_tables([conform(good, RAW_INTERACTIONS), error_rows(bad, RAW_INTERACTIONS, self.cfg.domain)])

    def _interacted(self) -> Iterator[str | None]:
        """The interactions' item ids, shard by shard, parsed as :meth:`read_interactions` does."""
        for shard in self.interaction_shards():
            t, _ = csv_chunk(self.loc.fs, shard.chunk, shard.header)
            yield from t.column("item_id").to_pylist()

    def fingerprint(self) -> str:
        inter, info = self.files()
        img = self.cfg.images_dir
        if img is None:
            sub = next((d for d in IMAGE_FOLDERS if self.loc.fs.isdir(self.loc.join(d))), None)
            img = self.loc.to_url(self.loc.join(sub)) if sub else None
        urls = [self.loc.to_url(inter), self.loc.to_url(info) if info else None, img]
        return fingerprint(urls, self.storage, {"kind": "pixelrec"})
