"""Source readers on hand-made fixtures in each format's exact layout, the real Beauty bundle,
and one read through the S3 API (moto on loopback)."""

from __future__ import annotations

import gzip
import json
import os
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from reasonrec.config import SourceConfig, StorageConfig
from reasonrec.data.schemas import RAW_INTERACTIONS, RAW_ITEMS, RAW_USERS
from reasonrec.data.sources import get_source, read_all_interactions, read_all_items
from reasonrec.data.sources._common import csv_chunk, csv_records, line_chunks, price, read_chunk
from reasonrec.data.sources.p5 import BEAUTY_TOP, split_attributes, top_categories

# The real Beauty P5 bundle, where the machine has it: $REASONREC_BEAUTY, else the Beauty preset's
# default path (data/amazon_beauty under the working directory); the test skips without it.
BEAUTY = os.environ.get("REASONREC_BEAUTY", "data/amazon_beauty")
JPEG = b"\xff\xd8\xff\xe0fake-jpeg"
PNG = b"\x89PNG\r\n\x1a\nfake-png"


def src(kind: str, path, storage: StorageConfig | None = None, **kw):
    return get_source(SourceConfig(kind=kind, path=str(path), domain=kind + "-dom", **kw), storage)


def by_key(t: pa.Table, col: str) -> dict:
    return {r[col]: r for r in t.to_pylist() if r[col] is not None}


def errors(t: pa.Table) -> list[str]:
    return [e for e in t.column("error").to_pylist() if e is not None]


def check_schema(items: pa.Table | None, inter: pa.Table | None, domain: str):
    for t, schema in ((items, RAW_ITEMS), (inter, RAW_INTERACTIONS)):
        if t is not None:
            assert t.schema == schema
            assert set(t.column("domain").to_pylist()) <= {domain}


# ------------------------------------------------------------------------------ shared plumbing
def test_byte_chunks_cover_every_line_once(tmp_path):
    lines = [f"line-{i}-" + "x" * (i % 17) for i in range(500)]
    p = tmp_path / "f.txt"
    p.write_bytes(("\r\n".join(lines)).encode())  # CRLF and no final newline
    from fsspec.implementations.local import LocalFileSystem

    fs = LocalFileSystem()
    for shard_bytes in (7, 100, 1 << 20):
        chunks = line_chunks(fs, str(p), shard_bytes=shard_bytes)
        got = [line.decode() for c in chunks for _, line in read_chunk(fs, c)]
        assert got == lines
    # The header is left out; offsets increase in file order.
    chunks = line_chunks(fs, str(p), skip_header=True, shard_bytes=50)
    got = [(o, line.decode()) for c in chunks for o, line in read_chunk(fs, c)]
    assert [g[1] for g in got] == lines[1:]
    assert [g[0] for g in got] == sorted(g[0] for g in got)


def test_gzip_line_chunks_cover_every_line_once(tmp_path):
    lines = [json.dumps({"i": i, "pad": "abcdefghij" * 5}) for i in range(6_000)]  # ~400 KB unpacked
    p = tmp_path / "f.json.gz"
    with gzip.open(p, "wt") as f:
        f.write("\n".join(lines) + "\n")
    from fsspec.implementations.local import LocalFileSystem

    fs = LocalFileSystem()
    # Line ranges estimated from a 64 KB sample; the last one is open-ended.
    chunks = line_chunks(fs, str(p), shard_bytes=64 << 10, gz_sample=64 << 10)
    assert len(chunks) >= 4 and chunks[-1].end is None
    got = [line.decode() for c in chunks for _, line in read_chunk(fs, c)]
    assert got == lines
    # With a header, it is skipped; a small file is one chunk.
    chunks = line_chunks(fs, str(p), skip_header=True)
    assert len(chunks) == 1 and [x.decode() for _, x in read_chunk(fs, chunks[0])] == lines[1:]


def test_csv_chunk_reports_bad_lines(tmp_path):
    from fsspec.implementations.local import LocalFileSystem

    fs = LocalFileSystem()
    p = tmp_path / "t.csv"
    p.write_bytes(b'a,b\n1,x\n2\n4,"y, z"\n 5 , \n')
    (chunk,) = line_chunks(fs, str(p), skip_header=True)
    t, bad = csv_chunk(fs, chunk, ["a", "b"])
    assert t.to_pylist() == [{"a": "1", "b": "x"}, {"a": "4", "b": "y, z"}, {"a": "5", "b": None}]
    assert bad == ["malformed csv: expected 2 fields, got 1"]
    # Invalid UTF-8 makes Arrow refuse the chunk; the line-by-line fallback blames that line only.
    p.write_bytes(b'a\tb\n1\t"x\n2\t\xff\xfe\n3\n')
    (chunk,) = line_chunks(fs, str(p), skip_header=True)
    t, bad = csv_chunk(fs, chunk, ["a", "b"], delimiter="\t", quoting=False)
    assert t.to_pylist() == [{"a": "1", "b": '"x'}]
    assert len(bad) == 2 and bad[0].startswith("malformed csv: 'utf-8' codec") and bad[1].endswith("got 1")


