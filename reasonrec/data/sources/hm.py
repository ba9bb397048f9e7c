"""H&M Personalized Fashion Recommendations (Kaggle) layout under ``cfg.path``:

* ``transactions_train.csv``: t_dat (YYYY-MM-DD), customer_id, article_id, price,
  sales_channel_id. Byte-range shards; ``cfg.max_rows`` > 0 reads only the first N rows.
* ``articles.csv``: article_id, prod_name, product_type_name, product_group_name,
  department_name, index_name, section_name, garment_group_name, detail_desc, ...
* ``customers.csv`` (optional): side information, see :meth:`HMSource.read_users`.
* ``images/<first 3 digits>/<article_id>.jpg`` (or ``cfg.images_dir``).

article_id keys are the 10-digit zero-padded form ("0108775015"), however a file wrote them.
ts = unix seconds of t_dat (UTC midnight). Item price = mean transaction price of the article
over the transactions read (null when none). The image set is ~30 GB, so items carry the
image's URL in ``image_uri`` rather than the bytes; a missing image leaves it null.

Every purchased article whose photo exists gets that URL, metadata or not: an article that the
transactions read reference but ``articles.csv`` lacks (a sample of the Kaggle set often keeps a
fraction of the articles file and every photo) becomes a photo-only item row (key, mean price,
``image_uri``) instead of a key-only stub in ``prepare``. Photos of articles nobody bought are
not added: they would only inflate the catalog the negatives are drawn from.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from reasonrec.data.schemas import RAW_INTERACTIONS, RAW_ITEMS, RAW_USERS, conform
from reasonrec.data.sources import register
from reasonrec.data.sources._common import (
    Chunk,
    FolderSource,
    Loc,
    append_row,
    csv_chunk,
    csv_records,
    decode,
    error_rows,
    fingerprint,
    first_line,
    key,
    line_chunks,
    offset_after_lines,
    photo_only_items,
    table,
)

TRANSACTIONS = "transactions_train.csv"
ARTICLES = "articles.csv"
CUSTOMERS = "customers.csv"
CATEGORY_COLUMNS = ("product_group_name", "product_type_name", "department_name", "section_name", "garment_group_name")


def article_key(value: str | None) -> str | None:
    """Zero-pad numeric article ids to 10 digits: the same article must have one key whether a
    file kept the leading zero or (as pandas exports do) dropped it."""
    k = key(value)
    return k.zfill(10) if k and k.isdigit() and len(k) < 10 else k


def article_keys(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """:func:`article_key` over an Arrow column."""
    return pc.if_else(pc.match_substring_regex(col, r"^\d{1,9}$"), pc.utf8_lpad(col, width=10, padding="0"), col)


def image_rel(article: str) -> str:
    return f"{article[:3]}/{article}.jpg"


class Shard(NamedTuple):
    chunk: Chunk
    header: tuple[str, ...]


@register("hm")
class HMSource(FolderSource):
    kind, needs, lazy = "hm", "folder with transactions_train.csv", ("_images", "_prices")

    def _image_loc(self) -> Loc:
        return Loc(self.cfg.images_dir or self.loc.to_url(self.loc.join("images")), self.storage)

    def images(self) -> dict[str, str]:
        """Relative image path -> URL, from one recursive listing."""
        if self._images is None:
            img = self._image_loc()
            self._images = {rel: img.to_url(path) for rel, path in img.files_under().items()}
        return self._images

    def _tx_end(self, path: str, header_len: int) -> int | None:
        if self.cfg.max_rows and self.cfg.max_rows > 0:
            return offset_after_lines(self.loc.fs, path, header_len, self.cfg.max_rows)
        return None

    def mean_prices(self) -> dict[str, float]:
        """article key -> mean transaction price, streamed through Arrow's CSV reader (two columns
        only; rows it cannot parse are skipped here and surface as error rows in interactions)."""
        if self._prices is None:
            path = self.loc.join(TRANSACTIONS)
            left = self.cfg.max_rows if self.cfg.max_rows and self.cfg.max_rows > 0 else None
            parts = []
            with self.loc.fs.open(path, "rb") as f:
                reader = pacsv.open_csv(
                    f,
                    parse_options=pacsv.ParseOptions(invalid_row_handler=lambda row: "skip"),
                    convert_options=pacsv.ConvertOptions(
                        include_columns=["article_id", "price"],
                        column_types={"article_id": pa.string(), "price": pa.float64()},
                    ),
                )
                for batch in reader:
                    if left is not None:
                        if left <= 0:
                            break
                        batch = batch.slice(0, left)
                        left -= batch.num_rows
                    t = pa.Table.from_batches([batch])
                    parts.append(t.group_by("article_id").aggregate([("price", "sum"), ("price", "count")]))
            if not parts:
                self._prices = {}
            else:
                agg = (
                    pa.concat_tables(parts)
                    .group_by("article_id")
                    .aggregate([("price_sum", "sum"), ("price_count", "sum")])
                )
                sums: dict[str, float] = {}
                counts: dict[str, int] = {}
                for k, total, n in zip(
                    agg.column("article_id").to_pylist(),
                    agg.column("price_sum_sum").to_pylist(),
                    agg.column("price_count_sum").to_pylist(),
                ):
                    ak = article_key(k)  # "108775015" and "0108775015" are one article
                    if ak and n:
                        sums[ak] = sums.get(ak, 0.0) + total
                        counts[ak] = counts.get(ak, 0) + n
                self._prices = {k: sums[k] / counts[k] for k in sums}
        return self._prices

    # -------------------------------------------------------------------------------- items
    def item_shards(self) -> list[Any]:
        # One shard: detail_desc is free text that may hold quoted newlines; the file is small.
        # Without articles.csv the shard ("") still yields the photo-only rows of purchased articles.
        if self.loc.fs.exists(self.loc.join(ARTICLES)):
            return [self.loc.join(ARTICLES)]
        return [""] if self.loc.fs.exists(self.loc.join(TRANSACTIONS)) and self.images() else []

    def read_items(self, shard: str) -> pa.Table:
        names = ("item_key", "title", "brand", "categories", "price", "description", "image_uri", "error")
        cols: dict[str, list] = {c: [] for c in names}
        prices = self.mean_prices() if self.loc.fs.exists(self.loc.join(TRANSACTIONS)) else {}
        images = self.images()
        seen: set[str] = set()
        with self.loc.fs.open(shard, "rb") if shard else io.BytesIO(b"") as f:
            for get, err in csv_records(f):
                row = dict.fromkeys(names)
                if err is None:
                    art = article_key(get("article_id"))
                    cats: list[str] = []
                    for c in CATEGORY_COLUMNS:
                        v = get(c)
                        if v and v not in cats:
                            cats.append(v)
                    row.update(
                        item_key=art,
                        title=get("prod_name"),
                        brand=get("index_name"),
                        categories=cats,
                        description=get("detail_desc"),
                        price=prices.get(art) if art else None,
                        image_uri=images.get(image_rel(art)) if art else None,
                    )
                    if art:
                        seen.add(art)
                row["error"] = err
                for c in names:
                    cols[c].append(row[c])
        # Purchased articles without a metadata row but with a photo: photo-only rows.
        for art, uri in photo_only_items(prices, seen, lambda a: images.get(image_rel(a))):
            append_row(cols, item_key=art, price=prices[art], image_uri=uri, categories=[])
        n = len(cols["item_key"])
        cols["domain"] = [self.cfg.domain] * n
        return table(cols, RAW_ITEMS, n)

    # ------------------------------------------------------------------------- interactions
    def interaction_shards(self) -> list[Any]:
        path = self.loc.join(TRANSACTIONS)
        raw_header = first_line(self.loc.fs, path, raw=True)
        header = tuple(c.strip() for c in decode(raw_header).rstrip("\r\n").split(","))
        stop = self._tx_end(path, len(raw_header))
        return [
            Shard(c, header)
            for c in line_chunks(self.loc.fs, path, skip_header=True, shard_bytes=self.shard_bytes, stop=stop)
        ]

    def read_interactions(self, shard: Shard) -> pa.Table:
        t, bad = csv_chunk(self.loc.fs, shard.chunk, shard.header)
        n = t.num_rows

        def col(name: str) -> pa.ChunkedArray:
            return t.column(name) if name in t.column_names else pa.chunked_array([pa.nulls(n, pa.string())])

        day = col("t_dat")
        ts = pc.strptime(day, format="%Y-%m-%d", unit="s", error_is_null=True).cast(pa.int64())
        err = pc.if_else(
            pc.and_(pc.is_valid(day), pc.is_null(ts)),
            pc.binary_join_element_wise("bad t_dat: ", day, ""),
            pa.scalar(None, pa.string()),
        )
        good = pa.table(
            {
                "user_key": col("customer_id"),
                "item_key": article_keys(col("article_id")),
                "ts": ts,
                "error": err,
                "domain": pa.array([self.cfg.domain] * n, pa.string()),
            }
        )
        return pa.concat_tables([conform(good, RAW_INTERACTIONS), error_rows(bad, RAW_INTERACTIONS, self.cfg.domain)])

    # -------------------------------------------------------------------------------- users
    def read_users(self) -> pa.Table | None:
        """customers.csv as RAW_USERS (age, club status, ... as a JSON object), or None.
        Not part of the Source protocol: user side information is optional for every stage."""
        path = self.loc.join(CUSTOMERS)
        if not self.loc.fs.exists(path):
            return None
        keys, attrs = [], []
        with self.loc.fs.open(path, "rb") as f:
            for rec in csv.DictReader(io.TextIOWrapper(f, encoding="utf-8-sig", errors="replace", newline="")):
                keys.append(key(rec.pop("customer_id", None)))
                attrs.append(
                    json.dumps(
                        {k: v for k, v in rec.items() if k and v not in (None, "")}, ensure_ascii=False, sort_keys=True
                    )
                )
        return table(
            {"user_key": keys, "attributes": attrs, "domain": [self.cfg.domain] * len(keys)}, RAW_USERS, len(keys)
        )

    def fingerprint(self) -> str:
        urls = [
            self.loc.to_url(self.loc.join(n))
            for n in (TRANSACTIONS, ARTICLES, CUSTOMERS)
            if n == TRANSACTIONS or self.loc.fs.exists(self.loc.join(n))
        ]
        img = self._image_loc()
        if img.fs.exists(img.path):
            urls.append(img.url)
        return fingerprint(urls, self.storage, {"kind": "hm", "max_rows": self.cfg.max_rows})
