"""Shared plumbing for the file-based readers: locations, line-range shards, lenient parsing.

Big line-oriented files are split into byte ranges; a line belongs to the shard in which its
first byte lies, so shards never overlap and never miss a line. gzip streams cannot be entered
in the middle, so a ``.gz`` file is split into *line* ranges whose count is estimated from a
sample; each shard then decompresses from the start and skips to its range (decompressing is far
cheaper than parsing JSON, so the parse still runs in parallel and no shard holds the whole file).
"""

from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import io
import json
import math
import posixpath
import re
import zlib
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from reasonrec.config import SourceConfig, StorageConfig
from reasonrec.data.schemas import conform
from reasonrec.io import file_fingerprint, filesystem

# Target uncompressed bytes per shard: large enough that per-task overhead is negligible, small
# enough that one shard's Arrow table stays far below a worker's memory.
SHARD_BYTES = 64 << 20
_GZ_SAMPLE = 4 << 20


class Loc:
    """A folder or file on local disk or S3: the fsspec filesystem, the bare path, and the URL
    prefix to show outside (``s3://`` or nothing)."""

    def __init__(self, url: str, storage: StorageConfig):
        self.url = url
        self.storage = storage
        self.fs, self.path = filesystem(url, storage)
        self.scheme = "s3://" if url.startswith("s3://") else ""

    def join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def to_url(self, bare: str) -> str:
        return self.scheme + bare

    def listdir(self) -> list[str]:
        """File names (not paths) directly under the folder."""
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path, detail=False))

    def files_under(self, sub: str = "") -> dict[str, str]:
        """Every file below ``sub`` (recursively), keyed by path relative to it. One listing per
        call, so callers can test image existence without a request per item."""
        root = self.join(sub) if sub else self.path
        if not self.fs.exists(root):
            return {}
        out = {}
        for p in self.fs.find(root):
            rel = posixpath.relpath(p, root)
            out[rel] = p
        return out

    def __getstate__(self):
        # fsspec instances are picklable, but rebuilding keeps worker caches independent.
        return {"url": self.url, "storage": self.storage}

    def __setstate__(self, state):
        self.__init__(state["url"], state["storage"])


class FolderSource:
    """What the file-folder sources share: ``cfg.path`` is required (``needs`` names what the
    folder holds), its :class:`Loc` and the shard size. The attributes in ``lazy`` are caches
    (listings, id maps): None at first, and dropped when the source is pickled to a Ray worker,
    which rebuilds its own."""

    kind = ""
    needs = ""
    lazy: tuple[str, ...] = ()

    def __init__(self, cfg: SourceConfig, storage: StorageConfig):
        if not cfg.path:
            raise ValueError(f"{self.kind} source needs data.sources[].path ({self.needs})")
        self.cfg = cfg
        self.storage = storage
        self.loc = Loc(cfg.path, storage)
        self.shard_bytes = SHARD_BYTES
        for name in self.lazy:
            setattr(self, name, None)

    def __getstate__(self):
        return {**self.__dict__, **dict.fromkeys(self.lazy)}


# ---------------------------------------------------------------------------------- photos
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
# The item shard of the readers whose metadata spans several shards (Amazon): it yields the
# photo-only rows, which need every metadata key and so cannot come from one metadata shard.
PHOTO_ONLY = "photo-only items"


def photo_listing(loc: Loc | None, exts: Sequence[str] = IMAGE_EXTS) -> dict[str, str]:
    """File stem (the item key) -> photo URL for every image file below ``loc``, from one
    recursive listing (no request per item). A stem with several files keeps the first of
    ``exts`` (jpg over png)."""
    ranked: dict[str, tuple[int, str]] = {}
    for rel, path in loc.files_under().items() if loc else ():
        stem, ext = posixpath.splitext(posixpath.basename(rel))
        if ext.lower() in exts:
            cand = (exts.index(ext.lower()), loc.to_url(path))
            ranked[stem] = min(ranked.get(stem, cand), cand)
    return {stem: url for stem, (_, url) in ranked.items()}


def photo_only_items(
    interacted: Iterable[str | None], described: Iterable[str | None], photo_of: Callable[[str], str | None]
) -> list[tuple[str, str]]:
    """``(key, photo URL)`` of the items that the interactions reference and the metadata lacks
    but whose photo exists: they become photo-only item rows instead of key-only stubs in
    ``prepare``, so their photo reaches the prompts. Photos of items nobody interacted with are
    not added (they would only inflate the catalog the negatives are drawn from).

    Both iterables are streamed, ``interacted`` first: only keys with a photo are held, so memory
    is bounded by the photo listing, not by the interactions or the metadata. Sorted by key: the
    row order, and so prepare's tie-breaks, must not depend on set order."""
    wanted: dict[str, str] = {}
    for k in interacted:
        if k and k not in wanted:
            uri = photo_of(k)
            if uri:
                wanted[k] = uri
    for k in described:
        if k:
            wanted.pop(k, None)
    return sorted(wanted.items())


