"""Compact chain-of-thought targets (paper eq. 1: ``Assistant: [Thought Tokens] -> y``).

A target is one line of thought tokens, then the answer after a fixed marker::

    EH: high (0.82); Tools: sasrec/bpr_mf; Confidence: 0.53
    Answer: nail lacquer simmer and shimmer

The thought states the evidence-horizon bucket and value, the tools whose output is usable for
this query (``none`` when no tool is right or none was shown) and a verbalised confidence (a
calibrated probability supplied by the instruction builder, 2 decimals). Explanation targets carry
only the confidence: no tools are consulted for that task.

``parse_output`` reads generated text back, tolerating junk around and inside the fields.
``NoisyTools`` implements the "noisy tools" augmentation: for a configured fraction of examples
the tool hints shown in the prompt are replaced by wrong ones and the thought lists no usable
tool, so the model learns to overrule tools instead of copying them.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from reasonrec.hashing import splitmix64
from reasonrec.prompts.templates import ToolHint
from reasonrec.vocab import EH_BUCKETS, TASKS  # noqa: F401  (EH_BUCKETS: re-exported as cot.EH_BUCKETS)

ANSWER_MARKER = "Answer:"
NO_TOOLS = "none"
MAX_THOUGHT_TOOLS = 3  # a thought names at most this many usable tools


@dataclass
class Thought:
    eh_bucket: str | None = None
    eh_value: float | None = None
    tools: list[str] = field(default_factory=list)
    confidence: float | None = None


@dataclass
class ParsedOutput:
    thought: Thought
    answer: str | None
    complete: bool  # every field the task's thought should carry was found, and an answer


def ctr_answer(label: int | bool) -> str:
    return "yes" if label else "no"


def format_thought(
    task: str, confidence: float, eh_bucket: str | None = None, eh_value: float | None = None, tools: Sequence[str] = ()
) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}'")
    conf = f"Confidence: {min(max(float(confidence), 0.0), 1.0):.2f}"
    if task == "explanation":
        return conf
    eh = f"EH: {eh_bucket or 'unknown'}" + (f" ({eh_value:.2f})" if eh_value is not None else "")
    return f"{eh}; {_tools_field(tools)}; {conf}"


def _tools_field(tools: Sequence[str]) -> str:
    return "Tools: " + ("/".join(t.replace("/", "_").replace(";", "_") for t in tools) or NO_TOOLS)


def tool_alternatives(thought: str, shown: Sequence[str]) -> list[tuple[str, str]]:
    """Every value a written thought's ``Tools:`` field can take when ``shown`` tools are in the
    prompt: 'none', then each subset of up to MAX_THOUGHT_TOOLS of them, names in name order (the
    toolbox's order, which the instruction builder keeps). Per value: (the thought up to and
    including that field and its ';', the whole thought with that value). Empty when the thought
    has no such field."""
    m = _TOOLS_FIELD_RE.search(thought)
    names = sorted(set(shown))
    if m is None or not names:
        return []
    head, tail = thought[: m.start()], thought[m.end() :]
    fields = [
        _tools_field(c) for n in range(min(len(names), MAX_THOUGHT_TOOLS) + 1) for c in itertools.combinations(names, n)
    ]
    return [(f"{head}{f};", f"{head}{f}{tail}") for f in fields]


def compose_target(
    task: str,
    answer: str,
    confidence: float,
    eh_bucket: str | None = None,
    eh_value: float | None = None,
    tools: Sequence[str] = (),
) -> str:
    """Thought line + newline + ``Answer: <answer>``."""
    thought = format_thought(task, confidence, eh_bucket, eh_value, tools)
    return f"{thought}\n{ANSWER_MARKER} {answer.strip()}"


def split_target(target: str) -> tuple[str, str]:
    """Split a target into (thought part ending with the marker, answer text with its leading
    space). Collate tokenizes the two parts separately and inference scores answers after the
    same prefix, so the answer's tokens are identical in training and inference."""
    i = target.find(ANSWER_MARKER)
    if i < 0:
        return "", target
    j = i + len(ANSWER_MARKER)
    return target[:j], target[j:]


