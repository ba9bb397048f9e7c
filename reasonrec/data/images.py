"""Item photos for the VLM: fetch, validate, resize, re-encode; failures classified by reason.

Ray-free row logic of the ``images`` stage (``ray_jobs/images.py``): :func:`process_batch` turns
a batch of prepared items (``item_id``, embedded ``image`` bytes and/or ``image_uri``) into
:data:`ITEM_IMAGES` rows. An item's embedded bytes are used first, its ``image_uri`` second: a
local path or ``s3://`` URL (opened through :func:`reasonrec.io.filesystem`), or an ``http(s)://``
URL such as Amazon's ``imUrl`` (fetched with urllib3 when ``images.fetch_http`` is on: a timeout,
a few retries on connection errors and 408/429/5xx answers, and a body read only up to
``max_bytes``).

Statuses (``image_status``):

* ``ok``: decoded, padded to a square (white bars, nothing of the product is cropped away),
  resized to ``spec.size`` x ``spec.size`` and re-encoded as ``spec.format``;
* ``no_image``: the item names no photo at all;
* ``missing``: the named file does not exist (an HTTP 404 or 410 answer included);
* ``corrupt``: the bytes are not a decodable image;
* ``truncated``: a valid header, but the data stops early;
* ``too_large``: declared width x height over ``spec.max_pixels`` (checked from the header
  *before* decoding, with PIL's ``MAX_IMAGE_PIXELS`` guard as a second line: a decompression
  bomb costs a few bytes, never gigabytes), or a file over ``spec.max_bytes`` (an HTTP body is
  refused from its Content-Length, or its reading stops past ``max_bytes``);
* ``unsupported``: a location or format this code does not read (a scheme other than local,
  ``file://``, ``s3://`` and ``http(s)://``; ``http(s)://`` too when ``images.fetch_http`` is off;
  SVG, PDF, HEIC/AVIF, a PIL format outside :data:`FORMATS`);
* ``fetch_error``: reading the file failed for another reason (permissions, a timeout, a refused
  or cut connection, an HTTP error answer other than 404/410, after the retries).

Only ``ok`` rows carry bytes; every other item falls back to text in the prompts.

:func:`item_photos` is what the photo readers (the catalog, the fine-tune data) call: the
committed ``images`` stage's photos when it matches the committed ``prepare`` output, else
``prepare``'s embedded ``image`` column (runs made before the images stage keep working).
"""

from __future__ import annotations

import io
import logging
import threading
import time
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from reasonrec.config import StorageConfig
from reasonrec.io import filesystem

if TYPE_CHECKING:
    from reasonrec.config import RunConfig
    from reasonrec.io import ArtifactStore

STAGE = "images"
TABLE = "item_images"
STATUSES = ("ok", "no_image", "missing", "corrupt", "truncated", "too_large", "unsupported", "fetch_error")
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")  # decoded; anything else: unsupported
DEFAULT_SIZE = 336  # when neither images.size nor vlm.image_size is set (LLaVA-1.5's input side)
ITEM_IMAGES = pa.schema(
    [
        ("item_id", pa.int64()),
        ("image", pa.binary()),  # re-encoded photo (spec.format), null unless status is "ok"
        ("image_status", pa.string()),  # one of STATUSES
    ]
)
# Magic prefixes of formats that are images but not ones PIL (as installed) decodes.
_UNSUPPORTED_MAGIC = (b"<svg", b"<?xml", b"%PDF")
_UNSUPPORTED_FTYP = (b"heic", b"heix", b"hevc", b"mif1", b"avif", b"avis")
log = logging.getLogger("reasonrec.images")


@dataclass(frozen=True)
class HttpOptions:
    """How ``http(s)://`` photo URLs are fetched."""

    timeout: float = 20.0  # seconds to connect, to wait for the answer, and to read the body
    retries: int = 2  # further tries after a connection error, a timeout or a 408/429/5xx answer
    backoff: float = 0.25  # seconds between tries: 0 before the first retry, then backoff * 2**n


@dataclass(frozen=True)
class ImageSpec:
    """What the stage produces: a ``size`` x ``size`` image encoded as ``format``."""

    size: int = 64
    format: str = "jpeg"  # jpeg | png
    quality: int = 90
    max_pixels: int = 50_000_000
    max_bytes: int = 32 << 20
    threads: int = 8  # photos fetched and decoded concurrently per batch
    http: HttpOptions | None = HttpOptions()  # None: http(s) URLs are not fetched (unsupported)

    def __post_init__(self):
        if self.format.lower() not in ("jpeg", "png"):
            raise ValueError(f"images.format must be jpeg or png, got {self.format!r}")
        if self.size < 1 or self.max_pixels < 1 or self.max_bytes < 1:
            raise ValueError("images.size, images.max_pixels and images.max_bytes must be >= 1")