def test_csv_records_keep_quoted_newlines_and_report_bad_rows():
    import csv
    import io

    huge = "x" * (csv.field_size_limit() + 1)  # the csv module refuses it: one error, then go on
    data = (
        "\ufeffID, Title ,Desc\n"
        'i1,Cat,"line one\nline two"\n'
        "\n"  # blank: skipped
        "i2,Dog\n"  # a field short
        f'i3,Big,"{huge}"\n'
        "i4, ,last\n"
    ).encode()
    rows = [
        (get and {c: get(c) for c in ("id", "title", "desc", "missing")}, err)
        for get, err in csv_records(io.BytesIO(data), lower_header=True)
    ]
    assert rows[0] == ({"id": "i1", "title": "Cat", "desc": "line one\nline two", "missing": None}, None)
    assert rows[1] == (None, "malformed csv: expected 3 fields, got 2")
    assert rows[2][0] is None and rows[2][1].startswith("malformed csv: field larger than field limit")
    assert rows[3] == ({"id": "i4", "title": None, "desc": "last", "missing": None}, None)
    assert len(rows) == 4
    # Without lower_header the names are only stripped (the BOM is dropped either way).
    ((get, err), *_) = csv_records(io.BytesIO(data))
    assert err is None and get("ID") == "i1" and get("id") is None


@pytest.mark.parametrize(
    "raw,expected",
    [
        (12.5, 12.5),
        (3, 3.0),
        ("$12.99", 12.99),
        ("$1,299.00", 1299.0),
        ("$5.00 - $15.00", 10.0),
        ("", None),
        (None, None),
        (".a-box-inner{background-color:#fff}", None),
        ("call for price", None),
        (float("nan"), None),
    ],
)
def test_price_parsing(raw, expected):
    assert price(raw) == (pytest.approx(expected) if expected is not None else None)


# ------------------------------------------------------------------------------------------ p5
def test_p5_brand_rule():
    top = frozenset(BEAUTY_TOP)
    assert split_attributes(["OPI", "Makeup", "Nails"], top) == ("OPI", ["Makeup", "Nails"])
    assert split_attributes(["Makeup", "Face"], top) == (None, ["Makeup", "Face"])
    assert split_attributes(["Unknown", "Skin Care"], top) == (None, ["Skin Care"])
    assert split_attributes(["Skin Care", "Skin Care", "Face"], top) == ("Skin Care", ["Skin Care", "Face"])
    assert split_attributes(["Retinol", "Skin Care"], top) == ("Retinol", ["Skin Care"])
    assert split_attributes(["SomeBrand"], top) == ("SomeBrand", [])
    # Roots are learned from the data: a first name never seen deeper is a brand, its successor a root.
    lists = [["Acme", "Toys", "Puzzles"], ["Toys", "Games"], ["Zed", "Sports", "Balls"], ["Puzzles"]]
    assert top_categories(lists) == {"Toys", "Sports"}


def _write_p5(root: Path):
    root.mkdir()
    (root / "sequential_data.txt").write_text(
        "1 1 2 3\n"
        "2 3 1 9\n"  # item 9 is not in the datamaps: keeps its P5 id
        "3\n"  # a user with no items
        "\n"
        "u-x 2 1 2\n"
    )  # unmapped, non-numeric user id; a repeat of item 2
    (root / "datamaps.json").write_text(
        json.dumps(
            {
                "id2user": {"1": "A1", "2": "A2"},
                "id2item": {"1": "B001", "2": "B002", "3": "B003", "4": "B004"},
            }
        )
    )
    (root / "items.jsonl").write_text(
        "\n".join(
            [
                json.dumps(
                    {
                        "item_id": 1,
                        "asin": "B001",
                        "title_words": "red nail polish",
                        "attributes": ["OPI", "Makeup", "Nails", "Nail Polish"],
                    }
                ),
                json.dumps(
                    {
                        "item_id": 2,
                        "asin": "B002",
                        "title_words": "face cream",
                        "attributes": ["Unknown", "Skin Care", "Face"],
                    }
                ),
                json.dumps(
                    {
                        "item_id": 3,
                        "asin": "B003",
                        "title_words": "shampoo",
                        "attributes": ["L&#39;Oreal Paris", "Hair Care", "Shampoos"],
                    }
                ),
                '{"item_id": 5, "asin": "B005", "title_words": "broken',
                json.dumps({"item_id": 4, "title_words": "unused brush", "attributes": ["", "Tools & Accessories"]}),
            ]
        )
        + "\n"
    )


