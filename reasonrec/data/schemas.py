"""Arrow schemas: the data contracts between stages (see DESIGN.md "Data contracts").

Two layers:
* RAW_* schemas are what every source reader emits: source keys as strings, no validation yet,
  plus an ``error`` column a reader fills when it could not parse a row (the row is then
  quarantined by ``prepare`` with that reason instead of being dropped silently).
* The canonical schemas are what ``prepare`` writes: dense int64 ids, one row per entity.
"""

from __future__ import annotations

import pyarrow as pa

# ------------------------------------------------------------------------------ reader output
RAW_ITEMS = pa.schema(
    [
        ("item_key", pa.string()),
        ("title", pa.string()),
        ("brand", pa.string()),
        ("categories", pa.list_(pa.string())),
        ("price", pa.float32()),
        ("description", pa.string()),
        ("image", pa.binary()),  # encoded image bytes (PNG/JPEG), or null
        ("image_uri", pa.string()),  # where the image lives when not embedded, or null
        ("domain", pa.string()),
        ("error", pa.string()),  # set by a reader for a row it could not parse
    ]
)

RAW_INTERACTIONS = pa.schema(
    [
        ("user_key", pa.string()),
        ("item_key", pa.string()),
        ("ts", pa.int64()),  # unix seconds, or the order index when the source has no time
        ("rating", pa.float32()),
        ("review", pa.string()),
        ("domain", pa.string()),
        ("error", pa.string()),
    ]
)

RAW_USERS = pa.schema(
    [
        ("user_key", pa.string()),
        ("domain", pa.string()),
        ("attributes", pa.string()),  # free text / JSON of side information (age, gender, ...)
    ]
)

# ------------------------------------------------------------------------ canonical contracts
ITEMS = pa.schema(
    [
        ("item_id", pa.int64()),
        ("item_key", pa.string()),
        ("title", pa.string()),
        ("brand", pa.string()),
        ("categories", pa.list_(pa.string())),
        ("price", pa.float32()),
        ("description", pa.string()),
        ("image", pa.binary()),
        ("image_uri", pa.string()),
        ("domain", pa.string()),
    ]
)

INTERACTIONS = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("ts", pa.int64()),
        ("rating", pa.float32()),
        ("review", pa.string()),
    ]
)

USERS = pa.schema(
    [
        ("user_id", pa.int64()),
        ("user_key", pa.string()),
        ("domain", pa.string()),
        ("n_train", pa.int64()),
        ("evidence_horizon", pa.float32()),
        ("eh_bucket", pa.string()),
    ]
)

QUARANTINE = pa.schema(
    [
        ("table", pa.string()),  # items | interactions
        ("reason", pa.string()),
        ("record", pa.string()),  # the offending row as JSON (binary fields elided)
    ]
)

# Leave-one-out split shared by sequential and direct recommendation: the last item is the
# test target, the second last the validation target, the rest (in time order) the training
# history. Users with fewer than 3 interactions keep what they have in train_items (valid/test
# null): they still count for EH and serve as cold users, but are not evaluated.
LOO = pa.schema(
    [
        ("user_id", pa.int64()),
        ("train_items", pa.list_(pa.int64())),
        ("train_ts", pa.list_(pa.int64())),
        ("valid_item", pa.int64()),
        ("test_item", pa.int64()),
    ]
)

# Direct recommendation candidates: the positive plus sampled negatives the user never touched,
# shuffled; ``positive`` names the truth.
DIRECT_CANDIDATES = pa.schema(
    [
        ("user_id", pa.int64()),
        ("split", pa.string()),  # valid | test
        ("positive", pa.int64()),
        ("candidates", pa.list_(pa.int64())),
    ]
)

CTR = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("label", pa.int8()),
        ("split", pa.string()),  # train | valid | test
    ]
)

EXPLANATION = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("rating", pa.float32()),
        ("review", pa.string()),
        ("split", pa.string()),
    ]
)

TIMESHIFT = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("ts", pa.int64()),
        ("split", pa.string()),  # train (ts < cutoff) | test
    ]
)

# Instruction examples for the VLM fine-tune (build_instructions -> finetune). Photos are
# referenced by item id (``image_items``, in placeholder order) and looked up in the items table:
# never copied per example.
INSTRUCTIONS = pa.schema(
    [
        ("example_id", pa.int64()),
        ("user_id", pa.int64()),
        ("task", pa.string()),  # sequential | direct | ctr | explanation
        ("split", pa.string()),  # train | valid
        ("phase", pa.string()),  # the user's EH bucket: low | medium | high (curriculum phase tag)
        ("template_id", pa.int32()),
        ("prompt", pa.string()),
        ("image_items", pa.list_(pa.int64())),
        ("target", pa.string()),  # thought line + "Answer: ..."
        ("tools_usable", pa.list_(pa.string())),
        ("noisy_tools", pa.bool_()),  # tool hints deliberately wrong (overrule training)
    ]
)

