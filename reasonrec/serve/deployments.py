"""The Ray Serve deployment graph, one of two shapes (``serve.graph``):

* ``fused`` (default): HTTP -> ``Ingress`` (FastAPI + the batch job's Router with the tools in
  process) -> ``VLM`` for medium / high rows only. A low-tier request takes one Serve hop (proxy ->
  ingress replica); the rows of requests that arrive while the router is busy are routed together
  in its next call (:class:`~reasonrec.serve.batching.MicroBatcher`, one vectorized Router call).
* ``split``: HTTP -> ``Ingress`` -> ``Planner`` -> ``Tools`` / ``VLM``, each its own deployment
  (the tools scale apart from the planner; three hops for a low-tier request).

* ``Ingress``: the HTTP API (typed models in :mod:`reasonrec.serve.models`), size limits (413:
  list lengths, and the body itself in :class:`BodyLimit` before it is read), request metrics,
  turns a request into query rows of the batch job's schema (``schemas.QUERIES``) and a scored row
  back into a response; in the fused graph it also routes (:class:`Scorer`).
* ``Scorer`` (fused, in the ingress) / ``Planner`` (split): the batch job's
  :class:`~reasonrec.scoring.Router` (same code, same config, so the same tier, tools and low-tier
  answers; built by ``build_router``), then the medium / high rows to the ``VLM`` deployment.
  Low-risk rows never reach the VLM.
* ``Tools`` (split only): the run's tool repository; cheap replicas, scaled out.
* ``VLM``: the fine-tuned model; few replicas, requests batched dynamically with ``@serve.batch``
  (size and wait from ``serve.vlm_batch_size`` / ``vlm_batch_wait_s`` through ``user_config``, so
  ``serve deploy`` can change them without restarting replicas).

Every replica loads its artifacts once, in its constructor, from the run's store (local or s3://).
Replica options (autoscaling, resources, queue limits) are set by :func:`reasonrec.serve.app.build`.

Metrics (``ray.util.metrics``; Ray exports them on each node's metrics export port with a ``ray_``
prefix, see docs/operations.md): ``reasonrec_requests_total{endpoint,tier,status}``,
``reasonrec_request_latency_ms{endpoint,tier}``, ``reasonrec_queries_total{task,tier}`` (ingress),
``reasonrec_vlm_calls_total{task}``, ``reasonrec_vlm_batch_size``, ``reasonrec_vlm_batch_latency_ms`` (VLM),
``reasonrec_route_batch_size``, ``reasonrec_route_queue_rows`` (the fused ingress's router micro-batches).
"""

import asyncio
import contextvars
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from reasonrec.config import RunConfig, ServeConfig
from reasonrec.data.schemas import QUERIES
from reasonrec.io import ArtifactStore, open_store
from reasonrec.serve.batching import MicroBatcher
from reasonrec.serve.models import (
    INT64_MAX,
    CTRPrediction,
    CTRRequest,
    CTRResponse,
    ExplainRequest,
    ExplainResponse,
    Health,
    Ready,
    RecommendRequest,
    RecommendResponse,
)

ANONYMOUS_USER = -1  # a request with only an inline history: no stored user (tools fall back, user is cold)
VLM_TIERS = ("medium", "high")
_QUERY_FIELDS = ("history", "candidates", "item_id", "user_id")
TIER_ORDER = ("none", "low", "medium", "high")  # a request's tier: the highest of its queries' ("none": no answer)
LATENCY_MS = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128]


def _store(cfg: RunConfig) -> ArtifactStore:
    return open_store(cfg)


def serving_config(cfg: RunConfig) -> RunConfig:
    """The run's config as the app's router and VLM use it: FLOP counting as ``serve.count_flops``
    says (the batch job's ``score.count_flops`` is for its report; no answer carries FLOPs)."""
    return dataclasses.replace(cfg, score=dataclasses.replace(cfg.score, count_flops=cfg.serve.count_flops))


# ------------------------------------------------------------------------------ tools
@serve.deployment(name="Tools")
class Tools:
    def __init__(self, cfg: RunConfig):
        from reasonrec.planner import load_toolbox

        self.box = load_toolbox(_store(cfg))

    def answer(self, task: str, users, histories, k: int = 10, candidates=None, items=None, names=None):
        return self.box.answer(task, users, histories, k, candidates=candidates, items=items, names=names)

    def ready(self) -> list[str]:
        return sorted(self.box.tools)