def target_size(cfg: RunConfig) -> int:
    """The side photos are resized to: ``images.size``, else the VLM's ``vlm.image_size`` (what
    the tiny/small towers take), else :data:`DEFAULT_SIZE`."""
    return int(cfg.images.size or cfg.vlm.image_size or DEFAULT_SIZE)


def spec_of(cfg: RunConfig) -> ImageSpec:
    ic = cfg.images
    return ImageSpec(
        size=target_size(cfg),
        format=ic.format.lower(),
        quality=ic.quality,
        max_pixels=ic.max_pixels,
        max_bytes=ic.max_bytes,
        http=HttpOptions(timeout=ic.http_timeout_s, retries=ic.http_retries) if ic.fetch_http else None,
    )


class ImageFailure(Exception):
    """A photo that cannot be used, with its reason (one of :data:`STATUSES`)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ------------------------------------------------------------------------------------ fetch
def fetch(
    uri: str, storage: StorageConfig | None = None, max_bytes: int = 32 << 20, http: HttpOptions | None = None
) -> bytes:
    """The bytes behind ``uri`` (local path, ``file://``, ``s3://``, and ``http(s)://`` when
    ``http`` is given); raises :class:`ImageFailure`."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("http", "https"):
        if http is None:
            raise ImageFailure("unsupported", "http(s) URLs are not fetched (images.fetch_http is off)")
        return fetch_http(uri, max_bytes, http)
    if scheme not in ("", "s3", "file"):
        raise ImageFailure("unsupported", f"location {scheme}:// is not fetched")
    try:
        fs, path = filesystem(uri, storage)
        size = fs.size(path)
        if size is not None and size > max_bytes:
            raise ImageFailure("too_large", f"{size} bytes > {max_bytes}")
        return fs.cat_file(path)
    except ImageFailure:
        raise
    except FileNotFoundError as exc:
        raise ImageFailure("missing", str(exc)) from None
    except IsADirectoryError as exc:
        raise ImageFailure("missing", f"a folder: {exc}") from None
    except Exception as exc:  # permissions, network, throttling: the photo may exist
        raise ImageFailure("fetch_error", f"{type(exc).__name__}: {exc}") from None


# Answers worth another try (timeouts, throttling, a server's passing trouble), and answers that
# say the photo does not exist.
_RETRY_STATUS = (408, 429, 500, 502, 503, 504)
_MISSING_STATUS = (404, 410)
_POOL_SIZE = 16  # connections kept per host; more threads still run, their extra ones are not kept
_pools: dict[HttpOptions, Any] = {}
_pools_lock = threading.Lock()


def _http_pool(opts: HttpOptions):
    """One urllib3 PoolManager per process and option set: thread-safe, so the batch's threads
    share its keep-alive connections. urllib3 rather than fsspec's HTTP filesystem: a plain
    streamed GET, with retries and backoff built in, and no HEAD request before it."""
    import urllib3

    with _pools_lock:
        pool = _pools.get(opts)
        if pool is None:
            retry = urllib3.Retry(
                total=None,
                connect=opts.retries,
                read=opts.retries,
                status=opts.retries,
                other=0,
                redirect=5,
                allowed_methods=frozenset({"GET"}),
                status_forcelist=_RETRY_STATUS,
                backoff_factor=opts.backoff,
                raise_on_status=False,  # the last answer is classified below
                respect_retry_after_header=False,  # a Retry-After of hours would stall the batch
            )
            kw: dict[str, Any] = {}
            try:
                import certifi

                kw["ca_certs"] = certifi.where()  # the system store may be absent in a slim image
            except ImportError:
                pass
            pool = urllib3.PoolManager(
                maxsize=_POOL_SIZE,
                retries=retry,
                timeout=urllib3.Timeout(connect=opts.timeout, read=opts.timeout),
                # Photos are compressed already; an identity body also keeps max_bytes a bound on
                # what is decoded (no gzip bomb).
                headers={"Accept-Encoding": "identity", "User-Agent": "reasonrec-images"},
                **kw,
            )
            _pools[opts] = pool
    return pool