# Queries to score (score job input, and the shape the Serve app builds per request). Truth
# columns (target, label, reference) are null for production queries.
QUERIES = pa.schema(
    [
        ("query_id", pa.int64()),
        ("task", pa.string()),
        ("user_id", pa.int64()),
        ("history", pa.list_(pa.int64())),  # null: the user's history from the prepared data
        ("candidates", pa.list_(pa.int64())),  # direct
        ("item_id", pa.int64()),  # ctr / explanation target item
        ("rating", pa.float32()),  # explanation
        ("target", pa.int64()),  # truth: next item (sequential / direct)
        ("label", pa.int8()),  # truth: click (ctr)
        ("reference", pa.string()),  # truth: review text (explanation)
    ]
)

PREDICTIONS = pa.schema(
    [
        ("query_id", pa.int64()),
        ("user_id", pa.int64()),
        ("task", pa.string()),
        ("route", pa.string()),  # low | medium | high (risk tier)
        ("tools_used", pa.list_(pa.string())),
        ("confidence", pa.float32()),
        ("items", pa.list_(pa.int64())),
        ("prob", pa.float32()),
        ("text", pa.string()),
        ("rationale", pa.string()),
        ("latency_ms", pa.float32()),
        ("eh_bucket", pa.string()),
        ("cold_user", pa.bool_()),  # unknown user: treated as cold (high EH), flagged
        ("vlm_called", pa.bool_()),
        # Routed to the VLM (medium / high) but the run's VLM budget (score.vlm_budget) was spent on
        # queries with a larger expected gain: the primary tool's answer stands (explanation: no text).
        ("vlm_skipped", pa.bool_()),
        # The planner's first-choice tool and its own answer, for every ranking / CTR query (equal to
        # items / prob on the low tier): disagreement analyses compare the system with it.
        ("primary_tool", pa.string()),
        ("tool_items", pa.list_(pa.int64())),
        ("tool_prob", pa.float32()),
        ("flops", pa.float64()),  # torch FLOPs spent on the query (score.count_flops), else null
        # The VLM's chain of thought before its answer (EH bucket, tools it trusts, verbalised
        # confidence; paper Figure 3), null where the VLM did not run: why it answered as it did.
        ("thought", pa.string()),
        # Both of the VLM's confidences in its answer (``VLMOutput``; ``confidence`` above keeps the
        # verbalised one where stated, else the token one): the verbalised one parsed from the
        # thought (null where the VLM did not run or stated none) and the token-probability one
        # (null where the VLM did not run). Runs scored before these columns existed lack them.
        ("conf_verbal", pa.float32()),
        ("conf_token", pa.float32()),
        # The planner's calibrated P(primary tool right), every routed ranking / CTR query.
        ("tool_confidence", pa.float32()),
    ]
)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Return ``table`` with exactly ``schema``'s columns in order: missing columns become
    nulls, extra columns are dropped, types are cast (raising on an impossible cast)."""
    cols = []
    for f in schema:
        if f.name in table.column_names:
            col = table.column(f.name)
            cols.append(col if col.type == f.type else col.cast(f.type))
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


# What the batch job's summary (reasonrec.scoring.summarize) counts predictions by. Kept here, not in
# reasonrec.scoring, so that the job's check tasks count a shard without importing the tools (torch).
SUMMARY_COLUMNS = ["task", "route", "vlm_called", "vlm_skipped", "cold_user"]


def summary_counts(preds: pa.Table) -> pa.Table:
    """Predictions (at least :data:`SUMMARY_COLUMNS`) -> one row per distinct value of those
    columns with its ``count``, in order of first appearance: what
    :func:`reasonrec.scoring.summarize` needs,
    a few dozen rows for any number of predictions. Counts of several parts concatenated
    summarize as their whole (the batch job counts each shard where it is read)."""
    keys = [c for c in SUMMARY_COLUMNS if c in preds.column_names]
    if "count" in preds.column_names:  # counts of several parts: add them up
        out = preds.group_by(keys, use_threads=False).aggregate([("count", "sum")])
        return out.rename_columns([*keys, "count"]) if out.num_rows else preds.select([*keys, "count"])
    out = preds.select(keys).group_by(keys, use_threads=False).aggregate([([], "count_all")])
    return out.rename_columns([*keys, "count"])