@pytest.mark.parametrize(
    "kind,needs",
    [
        ("amazon", "review and meta files"),
        ("hm", "transactions_train.csv"),
        ("p5", "sequential_data.txt"),
        ("pixelrec", "CSV files"),
        ("recbole", "<name>.inter"),
    ],
)
def test_folder_sources_need_a_path_and_ship_without_their_caches(kind, needs, tmp_path):
    with pytest.raises(ValueError, match=f"{kind} source needs data.sources\\[\\].path \\(folder with .*{needs}"):
        get_source(SourceConfig(kind=kind, path=None))
    s = src(kind, tmp_path)
    for name in s.lazy:
        setattr(s, name, {"cached": 1})
    shipped = pickle.loads(pickle.dumps(s))  # what a Ray worker receives: caches rebuilt there
    assert all(getattr(shipped, name) is None for name in s.lazy)
    assert shipped.cfg == s.cfg and shipped.loc.path == s.loc.path


def test_p5_fixture(tmp_path):
    root = tmp_path / "p5"
    _write_p5(root)
    s = src("p5", root)
    items, inter = read_all_items(s), read_all_interactions(s)
    check_schema(items, inter, "p5-dom")

    rows = [(r["user_key"], r["item_key"], r["ts"]) for r in inter.to_pylist()]
    assert rows == [
        ("A1", "B001", 0),
        ("A1", "B002", 1),
        ("A1", "B003", 2),
        ("A2", "B003", 0),
        ("A2", "B001", 1),
        ("A2", "9", 2),
        ("3", None, 0),
        ("u-x", "B002", 0),
        ("u-x", "B001", 1),
        ("u-x", "B002", 2),
    ]
    assert errors(inter) == [] and inter.column("rating").null_count == inter.num_rows

    assert items.num_rows == 5
    assert len(errors(items)) == 1 and errors(items)[0].startswith("malformed json")
    it = by_key(items, "item_key")
    assert it["B001"]["brand"] == "OPI" and it["B001"]["categories"] == ["Makeup", "Nails", "Nail Polish"]
    assert it["B001"]["title"] == "red nail polish"
    assert it["B002"]["brand"] is None and it["B002"]["categories"] == ["Skin Care", "Face"]
    assert it["B003"]["brand"] == "L'Oreal Paris"
    # No asin in the line: the key comes from the datamaps; no user has it, it is still an item.
    assert it["B004"]["brand"] is None and it["B004"]["categories"] == ["Tools & Accessories"]

    # Many small shards read exactly what one shard reads; the reader survives pickling (Ray).
    s2 = pickle.loads(pickle.dumps(s))
    s2.shard_bytes = 5
    shards = s2.interaction_shards()
    assert len(shards) > 3
    assert pa.concat_tables([s2.read_interactions(x) for x in shards]).equals(inter)

    fp = s.fingerprint()
    assert fp == s.fingerprint()
    with open(root / "sequential_data.txt", "a") as f:
        f.write("4 1\n")
    assert s.fingerprint() != fp


def test_p5_real_beauty_bundle():
    if not os.path.isdir(BEAUTY):
        pytest.skip(f"no Beauty bundle at {BEAUTY} (set REASONREC_BEAUTY)")
    s = src("p5", BEAUTY)
    s.shard_bytes = 256 << 10  # several shards, as prepare would read them
    shards = s.interaction_shards()
    assert len(shards) >= 4
    inter = pa.concat_tables([s.read_interactions(x) for x in shards])
    items = read_all_items(s)
    assert inter.num_rows == 198_502
    assert pc.count_distinct(inter["user_key"]).as_py() == 22_363
    assert pc.count_distinct(inter["item_key"]).as_py() == 12_101
    assert items.num_rows == 12_101 and pc.count_distinct(items["item_key"]).as_py() == 12_101
    assert errors(inter) == [] and errors(items) == []
    assert set(inter["item_key"].to_pylist()) == set(items["item_key"].to_pylist())
    first = inter.slice(0, 1).to_pylist()[0]
    assert (first["user_key"], first["item_key"], first["ts"]) == ("A1YJEY40YUW4SE", "B004756YJA", 0)
    # Every user has >= 5 interactions (5-core).
    counts = inter.group_by("user_key").aggregate([("item_key", "count")])
    assert pc.min(counts["item_key_count"]).as_py() >= 5
    it = by_key(items, "item_key")
    assert it["B004756YJA"]["brand"] == "OPI"
    assert it["B004756YJA"]["categories"] == ["Makeup", "Nails", "Nail Polish"]
    assert it["B0020YLEYK"]["brand"] is None  # "Unknown"
    brands = set(items["brand"].to_pylist()) - {None}
    assert not brands & BEAUTY_TOP - {"Skin Care"}  # "Skin Care" is a real brand on 2 items
    assert "L'Oreal Paris" in brands
    # Categories always start at a top-level name.
    assert all(c[0] in BEAUTY_TOP for c in items["categories"].to_pylist() if c)