def append_row(cols: dict[str, list], **values: Any) -> None:
    """One row into column lists; columns not given are null."""
    for name, col in cols.items():
        col.append(values.get(name))


class Chunk(NamedTuple):
    """A slice of a line-oriented file: bytes [start, end) of a plain file, or lines
    [start, end) of a ``.gz`` file (end None = to the end)."""

    path: str
    start: int
    end: int | None
    gz: bool = False


def is_gz(path: str) -> bool:
    return path.endswith(".gz")


def line_chunks(
    fs,
    path: str,
    skip_header: bool = False,
    shard_bytes: int = SHARD_BYTES,
    stop: int | None = None,
    gz_sample: int = _GZ_SAMPLE,
) -> list[Chunk]:
    """Split ``path`` into chunks of about ``shard_bytes`` (uncompressed). With ``skip_header`` the
    first line is left out of every chunk (read it with :func:`first_line`). ``stop`` (plain
    files only) ends the last chunk at that byte offset, which must be a line start."""
    if is_gz(path):
        return _gz_chunks(fs, path, skip_header, shard_bytes, gz_sample)
    size = fs.size(path) if stop is None else min(stop, fs.size(path))
    start = len(first_line(fs, path, raw=True)) if skip_header else 0
    if size <= start:
        return []
    n = max(1, math.ceil((size - start) / shard_bytes))
    step = math.ceil((size - start) / n)
    return [Chunk(path, s, min(s + step, size)) for s in range(start, size, step)]


def _gz_chunks(fs, path: str, skip_header: bool, shard_bytes: int, sample_bytes: int) -> list[Chunk]:
    first = 1 if skip_header else 0
    # Decompress a sample in small steps, so the compressed bytes behind it are known closely.
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    sample, got, fed = [], 0, 0
    with fs.open(path, "rb") as raw:
        while got < sample_bytes and not d.eof:
            block = raw.read(1 << 14)
            if not block:
                break
            fed += len(block)
            piece = d.decompress(block)
            sample.append(piece)
            got += len(piece)
    if got < sample_bytes:  # the whole file fits in the sample
        return [Chunk(path, first, None, True)]
    data = b"".join(sample)
    est_bytes = fs.size(path) * len(data) / max(1, fed)
    est_lines = est_bytes * max(1, data.count(b"\n")) / len(data)
    n = max(1, math.ceil(est_bytes / shard_bytes))
    per = max(1, math.ceil(est_lines / n))
    # The last chunk is open-ended, so an under-estimate never loses lines.
    return [Chunk(path, first + i * per, None if i == n - 1 else first + (i + 1) * per, True) for i in range(n)]


def offset_after_lines(fs, path: str, start: int, n_lines: int) -> int:
    """Byte offset just past the ``n_lines``-th line from ``start`` (or the file size)."""
    with fs.open(path, "rb") as f:
        f.seek(start)
        pos, left = start, n_lines
        while left > 0:
            block = f.read(1 << 20)
            if not block:
                break
            count = block.count(b"\n")
            if count < left:
                left -= count
                pos += len(block)
                continue
            i = -1
            for _ in range(left):
                i = block.index(b"\n", i + 1)
            return pos + i + 1
    return pos


def first_line(fs, path: str, raw: bool = False) -> Any:
    """The first line of a (possibly gzipped) file: bytes with its newline if ``raw``, else text."""
    with fs.open(path, "rb") as f:
        if is_gz(path):
            with gzip.GzipFile(fileobj=f) as g:
                line = g.readline()
        else:
            line = f.readline()
    return line if raw else line.decode("utf-8-sig").rstrip("\r\n")


def chunk_data(fs, chunk: Chunk) -> bytes:
    """The chunk's complete lines as one bytes object (with their newlines)."""
    if chunk.gz:
        return b"".join(line + b"\n" for _, line in _read_gz(fs, chunk))
    return _range_data(fs, chunk)[1]


