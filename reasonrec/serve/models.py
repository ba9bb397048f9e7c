"""The HTTP API's typed request and response models (pydantic; FastAPI validates requests with
them, answers 422 naming the offending field, and publishes them in the OpenAPI schema).

Ids are the run's dense ids (``prepare``'s ``user_id`` / ``item_id``). A user id the run does not
know is valid: the planner treats the user as cold (``cold_user`` in the response). Size limits
(``serve.max_history`` / ``max_candidates`` / ``max_items_ctr``) are not expressed here: a list
over the limit is a 413 naming the limit, not a 422.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    model_validator,
)

# Every id is a 64-bit integer (the batch job's schema): a larger one is a 422 naming the field, not
# an overflow further down.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
Int64 = Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)]
ItemId = Annotated[Int64, Field(description="dense item id of the run's catalog")]

_QUERY_ID = Field(
    None,
    description="optional key of the query: it picks the prompt template (and the candidates "
    "shown in a direct prompt), as the batch job's query_id does; default: a hash "
    "of the request, so the same request always gets the same answer",
)


class _Request(BaseModel):
    # extra="forbid": a misspelt field is a 422 naming it, not silently ignored; NaN / Infinity (which
    # JSON parsers accept) are a 422 too.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    user_id: Int64 | None = Field(None, description="dense user id; unknown ids take the cold-start path")
    history: list[ItemId] | None = Field(
        None, description="inline interaction history, oldest first; replaces the stored one for the prompt"
    )
    query_id: Int64 | None = _QUERY_ID


class _NeedsUser(_Request):
    @model_validator(mode="after")
    def _user_or_history(self):
        if self.user_id is None and self.history is None:
            raise ValueError("give user_id, history, or both")
        return self


class RecommendRequest(_NeedsUser):
    """Sequential recommendation (full catalog) without ``candidates``, direct recommendation
    (rank the given candidates) with them."""

    candidates: list[ItemId] | None = Field(None, min_length=1, description="items to rank (direct task)")
    k: StrictInt = Field(10, ge=1, description="items to return (at most the run's score.k)")


class CTRRequest(_NeedsUser):
    items: list[ItemId] = Field(..., min_length=1, description="items to predict a click for")


class ExplainRequest(_NeedsUser):
    item_id: ItemId
    rating: StrictFloat | None = Field(None, ge=0, description="the user's rating of the item")


class Decision(BaseModel):
    """The planner's decision and what it cost: carried by every answer."""

    query_id: int
    tier: Literal["low", "medium", "high"] = Field(
        ...,
        description="risk tier: low = a tool answered (VLM bypassed); medium = the VLM alone; "
        "high = the VLM consulted the tools in tools_used",
    )
    tools_used: list[str]
    confidence: float | None = Field(
        None, description="confidence of the returned answer: the VLM's where it answered, else the planner's"
    )
    tool_confidence: float | None = Field(None, description="planner's calibrated P(primary tool is right)")
    conf_verbal: float | None = Field(
        None, description="the VLM's verbalised confidence, parsed from its thought (null: no VLM or none stated)"
    )
    conf_token: float | None = Field(
        None, description="the VLM's token-probability confidence in its answer (null: no VLM)"
    )
    rationale: str
    eh_bucket: str = Field(..., description="the user's evidence-horizon bucket")
    cold_user: bool = Field(..., description="unknown user: scored on the cold-start path")
    vlm_called: bool
    thought: str | None = Field(None, description="the VLM's chain of thought before its answer (null: no VLM)")
    latency_ms: float = Field(..., description="tools + VLM compute time of this query")


class RecommendResponse(Decision):
    task: Literal["sequential", "direct"]
    user_id: int | None
    items: list[int]


class CTRPrediction(Decision):
    item_id: int
    prob: float


class CTRResponse(BaseModel):
    user_id: int | None
    predictions: list[CTRPrediction] = Field(
        ..., description="one per requested item, in request order; each item is its own query with its own tier"
    )


class ExplainResponse(Decision):
    user_id: int | None
    item_id: int
    text: str


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    run: str
    tasks: list[str]
    tools: list[str]