# -------------------------------------------------------------------------------------- amazon
META_2014 = [
    "{'asin': 'B0001', 'title': 'Rose Water &amp; Glycerin', 'price': 7.5, 'imUrl': "
    "'http://ecx.images-amazon.com/images/I/1.jpg', 'categories': [['Beauty', 'Skin Care', 'Face'], "
    "['Beauty', 'Skin Care', 'Body']], 'brand': 'Heritage', 'description': \"It's gentle\"}",
    "{'asin': 'B0002', 'categories': [['Beauty']], 'salesRank': {'Beauty': 10}}",  # no title/price/brand
    "{'asin': 'B0003', 'title': 'broken",  # malformed
]
REVIEWS_2014 = [
    {
        "reviewerID": "U1",
        "asin": "B0001",
        "overall": 5.0,
        "summary": "Great",
        "reviewText": "Love it.",
        "unixReviewTime": 1388534400,
        "reviewTime": "01 1, 2014",
    },
    {
        "reviewerID": "U1",
        "asin": "B0002",
        "overall": 3.0,
        "summary": "Fine!",
        "reviewText": "Okay.",
        "unixReviewTime": 1388620800,
    },
    {"asin": "B0002", "overall": 4.0, "reviewText": "no reviewer", "unixReviewTime": 1388620800},
]


def test_amazon_2014_gzip_python_literal_meta(tmp_path):
    root = tmp_path / "amz"
    root.mkdir()
    with gzip.open(root / "reviews_Beauty_5.json.gz", "wt") as f:
        for r in REVIEWS_2014 + [REVIEWS_2014[0]]:  # a duplicate row is kept (prepare dedups)
            f.write(json.dumps(r) + "\n")
        f.write("not json at all\n")
    with gzip.open(root / "meta_Beauty.json.gz", "wt") as f:
        f.write("\n".join(META_2014) + "\n")
    (root / "README.txt").write_text("ignored")

    s = src("amazon", root)
    items, inter = read_all_items(s), read_all_interactions(s)
    check_schema(items, inter, "amazon-dom")

    assert inter.num_rows == 5
    ok = [r for r in inter.to_pylist() if r["error"] is None]
    assert [(r["user_key"], r["item_key"], r["ts"], r["rating"]) for r in ok] == [
        ("U1", "B0001", 1388534400, 5.0),
        ("U1", "B0002", 1388620800, 3.0),
        (None, "B0002", 1388620800, 4.0),
        ("U1", "B0001", 1388534400, 5.0),
    ]
    assert ok[0]["review"] == "Great. Love it." and ok[1]["review"] == "Fine! Okay."
    assert ok[2]["review"] == "no reviewer"
    bad = [r for r in inter.to_pylist() if r["error"] is not None]
    assert len(bad) == 1 and bad[0]["error"].startswith("malformed json") and bad[0]["user_key"] is None

    assert items.num_rows == 3 and len(errors(items)) == 1
    it = by_key(items, "item_key")
    assert it["B0001"]["title"] == "Rose Water & Glycerin"
    assert it["B0001"]["categories"] == ["Beauty", "Skin Care", "Face", "Body"]
    assert it["B0001"]["price"] == pytest.approx(7.5)
    assert it["B0001"]["brand"] == "Heritage" and it["B0001"]["description"] == "It's gentle"
    assert it["B0001"]["image_uri"] == "http://ecx.images-amazon.com/images/I/1.jpg" and it["B0001"]["image"] is None
    assert it["B0002"]["title"] is None and it["B0002"]["price"] is None and it["B0002"]["categories"] == ["Beauty"]