def _range_data(fs, chunk: Chunk) -> tuple[int, bytes]:
    start, end = chunk.start, chunk.end
    with fs.open(chunk.path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            data = f.read(end - start + 1)
            nl = data.find(b"\n")
            if nl < 0:  # the whole range lies inside a line owned by an earlier chunk
                return end, b""
            base = start + nl
            data = data[nl + 1 :]
        else:
            base = 0
            data = f.read(end)
        if data and not data.endswith(b"\n"):
            # The last line starts in this chunk: finish it from the following bytes.
            tail = []
            while True:
                block = f.read(1 << 16)
                if not block:
                    break
                i = block.find(b"\n")
                if i >= 0:
                    tail.append(block[: i + 1])
                    break
                tail.append(block)
            data += b"".join(tail)
    return base, data


def read_chunk(fs, chunk: Chunk) -> Iterator[tuple[int, bytes]]:
    """Yield ``(order, line)`` for every line of the chunk (newline stripped). ``order`` is the
    byte offset (plain files) or line number (gzip) of the line: increasing in file order, so
    it can stand in for time where a source has none."""
    if chunk.gz:
        yield from _read_gz(fs, chunk)
        return
    base, data = _range_data(fs, chunk)
    pos = 0
    for line in data.split(b"\n"):
        if pos >= len(data):  # the empty piece after the final newline
            break
        yield base + pos, line.rstrip(b"\r")
        pos += len(line) + 1


def _read_gz(fs, chunk: Chunk) -> Iterator[tuple[int, bytes]]:
    with fs.open(chunk.path, "rb") as raw, gzip.GzipFile(fileobj=raw) as g:
        for i, line in enumerate(g):
            if i < chunk.start:
                continue
            if chunk.end is not None and i >= chunk.end:
                break
            yield i, line.rstrip(b"\r\n")


def decode(line: bytes) -> str:
    return line.decode("utf-8-sig") if line.startswith(b"\xef\xbb\xbf") else line.decode("utf-8")


def short(exc: BaseException | str, limit: int = 120) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def parse_record(text: str) -> dict:
    """One JSON object per line; the 2014 Amazon metadata files are Python literals instead
    (single quotes), hence the ``ast.literal_eval`` fallback."""
    try:
        obj = json.loads(text)
    except ValueError as exc:
        try:
            obj = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise ValueError(f"malformed json: {short(exc)}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"malformed json: expected an object, got {type(obj).__name__}")
    return obj


def json_records(fs, chunk: Chunk) -> Iterator[tuple[dict | None, str | None]]:
    """The chunk's JSON-line records: ``(record, None)`` per parsed line, ``(None, reason)`` per
    bad one (malformed JSON or UTF-8); blank lines are skipped."""
    for _, raw in read_chunk(fs, chunk):
        if not raw.strip():
            continue
        try:
            yield parse_record(decode(raw)), None
        except (ValueError, UnicodeDecodeError) as exc:
            yield None, short(exc) if isinstance(exc, ValueError) else f"bad utf-8: {short(exc)}"


def csv_fields(line: str, sep: str = ",") -> list[str]:
    # Most lines carry no quotes; split them directly and let the csv module handle the rest.
    if '"' not in line:
        return line.split(sep)
    return next(csv.reader([line], delimiter=sep, strict=True))


def csv_records(f, lower_header: bool = False) -> Iterator[tuple[Callable[[str], str | None] | None, str | None]]:
    """The rows of a whole CSV file (binary file object, header first) whose fields may hold
    quoted newlines: ``(get, None)`` per well-formed row, where ``get(column)`` is the stripped
    value or None (empty or no such column), ``(None, reason)`` per malformed one; blank lines
    are skipped. The csv module rather than pyarrow: a bad row must become an error row, not
    fail the file."""
    reader = csv.reader(io.TextIOWrapper(f, encoding="utf-8-sig", errors="replace", newline=""))
    header = [c.strip().lower() if lower_header else c.strip() for c in next(reader, [])]
    pos = {c: i for i, c in enumerate(header)}
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield None, f"malformed csv: {short(exc)}"
            continue
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            yield None, f"malformed csv: expected {len(header)} fields, got {len(values)}"
            continue

        def get(col: str, values: list[str] = values) -> str | None:
            return (values[pos[col]].strip() or None) if col in pos else None

        yield get, None


def csv_chunk(
    fs, chunk: Chunk, columns: Sequence[str], delimiter: str = ",", quoting: bool = True
) -> tuple[pa.Table, list[str]]:
    """Parse a chunk of a delimited file (header excluded) into an all-string table of the
    well-formed rows (fields trimmed, blank -> null) plus one reason per malformed row.

    Arrow's C++ parser does the work (the Python fallback below runs ~30x slower); it is kept
    single-threaded because a Ray task holds one CPU. A chunk Arrow refuses as a whole (invalid
    UTF-8) is re-read line by line so only the bad lines become errors."""
    data = chunk_data(fs, chunk)
    names = [str(c) for c in columns]
    if not data:
        return pa.Table.from_arrays([pa.array([], pa.string()) for _ in names], names=names), []
    bad: list[str] = []

    def on_bad(row) -> str:
        bad.append(f"malformed csv: expected {row.expected_columns} fields, got {row.actual_columns}")
        return "skip"

    try:
        t = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(column_names=names, use_threads=False, block_size=len(data) + 1),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter, quote_char='"' if quoting else False, invalid_row_handler=on_bad
            ),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in names}),
        )
    except pa.ArrowInvalid:
        return _python_csv(data, names, delimiter, quoting)
    # By position, not name: a header may repeat a name.
    return pa.Table.from_arrays([_clean(t.column(i)) for i in range(len(names))], names=names), bad