class RemoteToolBox:
    """What the Router needs of a ToolBox, answered by the ``Tools`` deployment. Called from the
    planner's sync method (Serve runs those in a thread pool), so blocking on ``result()`` is fine."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    def answer(self, task, users, histories, k=10, candidates=None, items=None, names=None):
        return self.handle.answer.remote(
            task, users, histories, k, candidates=candidates, items=items, names=names
        ).result()


# ------------------------------------------------------------------------------ VLM
@serve.deployment(name="VLM")
class VLM:
    def __init__(self, cfg: RunConfig):
        from ray.util.metrics import Counter, Histogram

        from reasonrec.scoring import build_vlm_answerer

        self.answerer = build_vlm_answerer(serving_config(cfg), _store(cfg), "test")
        self.calls = Counter("reasonrec_vlm_calls", description="queries answered by the VLM", tag_keys=("task",))
        self.batch_size = Histogram(
            "reasonrec_vlm_batch_size", description="rows per VLM batch (@serve.batch)", boundaries=BATCH_SIZES
        )
        self.batch_latency = Histogram(
            "reasonrec_vlm_batch_latency_ms", description="VLM compute time per batch", boundaries=LATENCY_MS
        )

    def reconfigure(self, user_config: dict) -> None:
        self._answer_batch.set_max_batch_size(int(user_config["max_batch_size"]))
        self._answer_batch.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    async def answer(self, rows: list[dict]) -> list[dict]:
        """Routed rows (``scoring.ROUTED``) -> the VLM's answers (items / prob / text, confidence).
        One call per planner request holds one slot of the queue limits; its rows join the
        replica's batch queue one by one, so batches mix rows of concurrent requests."""
        return list(await asyncio.gather(*(self._answer_batch(r) for r in rows)))

    @serve.batch
    async def _answer_batch(self, rows: list[dict]) -> list[dict]:
        # The model runs off the event loop so the replica keeps queueing the next batch meanwhile.
        t0 = time.perf_counter()
        out = await asyncio.to_thread(self._answer_all, rows)
        self.batch_size.observe(len(rows))
        self.batch_latency.observe((time.perf_counter() - t0) * 1000)
        for r in rows:
            self.calls.inc(1, tags={"task": r["task"]})
        return out

    def _answer_all(self, rows: list[dict]) -> list[dict]:
        by_task: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            by_task.setdefault(r["task"], []).append(i)
        out: dict[int, dict] = {}
        for task, idx in by_task.items():
            out.update(self.answerer.answer(task, [rows[i] for i in idx], idx))
        return [out[i] for i in range(len(rows))]

    def ready(self) -> bool:
        return True


# ------------------------------------------------------------------------------ planner
@serve.deployment(name="Planner")
class Planner:
    def __init__(self, cfg: RunConfig, tools: DeploymentHandle, vlm: DeploymentHandle):
        from reasonrec.scoring import build_router

        self.router = build_router(serving_config(cfg), _store(cfg), "test", toolbox=RemoteToolBox(tools))
        self.tools, self.vlm = tools, vlm

    def score(self, rows: list[dict]) -> list[dict]:
        """Query rows -> scored rows (``scoring.SCORED``), rejected ones with their ``error``."""
        from reasonrec.scoring import to_scored

        routed = self.router(pa.Table.from_pylist(rows, schema=QUERIES))
        recs = routed.to_pylist()
        idx = [i for i, r in enumerate(recs) if r["route"] in VLM_TIERS]
        answers = self.vlm.answer.remote([recs[i] for i in idx]).result() if idx else []
        return to_scored(routed, dict(zip(idx, answers))).to_pylist()

    async def ready(self) -> dict:
        tools, _ = await asyncio.gather(self.tools.ready.remote(), self.vlm.ready.remote())
        return {"tasks": sorted(self.router.planners) + ["explanation"], "tools": tools}