def test_amazon_2018_json_with_images(tmp_path):
    root = tmp_path / "amz18"
    root.mkdir()
    meta = [
        {
            "asin": "X1",
            "title": "Shampoo",
            "brand": "Acme",
            "category": ["Beauty &amp; Personal Care", "Hair Care"],
            "price": "$12.99",
            "description": ["Line one.", "", "Line two."],
            "imageURL": ["https://img/x1.jpg"],
        },
        {"asin": "X2", "title": "Set", "category": [], "price": "$5.00 - $15.00", "description": "One string"},
        {"asin": "X3", "title": "No image", "price": "", "imageURLHighRes": []},
        {"asin": "X4", "price": ".a-box-inner{background-color:#fff}"},
    ]
    (root / "All_Beauty_meta.json").write_text("\n".join(json.dumps(m) for m in meta) + "\n")
    reviews = [
        {"reviewerID": "R1", "asin": "X1", "overall": 4.0, "reviewText": "Nice", "unixReviewTime": 1500000000},
        {"reviewerID": "R2", "asin": "X2", "overall": "5", "summary": "Five Stars", "reviewTime": "02 3, 2017"},
        {"reviewerID": "R3", "asin": "X3", "overall": "five", "unixReviewTime": 1500000001},
    ]
    (root / "my_reviews.json").write_text("\n".join(json.dumps(r) for r in reviews) + "\n")
    (root / "other.json").write_text("{}\n")  # an unrelated file: reviews_file must be named
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "X1.jpg").write_bytes(JPEG)
    (images / "X2.png").write_bytes(PNG)  # X3, X4: no image

    with pytest.raises(ValueError, match="reviews_file"):
        src("amazon", root).files()
    s = src("amazon", root, reviews_file="my_reviews.json", images_dir=str(images))
    items, inter = read_all_items(s), read_all_interactions(s)
    check_schema(items, inter, "amazon-dom")

    it = by_key(items, "item_key")
    assert it["X1"]["price"] == pytest.approx(12.99) and it["X2"]["price"] == pytest.approx(10.0)
    assert it["X3"]["price"] is None and it["X4"]["price"] is None
    assert it["X1"]["categories"] == ["Beauty & Personal Care", "Hair Care"]
    assert it["X1"]["description"] == "Line one.\nLine two." and it["X2"]["description"] == "One string"
    assert it["X1"]["image"] == JPEG and it["X2"]["image"] == PNG
    assert it["X3"]["image"] is None and it["X4"]["image"] is None
    # images_dir given: the bytes, and the file's location (not the metadata's URL) for the images stage
    assert it["X1"]["image_uri"] == str(images / "X1.jpg") and it["X2"]["image_uri"] == str(images / "X2.png")
    assert it["X3"]["image_uri"] is None and it["X4"]["image_uri"] is None
    assert errors(items) == []

    rows = inter.to_pylist()
    assert rows[0]["ts"] == 1500000000 and rows[0]["rating"] == 4.0 and rows[0]["review"] == "Nice"
    assert rows[1]["ts"] == 1486080000 and rows[1]["rating"] == 5.0 and rows[1]["review"] == "Five Stars"
    assert rows[2]["error"].startswith("bad rating") and rows[2]["user_key"] == "R3"

    fp = s.fingerprint()
    (images / "X3.jpg").write_bytes(JPEG)
    assert s.fingerprint() != fp


def test_amazon_from_s3(s3_bucket, tmp_path):
    import s3fs

    endpoint, bucket = s3_bucket
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    with fs.open(f"{bucket}/amazon/reviews_Beauty.json.gz", "wb") as f:
        f.write(gzip.compress("".join(json.dumps(r) + "\n" for r in REVIEWS_2014).encode()))
    fs.pipe(f"{bucket}/amazon/meta_Beauty.json", ("\n".join(META_2014) + "\n").encode())
    fs.pipe(f"{bucket}/images/B0001.jpg", JPEG)

    storage = StorageConfig(s3_endpoint_url=endpoint)
    s = src("amazon", f"{bucket}/amazon", storage, images_dir=f"{bucket}/images")
    s = pickle.loads(pickle.dumps(s))  # as a Ray worker would get it
    items, inter = read_all_items(s), read_all_interactions(s)
    check_schema(items, inter, "amazon-dom")
    assert [(r["user_key"], r["item_key"], r["rating"]) for r in inter.to_pylist()] == [
        ("U1", "B0001", 5.0),
        ("U1", "B0002", 3.0),
        (None, "B0002", 4.0),
    ]
    it = by_key(items, "item_key")
    assert it["B0001"]["image"] == JPEG and it["B0002"]["image"] is None
    assert it["B0001"]["image_uri"] == f"{bucket}/images/B0001.jpg"
    assert it["B0001"]["price"] == pytest.approx(7.5)
    assert len(errors(items)) == 1
    assert len(s.fingerprint()) == 16


