"""Item photos: classification by reason, resizing, the ``images`` stage on local disk and on
S3 (moto on loopback), and the photo readers (catalog, fine-tune data) with and without it.

Photos are generated tiny JPEG/PNG files in the H&M Kaggle layout
(``images/<first 3 digits>/<article_id>.jpg``), including a missing, a corrupt, a truncated one
and a decompression bomb (a PNG header claiming 100000 x 100000 pixels in a few dozen bytes)."""

from __future__ import annotations

import io
import struct
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
    spec = I.ImageSpec(size=SIZE, max_pixels=50_000_000)
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
        I.ImageSpec(size=SIZE, format="png", threads=1, max_pixels=1_000_000),
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


def test_hm_prepare_then_images(ray_local, tmp_path):
    """End to end on the H&M layout: bought articles without an articles.csv row still get their
    photo through prepare (photo-only item rows) and the images stage resizes it."""
    from ray_jobs import images as stage
    from ray_jobs import prepare

    root = tmp_path / "hm"
    hm_layout(root)
    arts = list(PHOTOS)
    lines = ["t_dat,customer_id,article_id,price,sales_channel_id"]
    for u in range(4):
        for d, a in enumerate(arts):
            lines.append(f"2018-09-{10 + d + u:02d},cust{u},{a},0.0{d + 1},1")
    (root / "transactions_train.csv").write_text("\n".join(lines) + "\n")
    (root / "articles.csv").write_text("article_id,prod_name,index_name\n0108775015,Strap top,Ladieswear\n")
    cfg = _cfg(str(tmp_path / "runs"), f"data.sources=[{{kind: hm, domain: hm, path: '{root}'}}]")
    summary = prepare.run(cfg)
    assert summary["stub_items"] == 1  # only the article whose file is missing
    store = open_store(cfg)
    it = store.read_table("prepare", "items").to_pylist()
    by_key = {r["item_key"]: r for r in it}
    assert all(by_key[a]["image_uri"] for a in arts if PHOTOS[a][0] is not None)
    assert by_key["0160000001"]["image_uri"] is None
    s = stage.run(cfg)
    assert s["by_reason"]["ok"] == 2 and s["by_reason"]["too_large"] == 2
    assert s["by_reason"]["corrupt"] == 1 and s["by_reason"]["truncated"] == 1 and s["by_reason"]["no_image"] == 1
