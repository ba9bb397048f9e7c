"""images: fetch, check and resize every item's photo once per run (Ray Data).

    python -m ray_jobs.images --config configs/quickstart.yaml [key=value ...] [--force]

Reads ``prepare``'s ``items`` table (``item_id``, embedded ``image``, ``image_uri``) in bounded
batches (``images.batch_size`` items per ``map_batches`` call), fetches each photo from its
bytes or its URI (local path, ``s3://`` or ``http(s)://``; the batch's threads fetch in
parallel), validates it, pads it to a square and resizes it to the VLM's input side
(``images.size``, else ``vlm.image_size``), re-encodes it and classifies a failure by reason
(see :mod:`reasonrec.data.images`). Output: ``{run}/images/item_images/``
(``item_id``, ``image`` or null, ``image_status``), one row per item, and ``summary.json`` with
the rows per reason. Batches stream from the Parquet reader through the workers to the Parquet
writer; the driver only counts statuses (one short string column, read back batch by batch), so
memory stays bounded for any number of photos.

Why a stage of its own, after ``prepare``:

* ``prepare``'s config hash and outputs do not change: runs prepared before this stage existed
  stay valid, and the readers fall back to ``prepare``'s embedded bytes when this stage is absent;
* photos are fetched, decoded and resized once per run, not again by every actor of
  build_instructions / finetune / score / serve (100k+ photos of up to megabytes each);
* it re-runs alone: a new VLM input size (``images.size`` / ``vlm.image_size``) or other image
  settings redo only this stage. Its inputs are prepare's manifest fingerprint, which changes when
  the sources (photo folders included) change, so new photos re-run it too.
"""

from __future__ import annotations

import logging
import sys
import time
from functools import partial

from ray_jobs.common import write_dataset
from reasonrec.config import RunConfig, parse_cli, section_hash
from reasonrec.data.images import ITEM_IMAGES, STAGE, TABLE, count_statuses, process_batch, spec_of
from reasonrec.io import open_store

log = logging.getLogger("reasonrec.images")


def config_hash(cfg: RunConfig) -> str:
    """What changes the output: the spec (size, format, quality, limits, whether http(s) URLs are
    fetched); not the batch size nor the http timeout and retries (they decide only transient
    failures)."""
    s = spec_of(cfg)
    spec: dict = {"size": s.size, "format": s.format, "quality": s.quality}
    spec.update(max_pixels=s.max_pixels, max_bytes=s.max_bytes)
    # Fetching http(s) is the default and adds no key, so runs made before it keep their hash (and
    # their downstream stages); turning it off changes the hash.
    if s.http is None:
        spec["fetch_http"] = False
    return section_hash(spec)


def run(cfg: RunConfig, force: bool = False) -> dict:
    t0 = time.time()
    store = open_store(cfg)
    inputs = {"prepare": store.require("prepare").fingerprint}
    chash = config_hash(cfg)
    if not force and store.is_done(STAGE, chash, inputs):
        log.info("images: manifest matches under %s; skipping (use --force to re-run)", store.url(STAGE))
        return {"skipped": True, **store.manifest(STAGE).metrics}
    from reasonrec.runtime import init_ray

    ray = init_ray(cfg.ray)
    import pyarrow.dataset as pads

    spec = spec_of(cfg)
    # The projection is pushed into the Parquet reader: the other item columns are never read.
    items = ray.data.read_parquet(store.url("prepare", "items"), filesystem=store.arrow_fs).select_columns(
        ["item_id", "image", "image_uri"]
    )
    photos = items.map_batches(
        partial(process_batch, spec=spec, storage=cfg.storage),
        batch_format="pyarrow",
        batch_size=max(1, cfg.images.batch_size),
    )
    with store.stage_writer(STAGE, chash, inputs) as w:
        rows = write_dataset(photos, w, store, TABLE, ITEM_IMAGES)
        written = pads.dataset(w.path(TABLE), filesystem=store.arrow_fs, format="parquet")
        by_reason = count_statuses(b.column("image_status") for b in written.to_batches(columns=["image_status"]))
        summary = {
            "items": rows,
            "by_reason": by_reason,
            "size": spec.size,
            "format": spec.format,
            "seconds": round(time.time() - t0, 1),
        }
        w.write_json("summary.json", summary)
        w.manifest.metrics = summary
    return summary


def format_summary(s: dict) -> str:
    if s.get("skipped"):
        return "images: skipped (outputs up to date)"
    reasons = ", ".join(f"{k}={v:,}" for k, v in s["by_reason"].items() if v)
    return (
        f"images: {s['items']:,} items -> {s['size']}x{s['size']} {s['format']} in {s['seconds']:.1f}s; "
        f"by reason: {reasons or 'none'}"
    )


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args, cfg = parse_cli("Fetch, validate and resize the items' photos once per run.", argv)
    print(format_summary(run(cfg, force=args.force)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