# ------------------------------------------------------------------------------------- recbole
def test_recbole(tmp_path):
    root = tmp_path / "rb"
    root.mkdir()
    (root / "ml.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\treview:token_seq\n"
        "u1\tm-1\t4\t978300760\tgreat fun\n"
        "u1\tm2\t3.5\t978300761.0\t\n"
        "u2\tm-1\tbad\t978300762\tx\n"  # bad float
        "u2\tm3\t5\n"  # too few fields
        "\tm2\t1\t978300763\tno user\n"  # missing user key: kept, null
        "u1\tm-1\t4\t978300760\tgreat fun\n"
    )  # duplicate row: kept
    (root / "ml.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tgenre:token_seq\tprice:float\n"
        "m-1\tToy Story\t1995\tAnimation Children's Comedy\t9.99\n"
        "m2\tJumanji\t1995\tAdventure\t\n"
        "m3\tHeat\t1995\n"
    )
    (root / "ml.user").write_text("user_id:token\tage:token\tgender:token\nu1\t25\tF\nu2\t35\tM\n")
    s = src("recbole", root)
    s.shard_bytes = 30
    assert len(s.interaction_shards()) > 2
    items, inter = read_all_items(s), read_all_interactions(s)
    check_schema(items, inter, "recbole-dom")

    rows = inter.to_pylist()
    assert len(rows) == 6
    good = [r for r in rows if r["error"] is None]
    assert [(r["user_key"], r["item_key"], r["ts"], r["rating"], r["review"]) for r in good] == [
        ("u1", "m-1", 978300760, 4.0, "great fun"),
        ("u1", "m2", 978300761, 3.5, None),
        (None, "m2", 978300763, 1.0, "no user"),  # missing user key: kept, null
        ("u1", "m-1", 978300760, 4.0, "great fun"),
    ]  # duplicate: kept
    assert sorted(errors(inter)) == ["bad float in rating: bad", "malformed csv: expected 5 fields, got 3"]
    bad_float = next(r for r in rows if (r["error"] or "").startswith("bad float"))
    assert (bad_float["user_key"], bad_float["item_key"], bad_float["ts"]) == ("u2", "m-1", 978300762)
    malformed = next(r for r in rows if (r["error"] or "").startswith("malformed"))
    assert malformed["user_key"] is None and malformed["domain"] == "recbole-dom"

    it = by_key(items, "item_key")
    assert it["m-1"]["title"] == "Toy Story" and it["m-1"]["categories"] == ["Animation", "Children's", "Comedy"]
    assert it["m-1"]["price"] == pytest.approx(9.99) and it["m2"]["price"] is None
    assert len(errors(items)) == 1 and items.num_rows == 3

    users = s.read_users()
    assert users.schema == RAW_USERS
    assert users["user_key"].to_pylist() == ["u1", "u2"]
    assert json.loads(users["attributes"][0].as_py()) == {"age": "25", "gender": "F"}


def test_recbole_inter_only_without_time(tmp_path):
    root = tmp_path / "rb2"
    root.mkdir()
    (root / "tiny.inter").write_text("item_id:token\tuser_id:token\nA\t7\nB\t7\nA\t8\n")
    s = src("recbole", root)  # dataset_name found from the only .inter
    assert s.item_shards() == []
    inter = read_all_interactions(s)
    assert inter["user_key"].to_pylist() == ["7", "7", "8"] and inter["item_key"].to_pylist() == ["A", "B", "A"]
    ts = inter["ts"].to_pylist()
    assert ts == sorted(ts) and len(set(ts)) == 3  # file order stands in for time


# ------------------------------------------------------------------------------------ pixelrec
def _write_pixelrec(root: Path):
    (root / "pixelrec_interaction").mkdir(parents=True)
    (root / "pixelrec_iteminfo").mkdir()
    (root / "cover").mkdir()
    (root / "pixelrec_interaction" / "Pixel200K.csv").write_text(
        "user_id,item_id,timestamp\n"
        "u1,i10,1640000000\n"
        "u1,i11,1640000100\n"
        "u2,i10,2022-01-01T00:00:00\n"
        "u2,i12\n"  # missing field
        "u3,i11,yesterday\n"  # bad time
        "u1,i10,1640000000\n"
    )  # duplicate: kept
    (root / "pixelrec_iteminfo" / "item_info.csv").write_text(
        "item_id,view_number,comment_number,thumbup_number,title,tag,description\n"
        'i10,100,2,5,"Cat video, part 1",Pets,"Line one\nline two"\n'
        "i11,50,0,1,Cooking,Food|Life,\n"
        "i12,1,0,0,Unused item,,plain\n",
        encoding="utf-8",
    )
    (root / "cover" / "i10.jpg").write_bytes(JPEG)
    (root / "cover" / "i12.png").write_bytes(PNG)