def fetch_http(url: str, max_bytes: int, opts: HttpOptions) -> bytes:
    """GET ``url``; raises :class:`ImageFailure`. The body is refused from its Content-Length
    when that exceeds ``max_bytes``, and otherwise read in pieces that stop once past it, so a
    huge or endless body costs at most ``max_bytes`` + 1 bytes; reading it may take at most
    ``opts.timeout`` seconds (each piece is bounded by the socket timeout besides)."""
    import urllib3

    try:
        r = _http_pool(opts).request("GET", url, preload_content=False)
    except urllib3.exceptions.LocationValueError as exc:
        raise ImageFailure("fetch_error", f"bad URL: {exc}") from None
    except urllib3.exceptions.HTTPError as exc:  # refused, timed out, TLS, too many redirects
        cause = getattr(exc, "reason", None) or exc
        raise ImageFailure("fetch_error", f"{type(cause).__name__}: {cause}") from None
    done = False
    try:
        if r.status in _MISSING_STATUS:
            raise ImageFailure("missing", f"HTTP {r.status}")
        if not 200 <= r.status < 300:
            raise ImageFailure("fetch_error", f"HTTP {r.status}")
        length = (r.headers.get("Content-Length") or "").strip()
        if length.isdigit() and int(length) > max_bytes:
            raise ImageFailure("too_large", f"Content-Length {length} > {max_bytes}")
        deadline = time.monotonic() + opts.timeout
        buf = bytearray()
        while len(buf) <= max_bytes:
            piece = r.read(min(1 << 16, max_bytes + 1 - len(buf)))
            if not piece:
                done = True
                break
            buf += piece
            if time.monotonic() > deadline:
                raise ImageFailure("fetch_error", f"body not read within {opts.timeout} s")
        if not done:
            raise ImageFailure("too_large", f"body over {max_bytes} bytes (reading stopped)")
        return bytes(buf)
    except urllib3.exceptions.HTTPError as exc:  # timed out or cut while reading the body
        raise ImageFailure("fetch_error", f"{type(exc).__name__}: {exc}") from None
    finally:
        if not done:
            r.close()  # an unread body is not drained: the connection is dropped instead
        r.release_conn()


# ----------------------------------------------------------------------------------- decode
def _sniff_unsupported(data: bytes) -> bool:
    head = data[:64].lstrip()
    return head.startswith(_UNSUPPORTED_MAGIC) or (data[4:8] == b"ftyp" and data[8:12] in _UNSUPPORTED_FTYP)


def process(data: bytes, spec: ImageSpec) -> bytes:
    """Validate ``data`` and return it resized to ``spec`` and re-encoded; raises :class:`ImageFailure`."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageFailure("corrupt", "empty file")
    if len(data) > spec.max_bytes:
        raise ImageFailure("too_large", f"{len(data)} bytes > {spec.max_bytes}")
    if _sniff_unsupported(data):
        raise ImageFailure("unsupported", "svg/pdf/heic/avif")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))  # reads the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageFailure("too_large", str(exc)) from None
        except UnidentifiedImageError:
            raise ImageFailure("corrupt", "not an image PIL can identify") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise _decode_failure(exc) from None
        w, h = im.size
        if w <= 0 or h <= 0:
            raise ImageFailure("corrupt", f"size {w}x{h}")
        if w * h > spec.max_pixels:  # before a single pixel is decoded
            raise ImageFailure("too_large", f"{w}x{h} > {spec.max_pixels} pixels")
        if im.format not in FORMATS:
            raise ImageFailure("unsupported", f"format {im.format}")
        try:
            if im.format in ("JPEG", "MPO"):
                im.draft("RGB", (spec.size, spec.size))  # DCT scaling: big JPEGs decode at 1/2..1/8
            im.seek(0)
            im.load()
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
            im = ImageOps.pad(im, (spec.size, spec.size), method=Image.Resampling.BICUBIC, color=(255, 255, 255))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageFailure("too_large", str(exc)) from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as exc:
            raise _decode_failure(exc) from None
    out = io.BytesIO()
    if spec.format == "png":
        im.save(out, format="PNG", optimize=False)
    else:
        im.save(out, format="JPEG", quality=spec.quality)
    return out.getvalue()


def _decode_failure(exc: BaseException) -> ImageFailure:
    text = str(exc)
    low = text.lower()
    if "truncated" in low or isinstance(exc, EOFError) or "premature end" in low or "unexpected end" in low:
        return ImageFailure("truncated", text)
    if isinstance(exc, MemoryError):
        return ImageFailure("too_large", "out of memory while decoding")
    if "decoder" in low and "not available" in low:
        return ImageFailure("unsupported", text)
    return ImageFailure("corrupt", f"{type(exc).__name__}: {text}")


def _to_rgb(im):
    """RGB, transparent areas on white (a transparent PNG would otherwise turn black)."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    return im.convert("RGB")