def _python_csv(data: bytes, names: list[str], delimiter: str, quoting: bool) -> tuple[pa.Table, list[str]]:
    cols: list[list] = [[] for _ in names]
    bad: list[str] = []
    for raw in data.split(b"\n"):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
            values = csv_fields(line, delimiter) if quoting else line.split(delimiter)
        except (UnicodeDecodeError, csv.Error) as exc:
            bad.append(f"malformed csv: {short(exc)}")
            continue
        if len(values) != len(names):
            bad.append(f"malformed csv: expected {len(names)} fields, got {len(values)}")
            continue
        for col, v in zip(cols, values):
            col.append(v.strip() or None)
    return pa.Table.from_arrays([pa.array(v, pa.string()) for v in cols], names=names), bad


def _clean(col: pa.ChunkedArray) -> pa.ChunkedArray:
    trimmed = pc.utf8_trim_whitespace(col)
    return pc.if_else(pc.equal(trimmed, ""), pa.scalar(None, pa.string()), trimmed)


def to_float(col: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """Strings -> float64 (null stays null), and a mask of the values that are not numbers."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    try:
        return pc.cast(arr, pa.float64()), pa.array([False] * len(arr), pa.bool_())
    except pa.ArrowInvalid:  # some value is not a number: find which, one by one
        vals, mask = [], []
        for v in arr.to_pylist():
            try:
                vals.append(float(v) if v is not None else None)
                mask.append(False)
            except ValueError:
                vals.append(None)
                mask.append(True)
        return pa.array(vals, pa.float64()), pa.array(mask, pa.bool_())


def error_rows(reasons: list[str], schema: pa.Schema, domain: str) -> pa.Table:
    """Rows for lines that could not be parsed: only ``error`` and ``domain`` set."""
    n = len(reasons)
    return conform(
        pa.table({"error": pa.array(reasons, pa.string()), "domain": pa.array([domain] * n, pa.string())}), schema
    )


def key(value: Any) -> str | None:
    """A source id as a string key (ids need not be numbers); blank -> None."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def text(value: Any, sep: str = "\n") -> str | None:
    """Free text that may arrive as a string or a list of strings; blank -> None."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        parts = [str(v).strip() for v in value if v is not None and str(v).strip()]
        return sep.join(parts) or None
    out = str(value).strip()
    return out or None


_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")


def price(value: Any) -> float | None:
    """A price from a number or a string such as "$12.99", "$1,299.00" or a range
    "$5.99 - $12.99" (midpoint). Anything else (empty, HTML noise) -> None: a price is optional,
    so an unreadable one is not worth quarantining the item."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    s = str(value).strip()
    if not s or len(s) > 40:
        return None
    nums = _NUMBER.findall(s)
    if not nums or len(nums) > 2:
        return None
    if re.sub(r"[\d.,\s$€£¥\-–—]|to|USD|EUR|GBP", "", s, flags=re.I):
        return None
    vals = [float(n.replace(",", "")) for n in nums]
    return sum(vals) / len(vals)


def table(rows: dict[str, list], schema: pa.Schema, n: int) -> pa.Table:
    """Arrow table of exactly ``schema`` from column lists (absent columns become nulls)."""
    arrays = {name: pa.array(vals, type=schema.field(name).type) for name, vals in rows.items()}
    if not arrays:
        return conform(pa.table({"_": pa.nulls(n)}), schema)
    return conform(pa.table(arrays), schema)


def fingerprint(urls: Sequence[str | None], storage: StorageConfig, extra: Any = None) -> str:
    """Fingerprint over several inputs (and reader options that change the output)."""
    parts = [f"{u}={file_fingerprint(u, storage)}" for u in urls if u]
    parts.append(json.dumps(extra, sort_keys=True, default=str))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