_EH_RE = re.compile(r"EH\s*[:=]\s*(low|medium|high)\b\s*(?:\(\s*([01](?:\.\d+)?|\.\d+)\s*\))?", re.I)
_TOOLS_RE = re.compile(r"Tools?\s*[:=]\s*([^;\n]*)", re.I)
_TOOLS_FIELD_RE = re.compile(r"Tools?\s*[:=][^;\n]*", re.I)
_CONF_RE = re.compile(r"Confidence\s*[:=]\s*([-+]?\d*\.?\d+)(\s*%)?", re.I)
_ANSWER_RE = re.compile(r"Answer\s*:", re.I)
_STOP_RE = re.compile(r"<\|im_end\|>|<\|endoftext\|>|</s>|<STOP>", re.I)


def parse_output(text: str, task: str | None = None) -> ParsedOutput:
    """Parse generated text into thought fields and the answer. Never raises: missing or
    malformed fields come back as None / empty and ``complete`` is False."""
    text = text or ""
    stop = _STOP_RE.search(text)
    if stop:
        text = text[: stop.start()]
    m_ans = _ANSWER_RE.search(text)
    head = text[: m_ans.start()] if m_ans else text
    answer = text[m_ans.end() :].strip() if m_ans else None
    if answer is not None:
        answer = answer.splitlines()[0].strip() if task != "explanation" and answer else answer
    thought = Thought()
    m = _EH_RE.search(head)
    if m:
        thought.eh_bucket = m.group(1).lower()
        if m.group(2):
            thought.eh_value = min(max(float(m.group(2)), 0.0), 1.0)
    m = _TOOLS_RE.search(head)
    if m:
        names = [t.strip() for t in re.split(r"[/,]", m.group(1)) if t.strip()]
        thought.tools = [] if names in ([], [NO_TOOLS]) else [n for n in names if n.lower() != NO_TOOLS]
    m = _CONF_RE.search(head)
    if m:
        try:
            value = float(m.group(1))
            if m.group(2) or value > 1.0:  # "53%" or "53" -> 0.53
                value = value / 100.0
            thought.confidence = min(max(value, 0.0), 1.0)
        except ValueError:
            pass
    needs_eh = task not in (None, "explanation")
    complete = (
        thought.confidence is not None
        and bool(answer)
        and (not needs_eh or (thought.eh_bucket is not None and m_ans is not None))
    )
    if task == "ctr" and answer:
        w = re.match(r"\W*(yes|no)\b", answer, re.I)
        answer = w.group(1).lower() if w else answer
    return ParsedOutput(thought=thought, answer=answer, complete=complete)


# ------------------------------------------------------------------------ noisy tools
class NoisyTools:
    """With probability ``fraction`` per example (a pure function of seed and example key), the
    tool hints are replaced by wrong ones: item lists become distractors that exclude the truth,
    click probabilities are mirrored (p -> 1 - p). The usable-tool list then becomes empty."""

    def __init__(self, fraction: float = 0.1, seed: int = 0):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError("noisy-tool fraction must be in [0, 1]")
        self.fraction = fraction
        self.seed = seed

    def corrupted(self, keys: np.ndarray) -> np.ndarray:
        """Boolean mask: which example keys get wrong tool hints."""
        keys = np.asarray(keys, dtype=np.int64).astype(np.uint64)
        salt = splitmix64(np.array([self.seed * 104729 + 17], dtype=np.uint64))
        u = (splitmix64(keys ^ salt) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
        return u < self.fraction

    def apply(
        self,
        key: int,
        hints: Sequence[ToolHint],
        usable: Sequence[str],
        truth_texts: Sequence[str] = (),
        distractors: Sequence[str] = (),
    ) -> tuple[list[ToolHint], list[str], bool]:
        """Return (hints to show, usable tool names, whether corrupted)."""
        hints = list(hints)
        if not hints or not bool(self.corrupted(np.array([key]))[0]):
            return hints, list(usable), False
        rng = np.random.default_rng([self.seed, int(key) & 0x7FFFFFFF])
        truth = {t.strip().lower() for t in truth_texts}
        pool = [d for d in distractors if d.strip().lower() not in truth]
        out = []
        for h in hints:
            if h.prob is not None:
                out.append(replace(h, prob=float(1.0 - h.prob), items=[]))
            else:
                n = min(len(h.items) or 1, len(pool))
                picks = [pool[i] for i in rng.choice(len(pool), size=n, replace=False)] if n else []
                out.append(replace(h, items=picks))
        return out, [], True