# ------------------------------------------------------------------------------------ batch
def load_photo(
    image: bytes | None, uri: str | None, spec: ImageSpec, storage: StorageConfig | None = None
) -> tuple[bytes | None, str]:
    """One item: ``(bytes, "ok")`` or ``(None, reason)``. Embedded bytes first; when they fail
    and the item also has a URI, the URI is tried and the first failure's reason is kept."""
    first: str | None = None
    for kind, ref in (("bytes", image), ("uri", uri)):
        if not ref:
            continue
        try:
            data = ref if kind == "bytes" else fetch(ref, storage, spec.max_bytes, spec.http)
            return process(data, spec), "ok"
        except ImageFailure as exc:
            first = first or exc.reason
        except Exception as exc:  # a decoder bug must not fail the batch (and the stage)
            log.warning("images: unexpected %s on %s", type(exc).__name__, "embedded bytes" if kind == "bytes" else ref)
            first = first or "corrupt"
    return None, first or "no_image"


def _column(batch: pa.Table, name: str, n: int) -> list:
    return batch.column(name).to_pylist() if name in batch.column_names else [None] * n


def process_batch(batch: pa.Table, spec: ImageSpec, storage: StorageConfig | None = None) -> pa.Table:
    """Prepared items (``item_id`` plus ``image`` and/or ``image_uri``) -> :data:`ITEM_IMAGES` rows,
    in the batch's order. Photos are fetched and decoded by ``spec.threads`` threads (I/O waits
    and PIL's decoders release the GIL)."""
    from PIL import Image

    n = batch.num_rows
    ids = batch.column("item_id").to_pylist()
    images, uris = _column(batch, "image", n), _column(batch, "image_uri", n)
    guard = Image.MAX_IMAGE_PIXELS
    # PIL's own guard as a backstop: warns above this, refuses above twice this.
    Image.MAX_IMAGE_PIXELS = spec.max_pixels
    try:
        if spec.threads > 1 and n > 1:
            with ThreadPoolExecutor(min(spec.threads, n)) as pool:
                results = list(pool.map(lambda r: load_photo(r[0], r[1], spec, storage), zip(images, uris)))
        else:
            results = [load_photo(b, u, spec, storage) for b, u in zip(images, uris)]
    finally:
        Image.MAX_IMAGE_PIXELS = guard
    return pa.table(
        {
            "item_id": pa.array(ids, pa.int64()),
            "image": pa.array([r[0] for r in results], pa.binary()),
            "image_status": pa.array([r[1] for r in results], pa.string()),
        },
        schema=ITEM_IMAGES,
    )


def count_statuses(statuses: Iterable[pa.Array | pa.ChunkedArray]) -> dict[str, int]:
    """Rows per status over several status columns (streamed batches), every status listed."""
    out = dict.fromkeys(STATUSES, 0)
    for col in statuses:
        vc = pc.value_counts(col)
        for v, c in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
            out[v] = out.get(v, 0) + int(c)
    return out


# ------------------------------------------------------------------------------------ readers
def images_stage_current(store: ArtifactStore) -> bool:
    """True when the ``images`` stage is committed and was made from the committed ``prepare``
    output (a later re-run of prepare renumbers items, so older photos must not be used)."""
    m = store.manifest(STAGE)
    if m is None:
        return False
    p = store.manifest("prepare")
    if p is None or m.inputs.get("prepare") != p.fingerprint:
        log.warning(
            "images: the committed images stage predates the committed prepare output; "
            "using prepare's embedded photos (re-run `python -m ray_jobs.images`)"
        )
        return False
    return True


def item_photos(store: ArtifactStore, item_ids: Any = None) -> pa.Table:
    """``(item_id, image)`` for the run's items (only ``item_ids`` when given): the images stage's
    resized photos (null for a failed one) when it is current, else prepare's embedded bytes."""
    import pyarrow.dataset as pads

    stage, name = (STAGE, TABLE) if images_stage_current(store) else ("prepare", "items")
    store.require(stage)
    ds = pads.dataset(store.path(stage, name), filesystem=store.arrow_fs, format="parquet")
    # Filtered while reading: only the photos asked for are ever held in memory.
    where = None if item_ids is None else pads.field("item_id").isin(pa.array(item_ids, pa.int64()))
    return ds.to_table(columns=["item_id", "image"], filter=where)


def photo_inputs(store: ArtifactStore) -> dict[str, str]:
    """For a downstream stage's ``inputs``: ``{"images": fingerprint}`` when the photo readers use
    the images stage, ``{}`` when they use prepare's bytes (already covered by the ``prepare``
    input), so runs made before the images stage keep their manifests valid."""
    return {STAGE: store.manifest(STAGE).fingerprint} if images_stage_current(store) else {}