def test_pixelrec(tmp_path):
    root = tmp_path / "px"
    _write_pixelrec(root)
    s = src("pixelrec", root)
    items, inter = read_all_items(s), read_all_interactions(s)
    check_schema(items, inter, "pixelrec-dom")

    rows = inter.to_pylist()
    assert inter.num_rows == 6
    assert [(r["user_key"], r["item_key"], r["ts"], r["error"]) for r in rows if r["user_key"]] == [
        ("u1", "i10", 1640000000, None),
        ("u1", "i11", 1640000100, None),
        ("u2", "i10", 1640995200, None),
        ("u3", "i11", None, "bad timestamp: Invalid isoformat string: 'yesterday'"),
        ("u1", "i10", 1640000000, None),
    ]  # duplicate: kept
    assert [r["error"] for r in rows if not r["user_key"]] == ["malformed csv: expected 3 fields, got 2"]

    it = by_key(items, "item_key")
    assert items.num_rows == 3 and errors(items) == []
    assert it["i10"]["title"] == "Cat video, part 1" and it["i10"]["description"] == "Line one\nline two"
    assert it["i11"]["categories"] == ["Food", "Life"] and it["i12"]["categories"] == []
    assert it["i10"]["image_uri"] == str(root / "cover" / "i10.jpg")
    assert it["i12"]["image_uri"] == str(root / "cover" / "i12.png")
    assert it["i11"]["image_uri"] is None

    # A second interaction file makes the choice ambiguous until it is named.
    (root / "pixelrec_interaction" / "Pixel1M.csv").write_text("item_id,user_id,timestamp\ni10,u9,1\n")
    with pytest.raises(ValueError, match="reviews_file"):
        src("pixelrec", root).files()
    s = src("pixelrec", root, reviews_file="pixelrec_interaction/Pixel1M.csv")
    inter = read_all_interactions(s)
    assert [(r["user_key"], r["item_key"], r["ts"]) for r in inter.to_pylist()] == [("u9", "i10", 1)]


# ------------------------------------------------------------------------------------------ hm
def _write_hm(root: Path):
    (root / "images" / "010").mkdir(parents=True)
    (root / "transactions_train.csv").write_text(
        "t_dat,customer_id,article_id,price,sales_channel_id\n"
        "2018-09-20,c0ffee,0108775015,0.05,2\n"
        "2018-09-20,c0ffee,108775015,0.07,2\n"  # same article without the leading zero
        "2018-09-21,beef,0110065001,0.02,1\n"
        "2018-13-40,beef,0110065001,0.02,1\n"  # bad date
        "2018-09-22,beef\n"  # missing fields
        "2018-09-23,dead,0999999999,0.5,1\n"
    )
    (root / "articles.csv").write_text(
        "article_id,product_code,prod_name,product_type_name,product_group_name,colour_group_name,"
        "department_name,index_name,section_name,garment_group_name,detail_desc\n"
        "0108775015,0108775,Strap top,Vest top,Garment Upper body,Black,Jersey Basic,Ladieswear,"
        'Womens Everyday Basics,Jersey Basic,"Jersey top with narrow, shoulder straps."\n'
        "0110065001,0110065,OP T-shirt,Bra,Underwear,Black,Clean Lingerie,Lingeries/Tights,"
        "Womens Lingerie,Under-,\n"
        "0200000001,0200000,Never sold,Sweater,Garment Upper body,Red,Knit,Divided,Divided,Knitwear,Warm\n"
    )
    (root / "customers.csv").write_text(
        "customer_id,FN,Active,club_member_status,age\nc0ffee,1.0,,ACTIVE,49\nbeef,,,ACTIVE,25\n"
    )
    (root / "images" / "010" / "0108775015.jpg").write_bytes(JPEG)
    (root / "images" / "099").mkdir()
    (root / "images" / "099" / "0999999999.jpg").write_bytes(JPEG)  # bought, photo, no articles row
    (root / "images" / "077").mkdir()
    (root / "images" / "077" / "0777777777.jpg").write_bytes(JPEG)  # photo of an article nobody bought


