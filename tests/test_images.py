"""Item photos: classification by reason, resizing, the ``images`` stage on local disk and on
S3 (moto on loopback), and the photo readers (catalog, fine-tune data) with and without it.

Photos are generated tiny JPEG/PNG files in the H&M Kaggle layout
(``images/<first 3 digits>/<article_id>.jpg``), including a missing, a corrupt, a truncated one
and a decompression bomb (a PNG header claiming 100000 x 100000 pixels in a few dozen bytes)."""

from __future__ import annotations

import collections
import contextlib
import http.server
import io
import json
import socket
import struct
import threading
import zlib
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from reasonrec.config import CONFIG_DIR, load_config
from reasonrec.data import images as I
from reasonrec.data import schemas
from reasonrec.io import ArtifactStore, open_store

SIZE = 32


def jpeg(w: int = 60, h: int = 90, color=(200, 30, 30)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (w, h), color).save(b, "JPEG")
    return b.getvalue()


def png(w: int = 40, h: int = 20) -> bytes:
    b = io.BytesIO()
    Image.new("RGBA", (w, h), (0, 0, 255, 100)).save(b, "PNG")
    return b.getvalue()


def bomb(w: int = 100_000, h: int = 100_000) -> bytes:
    """A valid PNG signature and header claiming w x h pixels: ~60 bytes on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


# article -> (bytes on disk or None for no file, expected status)
PHOTOS = {
    "0108775015": (jpeg(), "ok"),
    "0110065001": (png(), "ok"),  # a PNG under the layout's .jpg name
    "0120000001": (b"<html>404 not found</html>", "corrupt"),
    "0130000001": (jpeg(200, 200)[:300], "truncated"),
    "0140000001": (bomb(), "too_large"),
    "0150000001": (bomb(9000, 9000), "too_large"),  # under PIL's default guard, over max_pixels
    "0160000001": (None, "missing"),  # named by image_uri, no file
}


def hm_layout(root: Path) -> dict[str, str]:
    """Photos in the H&M layout; returns article -> photo location (also for the missing one)."""
    uris = {}
    for art, (data, _) in PHOTOS.items():
        path = root / "images" / art[:3] / f"{art}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is not None:
            path.write_bytes(data)
        uris[art] = str(path)
    return uris


def items_table(uris: dict[str, str]) -> tuple[pa.Table, dict[int, str]]:
    """A prepare ``items`` table: the H&M photos by URI, one embedded photo, one item without."""
    keys = list(uris) + ["embedded", "textonly", "remote"]
    n = len(keys)
    image = [None] * len(uris) + [png(50, 50), None, None]
    uri = list(uris.values()) + [None, None, "https://example.invalid/x.jpg"]
    expected = [PHOTOS[k][1] for k in uris] + ["ok", "no_image", "unsupported"]
    t = schemas.conform(
        pa.table(
            {
                "item_id": pa.array(range(n), pa.int64()),
                "item_key": keys,
                "title": [f"item {k}" for k in keys],
                "image": pa.array(image, pa.binary()),
                "image_uri": uri,
                "domain": ["hm"] * n,
            }
        ),
        schemas.ITEMS,
    )
    return t, dict(enumerate(expected))


def check_output(out: pa.Table, expected: dict[int, str], fmt: str = "JPEG"):
    got = dict(zip(out.column("item_id").to_pylist(), out.column("image_status").to_pylist()))
    assert got == expected
    for iid, data in zip(out.column("item_id").to_pylist(), out.column("image").to_pylist()):
        if expected[iid] == "ok":
            im = Image.open(io.BytesIO(data))
            assert im.size == (SIZE, SIZE) and im.format == fmt and im.mode == "RGB"
        else:
            assert data is None


# ------------------------------------------------------------------------------ library
def test_process_batch_classifies_and_resizes(tmp_path):
    uris = hm_layout(tmp_path / "hm")
    items, expected = items_table(uris)
    spec = I.ImageSpec(size=SIZE, max_pixels=50_000_000, http=None)  # http(s) off: "remote" is unsupported
    out = I.process_batch(items.select(["item_id", "image", "image_uri"]), spec)
    assert out.schema == I.ITEM_IMAGES
    check_output(out, expected)
    counts = I.count_statuses([out.column("image_status")])
    assert counts == {
        "ok": 3,
        "no_image": 1,
        "missing": 1,
        "corrupt": 1,
        "truncated": 1,
        "too_large": 2,
        "unsupported": 1,
        "fetch_error": 0,
    }
    # Padded, not cropped: a tall red photo keeps white bars left and right.
    ok = out.column("image")[0].as_py()
    px = Image.open(io.BytesIO(ok)).convert("RGB")
    assert px.getpixel((0, SIZE // 2))[1] > 200 and px.getpixel((SIZE // 2, SIZE // 2))[1] < 80
    # PNG output, single-threaded: same statuses.
    guard = Image.MAX_IMAGE_PIXELS
    out = I.process_batch(
        items.select(["item_id", "image", "image_uri"]),
        I.ImageSpec(size=SIZE, format="png", threads=1, max_pixels=1_000_000, http=None),
    )
    check_output(out, expected, fmt="PNG")
    assert Image.MAX_IMAGE_PIXELS == guard  # PIL's guard is restored after the batch


def test_too_large_is_refused_before_decoding(monkeypatch):
    from PIL import ImageFile

    calls = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: calls.append(1))
    for data in (bomb(), bomb(9000, 9000), jpeg(400, 400)):
        with pytest.raises(I.ImageFailure) as exc:
            I.process(data, I.ImageSpec(size=SIZE, max_pixels=100_000))
        assert exc.value.reason == "too_large"
    assert calls == []  # no pixel was decoded
    with pytest.raises(I.ImageFailure, match="too_large"):
        I.process(jpeg(), I.ImageSpec(size=SIZE, max_bytes=100))
    with pytest.raises(I.ImageFailure, match="unsupported"):
        I.process(b"<svg xmlns='http://www.w3.org/2000/svg'/>", I.ImageSpec(size=SIZE))
    with pytest.raises(ValueError, match="format"):
        I.ImageSpec(format="gif")


def test_embedded_bytes_first_then_uri(tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(jpeg())
    spec = I.ImageSpec(size=SIZE)
    assert I.load_photo(b"garbage", str(good), spec)[1] == "ok"  # bad bytes, good file
    assert I.load_photo(b"garbage", str(tmp_path / "no.jpg"), spec) == (None, "corrupt")  # first reason kept
    assert I.load_photo(None, None, spec) == (None, "no_image")


# -------------------------------------------------------------------------------- stage
def _prepared(store: ArtifactStore, items: pa.Table) -> None:
    """A committed prepare stage holding ``items`` (and the tables the catalog reads)."""
    n = items.num_rows
    with store.stage_writer("prepare", "h", {"source:hm": "1"}) as w:
        w.write_table("items/part-0.parquet", items)
        w.write_table(
            "loo/part-0.parquet",
            pa.table(
                {
                    "user_id": pa.array([0], pa.int64()),
                    "train_items": pa.array([list(range(n))], pa.list_(pa.int64())),
                    "valid_item": pa.array([0], pa.int64()),
                }
            ),
        )


def _cfg(root: str, *extra: str):
    return load_config(
        CONFIG_DIR / "quickstart.yaml",
        [
            f"output_root={root}",
            "run_name=img",
            f"images.size={SIZE}",
            "images.batch_size=4",
            "ray.shuffle_partitions=2",
            "images.fetch_http=false",  # no network here: the "remote" item stays unsupported
            *extra,
        ],
    )


def _run_stage(cfg, items, expected):
    from ray_jobs import images as stage
    from reasonrec.data.catalog import load_catalog

    store = open_store(cfg)
    _prepared(store, items)
    before = load_catalog(store)
    assert before.images[len(PHOTOS)] is not None and before.images[0] is None  # prepare's embedded bytes only

    s = stage.run(cfg)
    assert s["items"] == items.num_rows and s["size"] == SIZE
    assert s["by_reason"] == {
        "ok": 3,
        "no_image": 1,
        "missing": 1,
        "corrupt": 1,
        "truncated": 1,
        "too_large": 2,
        "unsupported": 1,
        "fetch_error": 0,
    }
    m = store.manifest("images")
    assert m.rows["item_images"] == items.num_rows and m.inputs == {"prepare": store.manifest("prepare").fingerprint}
    assert I.photo_inputs(store) == {"images": m.fingerprint}  # what downstream stages record
    check_output(store.read_table("images", "item_images"), expected)
    assert store.read_json("images", "summary.json")["by_reason"]["too_large"] == 2
    assert stage.run(cfg)["skipped"] is True
    assert "skipped" in stage.format_summary({"skipped": True})

    # Readers: resized photos where ok; a failed photo is no photo (the prompt shows text).
    cat = load_catalog(store)
    assert cat.n_items == items.num_rows
    ok = [i for i, st in expected.items() if st == "ok"]
    assert [i for i in range(cat.n_items) if cat.images[i] is not None] == ok
    assert all(Image.open(io.BytesIO(cat.images[i])).size == (SIZE, SIZE) for i in ok)
    assert [r.has_photo for r in cat.refs([0, 2])] == [True, False]
    sub = I.item_photos(store, [0, 2])
    assert sorted(sub.column("item_id").to_pylist()) == [0, 2]

    # A new prepare output (renumbered items) makes the photos stale: readers fall back to prepare.
    _prepared(store, items.slice(0, 3))
    assert not I.images_stage_current(store) and I.photo_inputs(store) == {}
    assert I.item_photos(store).num_rows == 3
    assert stage.run(cfg).get("skipped") is not True  # prepare changed: the stage re-runs
    assert I.images_stage_current(store)
    return store


def test_stage_local_and_finetune_data(ray_local, tmp_path):
    uris = hm_layout(tmp_path / "hm")
    items, expected = items_table(uris)
    cfg = _cfg(str(tmp_path / "runs"))
    store = open_store(cfg)
    _prepared(store, items)
    ex = pa.table(
        {
            "example_id": pa.array([0, 1], pa.int64()),
            "task": ["sequential"] * 2,
            "split": ["train", "valid"],
            "phase": pa.array([1, 1], pa.int64()),
            "prompt": ["a", "b"],
            "image_items": pa.array([[0, 2], [len(PHOTOS)]], pa.list_(pa.int64())),
            "target": ["x", "y"],
        }
    )
    with store.stage_writer("instructions", "h", {}) as w:
        w.write_table("examples/part-0.parquet", ex)
    try:
        from reasonrec.vlm.train import load_finetune_data
    except ImportError:  # no torch: the catalog checks below still run
        load_finetune_data = None
    if load_finetune_data:
        before = load_finetune_data(store)
        assert before.images[0] is None and before.images[len(PHOTOS)] == items.column("image")[len(PHOTOS)].as_py()

    _run_stage(cfg, items, expected)

    if load_finetune_data:
        _prepared(store, items)  # back to the first prepare output
        from ray_jobs import images as stage

        stage.run(cfg)
        data = load_finetune_data(store)
        assert set(data.images) == {0, 2, len(PHOTOS)}  # only the referenced items' photos
        assert Image.open(io.BytesIO(data.images[0])).size == (SIZE, SIZE)
        assert data.images[2] is None  # corrupt: text only, example kept
        assert data.train.num_rows == 1 and data.valid.num_rows == 1


def test_stage_on_s3(ray_local, s3_bucket, tmp_path):
    import s3fs

    endpoint, bucket = s3_bucket
    local = hm_layout(tmp_path / "hm")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.put(str(tmp_path / "hm") + "/", f"{bucket}/hm/", recursive=True)
    uris = {a: f"{bucket}/hm/" + str(Path(p).relative_to(tmp_path / "hm")) for a, p in local.items()}
    items, expected = items_table(uris)
    store = _run_stage(_cfg(f"{bucket}/runs", f"storage.s3_endpoint_url={endpoint}"), items, expected)
    assert store.url("images").startswith("s3://")


# --------------------------------------------------------------------------- http(s) URLs
class _PhotoServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _PhotoHandler)
        self.hits: collections.Counter = collections.Counter()
        self.sent: dict[str, int] = {}  # bytes an endless body got out before the client left
        self.done = collections.defaultdict(threading.Event)
        self.release = threading.Event()  # lets the "slow" handler finish at teardown


class _PhotoHandler(http.server.BaseHTTPRequestHandler):
    """Photos (and failures) by path; the query string only makes a URL unique."""

    BODIES = {
        "/good.jpg": jpeg(64, 64, (10, 200, 10)),
        "/photo.png": png(),
        "/corrupt.jpg": b"<html>not a photo</html>",
        "/truncated.jpg": jpeg(200, 200)[:300],
    }

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _endless(self, declared: int | None) -> None:
        """A body that never ends (or declares a size far over the cap): sent until the client
        hangs up, with a 1 GiB stop so a client that reads it all fails the test instead of
        hanging it."""
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if declared:
            self.send_header("Content-Length", str(declared))
        self.end_headers()
        piece, sent = b"\xff" * (64 << 10), 0
        try:
            while sent < 1 << 30:
                self.wfile.write(piece)
                sent += len(piece)
        except OSError:
            pass
        finally:
            self.server.sent[self.path] = sent
            self.server.done[self.path].set()

    def do_GET(self):
        srv, path = self.server, self.path.split("?")[0]
        srv.hits[self.path] += 1
        if path in self.BODIES:
            self._send(200, self.BODIES[path])
        elif path == "/endless.jpg":
            self._endless(None)
        elif path == "/declared.jpg":
            self._endless(10**9)
        elif path == "/flaky.jpg":  # busy once, then fine: one retry fetches it
            self._send(503, b"busy") if srv.hits[self.path] == 1 else self._send(200, self.BODIES["/good.jpg"])
        elif path == "/down.jpg":
            self._send(503, b"busy")
        elif path == "/forbidden.jpg":
            self._send(403, b"no")
        elif path == "/slow.jpg":  # answers only at teardown, long after the client gave up
            srv.release.wait(30)
            with contextlib.suppress(OSError):
                self._send(200, self.BODIES["/good.jpg"])
        else:
            self._send(404, b"not found")


@pytest.fixture(scope="module")
def photo_server():
    """A real HTTP server on 127.0.0.1 (no external network): yields it with its base URL."""
    srv = _PhotoServer()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


def _refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/photo.jpg"  # nothing listens there now


def test_http_urls_fetched_and_classified(photo_server):
    base, cap = photo_server.base, 256 << 10
    cases = {
        f"{base}/good.jpg": "ok",
        f"{base}/photo.png": "ok",
        f"{base}/corrupt.jpg": "corrupt",
        f"{base}/truncated.jpg": "truncated",
        f"{base}/gone.jpg": "missing",  # 404
        f"{base}/endless.jpg": "too_large",  # no Content-Length: reading stops past max_bytes
        f"{base}/declared.jpg": "too_large",  # Content-Length over max_bytes: not read at all
        f"{base}/flaky.jpg?a": "ok",  # 503 once, then the retry gets it
        f"{base}/down.jpg": "fetch_error",  # 503 every time: retries used up
        f"{base}/forbidden.jpg": "fetch_error",
        _refused_url(): "fetch_error",
        "ftp://127.0.0.1/x.jpg": "unsupported",
    }
    uris = list(cases)
    batch = pa.table(
        {
            "item_id": pa.array(range(len(uris)), pa.int64()),
            "image": pa.array([None] * len(uris), pa.binary()),
            "image_uri": uris,
        }
    )
    spec = I.ImageSpec(size=SIZE, max_bytes=cap, threads=4, http=I.HttpOptions(timeout=10, retries=1, backoff=0))
    out = I.process_batch(batch, spec)
    got = dict(zip(uris, out.column("image_status").to_pylist()))
    assert got == cases
    assert I.count_statuses([out.column("image_status")]) == {
        "ok": 3,
        "no_image": 0,
        "missing": 1,
        "corrupt": 1,
        "truncated": 1,
        "too_large": 2,
        "unsupported": 1,
        "fetch_error": 3,
    }
    good = Image.open(io.BytesIO(out.column("image")[0].as_py()))
    assert good.size == (SIZE, SIZE) and good.getpixel((SIZE // 2, SIZE // 2))[1] > 150  # the served green
    assert photo_server.hits["/flaky.jpg?a"] == 2 and photo_server.hits["/down.jpg"] == 2  # 1 retry each
    assert photo_server.hits["/gone.jpg"] == 1 and photo_server.hits["/forbidden.jpg"] == 1  # not retried
    # The huge bodies were not downloaded: the server saw the client hang up after at most the
    # cap plus what the loopback socket buffers hold, not the 1 GiB it would have sent.
    for path in ("/endless.jpg", "/declared.jpg"):
        assert photo_server.done[path].wait(30)
        assert photo_server.sent[path] < 32 << 20
    with pytest.raises(I.ImageFailure, match="Content-Length"):  # refused before reading the body
        I.fetch_http(f"{base}/declared.jpg?b", cap, I.HttpOptions(timeout=10, retries=0))


def test_http_timeout_and_switch(photo_server):
    url = f"{photo_server.base}/slow.jpg"
    with pytest.raises(I.ImageFailure) as exc:
        I.fetch(url, max_bytes=1 << 20, http=I.HttpOptions(timeout=0.3, retries=0))
    assert exc.value.reason == "fetch_error" and "Timeout" in str(exc.value)
    assert photo_server.hits["/slow.jpg"] == 1  # retries=0: one try
    # images.fetch_http=false: http(s) URLs are not fetched at all (a cluster without internet).
    before = sum(photo_server.hits.values())
    assert I.load_photo(None, f"{photo_server.base}/good.jpg", I.ImageSpec(size=SIZE, http=None)) == (
        None,
        "unsupported",
    )
    assert sum(photo_server.hits.values()) == before
    cfg = load_config(CONFIG_DIR / "quickstart.yaml", ["images.fetch_http=false"])
    assert I.spec_of(cfg).http is None and I.spec_of(load_config(CONFIG_DIR / "quickstart.yaml")).http is not None


# ----------------------------------------------------- photos of items without a metadata row
# key -> (photo file name or None, photo bytes, colour). Every reader layout below: item 1 has a
# metadata row and a photo, item 2 a metadata row and no photo file, items 3-5 no metadata row
# but a photo (JPEG, PNG, corrupt), item 6 neither (a stub in prepare), item 9 a photo but no
# interaction (not added to the catalog).
RED, GREEN, BLUE, GREY = (220, 20, 20), (20, 200, 20), (20, 20, 220), (128, 128, 128)


def _solid(color, fmt: str) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (48, 48), color).save(b, fmt)
    return b.getvalue()


def _photos(prefix: str, ext: str = ".jpg") -> dict[str, tuple[str | None, bytes | None, tuple | None]]:
    return {
        f"{prefix}1": (f"{prefix}1{ext}", _solid(RED, "JPEG"), RED),
        f"{prefix}2": (None, None, None),
        f"{prefix}3": (f"{prefix}3{ext}", _solid(GREEN, "JPEG"), GREEN),
        f"{prefix}4": (f"{prefix}4.png", _solid(BLUE, "PNG"), BLUE),
        f"{prefix}5": (f"{prefix}5{ext}", b"<html>gone</html>", None),
        f"{prefix}6": (None, None, None),
        f"{prefix}9": (f"{prefix}9{ext}", _solid(GREY, "JPEG"), GREY),
    }


def _write_photos(folder: Path, photos: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data, _ in photos.values():
        if name:
            (folder / name).write_bytes(data)


def amazon_layout(root: Path, meta: bool = True, image_url: str = "http://127.0.0.1:9/A2.jpg") -> dict:
    """Amazon 2018 layout: reviews and metadata JSON lines, photos ``<asin>.jpg|.png`` in
    ``images/`` (passed as ``images_dir``); A2's photo is only its metadata ``imageURL``."""
    photos = _photos("A")
    root.mkdir(parents=True)
    reviews = [
        {"reviewerID": f"U{u}", "asin": f"A{i}", "overall": 5.0, "unixReviewTime": 1500000000 + 100 * u + i}
        for u in range(4)
        for i in (1, 2, 3, 4, 5, 6)
    ]
    (root / "reviews_Test.json").write_text("".join(json.dumps(r) + "\n" for r in reviews))
    if meta:
        rows = [{"asin": "A1", "title": "Red shampoo"}, {"asin": "A2", "title": "Hair oil", "imageURL": [image_url]}]
        (root / "meta_Test.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _write_photos(root / "images", photos)
    return photos


def pixelrec_layout(root: Path, meta: bool = True) -> dict:
    """PixelRec layout: interaction and item-info CSVs in their folders, covers in ``cover/``
    (the reader's default folder)."""
    photos = _photos("i")
    (root / "pixelrec_interaction").mkdir(parents=True)
    lines = ["user_id,item_id,timestamp"]
    lines += [f"u{u},i{i},{1640000000 + 100 * u + i}" for u in range(4) for i in (1, 2, 3, 4, 5, 6)]
    (root / "pixelrec_interaction" / "Pixel200K.csv").write_text("\n".join(lines) + "\n")
    if meta:
        (root / "pixelrec_iteminfo").mkdir()
        (root / "pixelrec_iteminfo" / "item_info.csv").write_text(
            "item_id,title,tag\ni1,Red cat video,Pets\ni2,Cooking,Food\n"
        )
    _write_photos(root / "cover", photos)
    return photos


def _source(kind: str, root: Path, storage=None):
    from reasonrec.config import SourceConfig
    from reasonrec.data.sources import get_source

    images = {"images_dir": str(root / "images")} if kind == "amazon" else {}
    return get_source(SourceConfig(kind=kind, path=str(root), domain=kind, **images), storage)


@pytest.mark.parametrize("meta", [True, False], ids=["with-metadata", "no-metadata-file"])
@pytest.mark.parametrize("kind", ["amazon", "pixelrec"])
def test_readers_give_photos_to_items_without_metadata(tmp_path, kind, meta):
    import pickle

    from reasonrec.data.sources import read_all_items

    root = tmp_path / kind
    photos = (amazon_layout if kind == "amazon" else pixelrec_layout)(root, meta)
    folder = root / ("images" if kind == "amazon" else "cover")
    src = pickle.loads(pickle.dumps(_source(kind, root)))  # as a Ray worker gets it
    items = read_all_items(src)
    assert items.schema == schemas.RAW_ITEMS and all(e is None for e in items.column("error").to_pylist())
    rows = {r["item_key"]: r for r in items.to_pylist()}
    p = kind[0].upper() if kind == "amazon" else "i"
    described = {f"{p}1", f"{p}2"} if meta else set()
    # Interacted and a photo, or a metadata row: a row. Neither (6), or no interaction (9): none.
    assert set(rows) == described | {f"{p}1", f"{p}3", f"{p}4", f"{p}5"}
    for k in (f"{p}3", f"{p}4", f"{p}5"):  # photo-only rows: key and the photo's location
        assert rows[k]["title"] is None and rows[k]["image_uri"] == str(folder / photos[k][0])
    assert rows[f"{p}1"]["image_uri"] == str(folder / photos[f"{p}1"][0])
    assert (rows[f"{p}1"]["title"] is not None) == meta

    # The images stage's row logic on them: the photos decode; the corrupt one falls back to text.
    t = schemas.conform(items.append_column("item_id", pa.array(range(items.num_rows), pa.int64())), schemas.ITEMS)
    out = I.process_batch(t.select(["item_id", "image", "image_uri"]), I.ImageSpec(size=SIZE, http=None))
    status = dict(zip(items.column("item_key").to_pylist(), out.column("image_status").to_pylist()))
    expected = {f"{p}1": "ok", f"{p}3": "ok", f"{p}4": "ok", f"{p}5": "corrupt"}
    if meta:  # A2: its metadata URL (http, switched off here); i2: no photo at all
        expected[f"{p}2"] = "unsupported" if kind == "amazon" else "no_image"
    assert status == expected


def test_pixelrec_photo_only_items_on_s3(s3_bucket, tmp_path):
    import s3fs

    from reasonrec.config import SourceConfig, StorageConfig
    from reasonrec.data.sources import get_source, read_all_items

    endpoint, bucket = s3_bucket
    pixelrec_layout(tmp_path / "px")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.put(str(tmp_path / "px") + "/", f"{bucket}/px/", recursive=True)
    storage = StorageConfig(s3_endpoint_url=endpoint)
    items = read_all_items(get_source(SourceConfig(kind="pixelrec", path=f"{bucket}/px", domain="px"), storage))
    uri = {r["item_key"]: r["image_uri"] for r in items.to_pylist()}
    assert uri == {
        "i1": f"{bucket}/px/cover/i1.jpg",
        "i2": None,
        "i3": f"{bucket}/px/cover/i3.jpg",
        "i4": f"{bucket}/px/cover/i4.png",
        "i5": f"{bucket}/px/cover/i5.jpg",
    }
    t = schemas.conform(items.append_column("item_id", pa.array(range(items.num_rows), pa.int64())), schemas.ITEMS)
    out = I.process_batch(t.select(["item_id", "image", "image_uri"]), I.ImageSpec(size=SIZE), storage)
    assert out.column("image_status").to_pylist() == ["ok", "no_image", "ok", "ok", "corrupt"]


def test_prepare_then_images_photos_reach_the_prompt(ray_local, tmp_path, photo_server):
    """End to end on the H&M, Amazon and PixelRec layouts in one run: interacted items without a
    metadata row still get their photo through prepare (photo-only item rows), the images stage
    resizes it (Amazon's metadata URL fetched over http on loopback), and its pixels arrive in
    the tiny VLM's ``pixel_values`` for a prompt rendered from the run's catalog."""
    from ray_jobs import images as stage
    from ray_jobs import prepare

    hm = tmp_path / "hm"
    hm_layout(hm)
    arts = list(PHOTOS)
    lines = ["t_dat,customer_id,article_id,price,sales_channel_id"]
    for u in range(4):
        for d, a in enumerate(arts):
            lines.append(f"2018-09-{10 + d + u:02d},cust{u},{a},0.0{d + 1},1")
    (hm / "transactions_train.csv").write_text("\n".join(lines) + "\n")
    (hm / "articles.csv").write_text("article_id,prod_name,index_name\n0108775015,Strap top,Ladieswear\n")
    amz, px = tmp_path / "amazon", tmp_path / "pixelrec"
    amz_photos = amazon_layout(amz, image_url=f"{photo_server.base}/good.jpg")
    px_photos = pixelrec_layout(px)
    sources = (
        f"{{kind: hm, domain: hm, path: '{hm}'}}, "
        f"{{kind: amazon, domain: amazon, path: '{amz}', images_dir: '{amz / 'images'}'}}, "
        f"{{kind: pixelrec, domain: pixelrec, path: '{px}'}}"
    )
    cfg = _cfg(str(tmp_path / "runs"), f"data.sources=[{sources}]", "images.fetch_http=true")
    summary = prepare.run(cfg)
    assert summary["stub_items"] == 3  # H&M's article without a file, A6 and i6: no row, no photo
    store = open_store(cfg)
    items = store.read_table("prepare", "items").to_pylist()
    row = {(r["domain"], r["item_key"]): r for r in items}
    assert all(row["hm", a]["image_uri"] for a in arts if PHOTOS[a][0] is not None)
    assert row["hm", "0160000001"]["image_uri"] is None
    for dom, folder, photos in (("amazon", amz / "images", amz_photos), ("pixelrec", px / "cover", px_photos)):
        p = "A" if dom == "amazon" else "i"
        assert {k for d, k in row if d == dom} == {f"{p}{i}" for i in range(1, 7)}  # 6: a stub, 9: absent
        for i in (3, 4, 5):  # no metadata row, a photo
            assert row[dom, f"{p}{i}"]["image_uri"] == str(folder / photos[f"{p}{i}"][0])
        assert row[dom, f"{p}6"]["image_uri"] is None

    s = stage.run(cfg)
    img = store.read_table("images", "item_images")
    status = dict(zip(img.column("item_id").to_pylist(), img.column("image_status").to_pylist()))
    got = {k: status[r["item_id"]] for k, r in row.items() if k[0] != "hm"}
    for p, dom in (("A", "amazon"), ("i", "pixelrec")):
        assert got[dom, f"{p}1"] == got[dom, f"{p}3"] == got[dom, f"{p}4"] == "ok"
        assert got[dom, f"{p}5"] == "corrupt" and got[dom, f"{p}6"] == "no_image"
    assert got["amazon", "A2"] == "ok" and got["pixelrec", "i2"] == "no_image"  # A2 over http
    assert s["by_reason"] == {
        "ok": 2 + 4 + 3,
        "no_image": 1 + 1 + 2,
        "missing": 0,
        "corrupt": 1 + 1 + 1,
        "truncated": 1,
        "too_large": 2,
        "unsupported": 0,
        "fetch_error": 0,
    }

    # The pixels reach the VLM: a user's prompt from the run's catalog shows the photo-only items'
    # photos, and the tiny VLM's pixel_values hold their colours (failed photos are text only).
    torch = pytest.importorskip("torch")
    from reasonrec.data.catalog import load_context
    from reasonrec.vlm.builder import build_vlm
    from reasonrec.vlm.collate import VLMCollator
    from reasonrec.vlm.config import VLMConfig

    vlm = VLMConfig(
        model="tiny",
        image_size=SIZE,
        patch_size=8,
        vision_hidden_size=32,
        vision_layers=1,
        vision_heads=2,
        image_tokens_per_item=4,
        max_length=1024,
        max_history_photos=6,
    )
    _, users, prompts = load_context(store, vlm, cfg.data.eh_thresholds)
    bundle = build_vlm(vlm, lora=False)
    collate = VLMCollator(bundle)
    proc = bundle.image_processor
    mean, std = torch.tensor(proc.image_mean).view(3, 1, 1), torch.tensor(proc.image_std).view(3, 1, 1)
    uid = {(r["domain"], r["user_key"]): r["user_id"] for r in store.read_table("prepare", "users").to_pylist()}
    h = SIZE // 2
    for dom, user_key, shown, colors in (
        # The test-split history is every item but the last (the test item: i6 / 0160000001).
        ("pixelrec", "u0", ["i1", "i3", "i4"], (RED, GREEN, BLUE)),  # i2: no photo, i5: corrupt
        # 0108775015: a metadata row; 0110065001: photo-only (its semi-transparent blue PNG on white).
        ("hm", "cust0", ["0108775015", "0110065001"], ((200, 30, 30), (155, 155, 255))),
    ):
        rendered = prompts.render("sequential", users.resolve(uid[dom, user_key]), key=0)
        assert rendered["image_items"] == [row[dom, k]["item_id"] for k in shown]
        batch = collate.encode_prompts([prompts.example(rendered)])
        pv = batch["pixel_values"]
        assert pv.shape == (len(shown), 3, SIZE, SIZE)
        assert int((batch["input_ids"] == bundle.image_token_id).sum()) == len(shown) * bundle.tokens_per_image
        for pixels, color in zip(pv, colors):  # the centre (padding bars lie at the edges)
            rgb = (pixels.float() * std + mean)[:, h - 4 : h + 4, h - 4 : h + 4].mean(dim=(1, 2)) * 255
            assert torch.allclose(rgb, torch.tensor(color, dtype=torch.float32), atol=12), (dom, rgb, color)