class Scorer:
    """The fused graph's scoring, in the ingress replica: the batch job's Router with the tools in
    process (``build_router``: the same decisions as the batch job), concurrent requests' rows
    micro-batched into one Router call (run in a worker thread, so the event loop keeps taking
    requests), then the medium / high rows to the ``VLM`` deployment."""

    def __init__(self, cfg: RunConfig, vlm: DeploymentHandle, on_batch=None):
        from reasonrec.scoring import build_router

        self.router = build_router(serving_config(cfg), _store(cfg), "test")
        self.vlm = vlm
        self.batcher = MicroBatcher(self.route, cfg.serve.route_batch_rows, on_batch)
        self._warm_up()

    def _warm_up(self) -> None:
        """One query per task through the router before the replica takes requests: the first
        call of each tool pays one-off set-up (torch kernels, xgboost predictors) that a request
        should not. Answers are discarded; a row the run cannot score is just rejected."""
        extra = {"direct": {"candidates": list(range(min(5, self.router.catalog.n_items)))}, "ctr": {"item_id": 0}}
        rows = [
            {"query_id": i, "task": task, "user_id": 0, **extra.get(task, {})}
            for i, task in enumerate(sorted(self.router.planners))
        ]
        for _ in range(2):  # a second round: some libraries set up on the second call
            self.route(rows)
            for row in rows:
                self.route([row])

    def route(self, rows: list[dict]) -> list[tuple[dict, dict]]:
        """Query rows -> (routed row ``scoring.ROUTED``, scored row ``scoring.SCORED`` without a VLM
        answer) pairs, one Router call: what each micro-batch runs (in the worker thread, so the
        conversions stay off the replica's event loop too)."""
        from reasonrec.scoring import to_scored

        routed = self.router(pa.Table.from_pylist(rows, schema=QUERIES))
        return list(zip(routed.to_pylist(), to_scored(routed).to_pylist()))

    async def score(self, rows: list[dict]) -> list[dict]:
        """Query rows -> scored rows (``scoring.SCORED``), rejected ones with their ``error``."""
        from reasonrec.scoring import ROUTED, to_scored

        pairs = await self.batcher(rows)
        idx = [i for i, (r, _) in enumerate(pairs) if r["route"] in VLM_TIERS]
        if not idx:  # low tier / rejected: scored already
            return [scored for _, scored in pairs]
        answers = await self.vlm.answer.remote([pairs[i][0] for i in idx])
        routed = pa.Table.from_pylist([r for r, _ in pairs], schema=ROUTED)
        return to_scored(routed, dict(zip(idx, answers))).to_pylist()

    async def ready(self) -> dict:
        await self.vlm.ready.remote()
        return {"tasks": sorted(self.router.planners) + ["explanation"], "tools": sorted(self.router.toolbox.tools)}


# ------------------------------------------------------------------------------ ingress
app = FastAPI(
    title="ReasonRec",
    version="1",
    description=(
        "Reasoning-augmented recommendation. Each query is routed by risk tier: low -> a classical tool answers, "
        "medium -> the VLM alone, high -> the VLM consults up to 3 tools. Every answer says which."
    ),
)
_ERRORS = {
    413: {
        "description": "the body (serve.max_body_bytes) or a list is larger than the server's limit "
        "(named in the message)"
    },
    503: {"description": "overloaded (queue full) or not ready; retry later"},
}
# The request being answered: the middleware's record, which the endpoint fills in (its tier).
_REQUEST: contextvars.ContextVar[dict] = contextvars.ContextVar("reasonrec_request")


def _set_tier(tier: str) -> None:
    """Tell the middleware the tier of the request being answered. (A module function: the ingress
    class is pickled by value, and a ContextVar cannot be.)"""
    record = _REQUEST.get(None)
    if record is not None:
        record["tier"] = tier