def test_hm(tmp_path):
    root = tmp_path / "hm"
    _write_hm(root)
    s = src("hm", root)
    items, inter = read_all_items(s), read_all_interactions(s)
    check_schema(items, inter, "hm-dom")

    rows = inter.to_pylist()
    assert inter.num_rows == 6
    assert [(r["user_key"], r["item_key"], r["ts"]) for r in rows if r["error"] is None] == [
        ("c0ffee", "0108775015", 1537401600),
        ("c0ffee", "0108775015", 1537401600),
        ("beef", "0110065001", 1537488000),
        ("dead", "0999999999", 1537660800),
    ]  # not in articles: a photo-only item row
    assert sorted(errors(inter)) == ["bad t_dat: 2018-13-40", "malformed csv: expected 5 fields, got 2"]
    bad_day = next(r for r in rows if r["error"] == "bad t_dat: 2018-13-40")
    assert (bad_day["user_key"], bad_day["item_key"], bad_day["ts"]) == ("beef", "0110065001", None)

    it = by_key(items, "item_key")
    assert items.num_rows == 4 and errors(items) == []
    # Bought, no articles row, photo on disk: the photo's URL and the price; no text. The photo of
    # an article nobody bought adds no item.
    sold = it["0999999999"]
    assert sold["image_uri"] == str(root / "images" / "099" / "0999999999.jpg")
    assert sold["price"] == pytest.approx(0.5) and sold["title"] is None and sold["categories"] == []
    assert "0777777777" not in it
    top = it["0108775015"]
    assert top["title"] == "Strap top" and top["brand"] == "Ladieswear"
    assert top["categories"] == ["Garment Upper body", "Vest top", "Jersey Basic", "Womens Everyday Basics"]
    assert top["description"] == "Jersey top with narrow, shoulder straps."
    assert top["price"] == pytest.approx(0.06)
    assert top["image_uri"] == str(root / "images" / "010" / "0108775015.jpg")
    assert it["0110065001"]["price"] == pytest.approx(0.02) and it["0110065001"]["image_uri"] is None
    assert it["0200000001"]["price"] is None

    users = s.read_users()
    assert users["user_key"].to_pylist() == ["c0ffee", "beef"]
    assert json.loads(users["attributes"][0].as_py()) == {"FN": "1.0", "club_member_status": "ACTIVE", "age": "49"}

    # max_rows: only the first N transactions, for interactions and for prices alike.
    s2 = src("hm", root, max_rows=1)
    s2.shard_bytes = 10
    inter2 = read_all_interactions(s2)
    assert [(r["user_key"], r["item_key"]) for r in inter2.to_pylist()] == [("c0ffee", "0108775015")]
    it2 = by_key(read_all_items(s2), "item_key")
    assert it2["0108775015"]["price"] == pytest.approx(0.05) and it2["0110065001"]["price"] is None
    assert "0999999999" not in it2  # not among the transactions read
    assert s2.fingerprint() != s.fingerprint()


def test_hm_photos_without_articles_file(tmp_path):
    """A sample with transactions and photos but no articles.csv: every bought article with a
    photo still gets its URL (as a photo-only item row); one without a photo stays a stub."""
    root = tmp_path / "hm"
    _write_hm(root)
    (root / "articles.csv").unlink()
    s = src("hm", root)
    items = read_all_items(s)
    check_schema(items, None, "hm-dom")
    it = by_key(items, "item_key")
    assert sorted(it) == ["0108775015", "0999999999"]  # 0110065001 has no photo: prepare stubs it
    assert it["0108775015"]["image_uri"] == str(root / "images" / "010" / "0108775015.jpg")
    assert it["0108775015"]["price"] == pytest.approx(0.06) and errors(items) == []
    # Without photos either, there is nothing to read: prepare stubs every article.
    import shutil

    shutil.rmtree(root / "images")
    assert src("hm", root).item_shards() == []


def test_hm_photos_from_s3(s3_bucket, tmp_path):
    import s3fs

    endpoint, bucket = s3_bucket
    root = tmp_path / "hm"
    _write_hm(root)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.put(str(root) + "/", f"{bucket}/hm/", recursive=True)
    s = pickle.loads(pickle.dumps(src("hm", f"{bucket}/hm", StorageConfig(s3_endpoint_url=endpoint))))
    it = by_key(read_all_items(s), "item_key")
    assert it["0999999999"]["image_uri"] == f"{bucket}/hm/images/099/0999999999.jpg"
    assert it["0108775015"]["image_uri"] == f"{bucket}/hm/images/010/0108775015.jpg"
