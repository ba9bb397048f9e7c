"""Locust load for the Serve app (driven headless by ``bench/serve.py``; loopback only):

    locust -f bench/locustfile.py --headless -u 8 -r 8 -t 15s --host http://127.0.0.1:8000 \\
        --queries queries.json --samples-out samples.jsonl --max-requests 500

Each user sends the requests of ``--queries`` (a JSON list of ``[path, body]``, shared round-robin by
all users) back to back (no think time: ``-u`` is the concurrency), on its own keep-alive connection
(``FastHttpUser``). Every response is written to ``--samples-out`` as one JSON line ``[path, status,
tier, latency_ms, end time]`` (``tier``: the answer's, the highest of a /v1/ctr answer's predictions); the run
stops after ``--max-requests`` responses or at ``-t``, whichever comes first.
"""

from __future__ import annotations

import itertools
import json
import time

import gevent
from locust import FastHttpUser, constant, events, task

_TIERS = ("low", "medium", "high")
_state: dict = {}


@events.init_command_line_parser.add_listener
def _arguments(parser):
    parser.add_argument("--queries", required=True, help="JSON list of [path, body]")
    parser.add_argument("--samples-out", required=True, help="JSON lines [path, status, tier, latency_ms, end]")
    parser.add_argument("--max-requests", type=int, default=0, help="stop after this many responses (0: no bound)")


@events.test_start.add_listener
def _start(environment, **_):
    opts = environment.parsed_options
    with open(opts.queries) as f:
        _state["queries"] = itertools.cycle(json.load(f))
    _state["out"] = open(opts.samples_out, "w")  # noqa: SIM115 -- closed at test_stop
    _state["n"], _state["max"] = 0, opts.max_requests


@events.test_stop.add_listener
def _stop(environment, **_):
    if "out" in _state:
        _state["out"].close()


def _tier(path: str, answer: dict) -> str | None:
    if path == "/v1/ctr":
        tiers = [p["tier"] for p in answer["predictions"]]
        return max(tiers, key=_TIERS.index) if tiers else None
    return answer.get("tier")


class ServeUser(FastHttpUser):
    wait_time = constant(0)

    @task
    def ask(self):
        path, body = next(_state["queries"])
        with self.client.post(path, json=body, name=path, catch_response=True) as r:
            tier = None
            if r.status_code == 200:
                try:
                    tier = _tier(path, r.json())
                except (ValueError, KeyError, TypeError) as exc:
                    r.failure(f"bad answer: {exc}")
            else:
                r.failure(f"status {r.status_code}")
            latency_ms = r.request_meta["response_time"]
        _state["out"].write(json.dumps([path, r.status_code, tier, latency_ms, time.time()]) + "\n")
        _state["out"].flush()  # the bench may stop locust early (SIGTERM)
        _state["n"] += 1
        if _state["max"] and _state["n"] == _state["max"]:
            gevent.spawn(self.environment.runner.quit)