class IngressMetrics:
    """The ingress replica's request metrics (created in the replica, exported by Ray)."""

    def __init__(self):
        from ray.util.metrics import Counter, Gauge, Histogram

        self.requests = Counter(
            "reasonrec_requests",
            description="HTTP requests by endpoint, tier and status code",
            tag_keys=("endpoint", "tier", "status"),
        )
        self.latency = Histogram(
            "reasonrec_request_latency_ms",
            description="HTTP request latency at the ingress",
            boundaries=LATENCY_MS,
            tag_keys=("endpoint", "tier"),
        )
        self.queries = Counter(
            "reasonrec_queries",
            description="queries answered, by task and tier (a /v1/ctr request holds one per item)",
            tag_keys=("task", "tier"),
        )
        self.route_batch = Histogram(
            "reasonrec_route_batch_size",
            description="query rows per Router call of the fused ingress (micro-batch)",
            boundaries=BATCH_SIZES,
        )
        self.route_queue = Gauge(
            "reasonrec_route_queue_rows", description="query rows waiting for the next Router call (fused ingress)"
        )

    def on_route_batch(self, rows: int, requests: int, queued_rows: int) -> None:
        self.route_batch.observe(rows)
        self.route_queue.set(queued_rows)


def _too_large(limit: int) -> StarletteHTTPException:
    return StarletteHTTPException(413, f"request body is larger than {limit} bytes (serve.max_body_bytes)")


class BodyLimit:
    """ASGI middleware of the ingress: bodies over ``serve.max_body_bytes`` -> 413 without reading
    them (from Content-Length, or for a chunked body once the bytes received pass the limit), and
    every request counted and timed (:class:`IngressMetrics`) with its status code and tier.

    The limit and the metrics belong to the replica's ``Ingress`` (Serve's replica context); outside
    a replica (no context) the default limit applies and nothing is recorded."""

    def __init__(self, app):
        self.app = app

    @staticmethod
    def _ingress():
        try:
            return serve.get_replica_context().servable_object
        except Exception:  # noqa: BLE001 -- not in a replica
            return None

    @staticmethod
    def _endpoint(scope) -> str:
        # The matched route's path (Starlette leaves the route in the scope): bounded label values;
        # "other" for paths no route matched.
        return getattr(scope.get("route"), "path", None) or "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ingress = self._ingress()
        limit = ingress.cfg.serve.max_body_bytes if ingress is not None else ServeConfig.max_body_bytes
        record, t0 = {"tier": "none", "status": 500}, time.perf_counter()
        token = _REQUEST.set(record)

        async def send_(message):
            if message["type"] == "http.response.start":
                record["status"] = message["status"]
                record["started"] = True
            await send(message)

        received = 0

        async def receive_():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # FastAPI re-raises an HTTPException met while reading the body
                    raise _too_large(limit)
            return message

        try:
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > limit:
                await self._reject(_too_large(limit), scope, receive, send_)
            else:
                try:
                    await self.app(scope, receive_, send_)
                except StarletteHTTPException as exc:
                    if exc.status_code != 413 or record.get("started"):
                        raise
                    await self._reject(exc, scope, receive, send_)
        finally:
            _REQUEST.reset(token)
            if ingress is not None and getattr(ingress, "metrics", None) is not None:
                endpoint = self._endpoint(scope)
                ingress.metrics.requests.inc(
                    1, tags={"endpoint": endpoint, "tier": record["tier"], "status": str(record["status"])}
                )
                ingress.metrics.latency.observe(
                    (time.perf_counter() - t0) * 1000, tags={"endpoint": endpoint, "tier": record["tier"]}
                )

    @staticmethod
    async def _reject(exc: StarletteHTTPException, scope, receive, send) -> None:
        await ErrorJSON(status_code=exc.status_code, content={"detail": exc.detail}, headers={"connection": "close"})(
            scope, receive, send
        )


app.add_middleware(BodyLimit)


@app.exception_handler(BackPressureError)
async def _overloaded(request: Request, exc: BackPressureError) -> JSONResponse:
    # A downstream deployment's queue is full: 503 at once (the proxy does the same for the ingress').
    return JSONResponse(status_code=503, content={"detail": f"overloaded, retry later: {exc}"})


def _finite(obj: Any) -> Any:
    """``obj`` with NaN / Infinity floats as strings: JSON cannot carry them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


_ECHO_CHARS = 200


class ErrorJSON(JSONResponse):
    """An error answer: JSON in ASCII, as a body's lone surrogates (``"\\ud800"``, valid JSON) echoed in
    a field name or value cannot be encoded in UTF-8 (Starlette's JSONResponse answered 500)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _echo(value: Any) -> Any:
    """The offending input as the 422 echoes it: scalars as they are (NaN / Infinity as strings), a
    long string cut, a container only when small (a deeply nested one would exhaust the encoder's
    recursion, a large one bloat the answer), else a summary. A body that is not JSON (bytes) is
    echoed decoded, its invalid UTF-8 replaced (FastAPI's encoder would fail on it)."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value[: _ECHO_CHARS * 4]).decode("utf-8", "replace")
    if value is None or isinstance(value, (bool, int)):
        return value if not isinstance(value, int) or abs(value) < 10**30 else f"<int of {len(str(value))} digits>"
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, str):
        return value if len(value) <= _ECHO_CHARS else value[:_ECHO_CHARS] + "..."
    try:
        text = json.dumps(value, default=str)
    except (ValueError, TypeError, RecursionError):
        text = None
    if text is not None and len(text) <= _ECHO_CHARS:
        return _finite(value)
    size = f" of {len(value)}" if isinstance(value, (list, dict, tuple)) else ""
    return f"<{type(value).__name__}{size}>"


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's own handler, except that the echoed input may hold a NaN or an Infinity, which its
    # JSON response cannot write (a body with "rating": NaN answered 500 instead of 422), or be
    # nested too deep for its encoder (500 too): it is bounded by _echo.
    errors = [{**e, "input": _echo(e.get("input"))} if "input" in e else e for e in exc.errors()]
    return ErrorJSON(status_code=422, content={"detail": _finite(jsonable_encoder(errors))})


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # FastAPI answers a body it could not parse for any reason but bad JSON syntax (invalid UTF-8,
    # nesting deeper than the parser's recursion limit, an integer of more than 4300 digits) with
    # a bare 400; make it the 422 naming the body that bad syntax gets.
    if exc.status_code == 400 and exc.__cause__ is not None:
        cause = f"{type(exc.__cause__).__name__}: {exc.__cause__}"[:_ECHO_CHARS]
        return ErrorJSON(
            status_code=422,
            content={
                "detail": [
                    {"type": "json_invalid", "loc": ["body"], "msg": f"body is not valid JSON ({cause})", "input": None}
                ]
            },
        )
    headers = getattr(exc, "headers", None)
    return ErrorJSON(
        status_code=exc.status_code, content={"detail": _finite(jsonable_encoder(exc.detail))}, headers=headers
    )


def _query_key(*parts: Any) -> int:
    """A stable query id from the request's content (63 bits)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "big") >> 1


def _field_error(field: str, msg: str, value: Any = None) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": msg, "input": value}])


def _decision(row: dict) -> dict:
    return {
        "query_id": row["query_id"],
        "tier": row["route"],
        "tools_used": row["tools_used"] or [],
        "confidence": row["confidence"],
        "tool_confidence": row["tool_confidence"],
        "conf_verbal": row["conf_verbal"],
        "conf_token": row["conf_token"],
        "rationale": row["rationale"] or "",
        "eh_bucket": row["eh_bucket"],
        "cold_user": bool(row["cold_user"]),
        "vlm_called": bool(row["vlm_called"]),
        "thought": row["thought"],
        "latency_ms": float(row["latency_ms"] or 0.0),
    }


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    """``backend``: the ``Planner`` deployment's handle (split graph) or the ``VLM``'s (fused: this
    replica routes, see :class:`Scorer`)."""

    def __init__(self, cfg: RunConfig, backend: DeploymentHandle):
        self.cfg = cfg
        self.metrics = IngressMetrics()
        self.planner = backend if cfg.serve.graph == "split" else None
        self.scorer = Scorer(cfg, backend, self.metrics.on_route_batch) if self.planner is None else None

    @app.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        """Liveness: the HTTP front end answers."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Ready, responses={503: _ERRORS[503]})
    async def readyz(self) -> Ready:
        """Readiness: planner, tools and VLM replicas answer."""
        try:
            ready = self.planner.ready.remote() if self.planner is not None else self.scorer.ready()
            info = await asyncio.wait_for(ready, timeout=10)
        except Exception as exc:  # noqa: BLE001 -- any failure downstream means "not ready"
            raise HTTPException(503, f"not ready: {type(exc).__name__}: {exc}") from None
        return Ready(status="ready", run=self.cfg.run_name, **info)

    @app.post("/v1/recommend", response_model=RecommendResponse, responses=_ERRORS)
    async def recommend(self, req: RecommendRequest) -> RecommendResponse:
        """Next items for a user (sequential: full catalog), or the given candidates ranked (direct)."""
        s = self.cfg.serve
        self._limit("history", req.history, s.max_history, "serve.max_history")
        self._limit("candidates", req.candidates, s.max_candidates, "serve.max_candidates")
        if req.k > self.cfg.score.k:
            raise _field_error("k", f"k must be <= {self.cfg.score.k} (the run's score.k)", req.k)
        task = "direct" if req.candidates is not None else "sequential"
        qid = req.query_id if req.query_id is not None else _query_key(task, req.user_id, req.history, req.candidates)
        (out,) = await self._score([self._row(qid, task, req, candidates=req.candidates)], {})
        return RecommendResponse(task=task, user_id=req.user_id, items=out["items"][: req.k], **_decision(out))

    @app.post("/v1/ctr", response_model=CTRResponse, responses=_ERRORS)
    async def ctr(self, req: CTRRequest) -> CTRResponse:
        """Click probabilities, one query per item (each routed on its own). With ``query_id`` the
        i-th item's query id is ``query_id + i``."""
        s = self.cfg.serve
        self._limit("history", req.history, s.max_history, "serve.max_history")
        self._limit("items", req.items, s.max_items_ctr, "serve.max_items_ctr")
        if req.query_id is not None and req.query_id + len(req.items) - 1 > INT64_MAX:
            raise _field_error(
                "query_id", f"query_id + {len(req.items) - 1} (the last item's) is over 2**63 - 1", req.query_id
            )
        rows = [
            self._row(
                req.query_id + i if req.query_id is not None else _query_key("ctr", req.user_id, req.history, item),
                "ctr",
                req,
                item_id=item,
            )
            for i, item in enumerate(req.items)
        ]
        out = await self._score(rows, {"item_id": "items"})
        return CTRResponse(
            user_id=req.user_id,
            predictions=[
                CTRPrediction(item_id=item, prob=r["prob"], **_decision(r)) for item, r in zip(req.items, out)
            ],
        )

    @app.post("/v1/explain", response_model=ExplainResponse, responses=_ERRORS)
    async def explain(self, req: ExplainRequest) -> ExplainResponse:
        """Why the user would like (or not) the item, written by the VLM."""
        self._limit("history", req.history, self.cfg.serve.max_history, "serve.max_history")
        qid = (
            req.query_id
            if req.query_id is not None
            else _query_key("explanation", req.user_id, req.history, req.item_id, req.rating)
        )
        (out,) = await self._score([self._row(qid, "explanation", req, item_id=req.item_id, rating=req.rating)], {})
        return ExplainResponse(user_id=req.user_id, item_id=req.item_id, text=out["text"] or "", **_decision(out))

    # ------------------------------------------------------------------------- helpers
    @staticmethod
    def _limit(field: str, values: Sequence | None, limit: int, key: str) -> None:
        if values is not None and len(values) > limit:
            raise HTTPException(413, f"{field} has {len(values)} items; the limit is {limit} ({key})")

    @staticmethod
    def _row(qid: int, task: str, req, **extra) -> dict:
        uid = req.user_id if req.user_id is not None else ANONYMOUS_USER
        return {"query_id": qid, "task": task, "user_id": uid, "history": req.history, **extra}

    async def _score(self, rows: list[dict], field_names: dict[str, str]) -> list[dict]:
        out = await (self.planner.score.remote(rows) if self.planner is not None else self.scorer.score(rows))
        if not any(r["error"] for r in out):  # else a 422: no tier
            for row, r in zip(rows, out):
                self.metrics.queries.inc(1, tags={"task": row["task"], "tier": r["route"]})
            _set_tier(max((r["route"] for r in out), key=TIER_ORDER.index))
        for r in out:
            if r["error"]:
                # The router's reasons start with the query field at fault ("candidates: unknown ...").
                field = next((f for f in _QUERY_FIELDS if r["error"].startswith(f)), None)
                raise RequestValidationError(
                    [
                        {
                            "type": "value_error",
                            "msg": r["error"],
                            "loc": ("body", field_names.get(field, field)) if field else ("body",),
                        }
                    ]
                )
        return out
