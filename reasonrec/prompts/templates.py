"""Instruction templates (paper Appendix A): ten phrasings per task with identical meaning.

Every template carries the same slots as the paper's set: the user id and a short user
description, the purchase history (item text, each followed by a photo slot), the candidate list
or the target item, and the evidence-horizon value (not for explanation, where no tool is
consulted). The wording is ours.

Items are always referred to by TEXT (title words, brand, category), never by numeric id: on P5-
indexed data (Amazon Beauty) consecutive ids co-occur, so id tokens would leak the answer.

A photo slot is the processor's image placeholder (``<image>`` for LLaVA); ``render_prompt``
returns, next to the text, the item ids whose photos fill those slots in order, so the caller can
attach the right images. Only the most recent ``max_history_photos`` history items get a photo
(long histories stay affordable); older ones appear as text.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from reasonrec.hashing import splitmix64
from reasonrec.vocab import TASKS

DEFAULT_IMAGE_TOKEN = "<image>"

# Slots: {user} {desc} {history} {eh} {candidates} {item} {rating}
TEMPLATES: dict[str, tuple[str, ...]] = {
    "sequential": (
        "User {user} ({desc}) bought these items in order: {history}. Which item will they buy next? "
        "Evidence horizon: {eh}.",
        "Here is what {user} ({desc}) has purchased so far: {history}. Predict the product this user is "
        "most likely to purchase next. The user's evidence horizon is {eh}.",
        "Purchase record of {user} ({desc}): {history}. Name the next product they will probably buy. "
        "Evidence horizon score: {eh}.",
        "{user} is described as: {desc}. Past purchases, oldest first: {history}. What should be recommended "
        "as their next purchase? Evidence horizon level: {eh}.",
        "Look at the shopping sequence of {user} ({desc}): {history}. Suggest the product they are likely "
        "to want next. Evidence horizon value: {eh}.",
        "Evidence horizon of {user} ({desc}): {eh}. Their purchase history is {history}. Which item comes "
        "next for them?",
        "Given the items {user} ({desc}) has bought, namely {history}, recommend the most probable next "
        "item. Evidence horizon indicator: {eh}.",
        "A shopper, {user} ({desc}), has this order history: {history}. Forecast the next purchase. "
        "Evidence horizon metric: {eh}.",
        "Based on the previous purchases of {user} ({desc}), {history}, determine which product they will "
        "buy after these. User evidence horizon: {eh}.",
        "Consider {user} ({desc}). Items bought so far: {history}. Identify the next item to recommend to "
        "this user. Evidence horizon: {eh}.",
    ),
    "direct": (
        "We want to recommend one item to {user} ({desc}), who bought {history}. Evidence horizon: {eh}. "
        "Pick the best choice among these candidates: {candidates}.",
        "Candidates: {candidates}. Which of them suits {user} ({desc}) best, given the purchases {history}? "
        "The user's evidence horizon is {eh}.",
        "{user} ({desc}) has an evidence horizon score of {eh} and previously bought {history}. Which "
        "candidate is the most appropriate recommendation: {candidates}?",
        "Evaluate the candidates {candidates} for {user} ({desc}), whose history is {history}, and name the "
        "most suitable one. Evidence horizon value: {eh}.",
        "Given the evidence horizon {eh} of {user} ({desc}) and the purchases {history}, which item from "
        "{candidates} should be ranked first?",
        "Which of the following would best match the taste of {user} ({desc})? Options: {candidates}. Past "
        "purchases: {history}. User evidence horizon: {eh}.",
        "For a user with evidence horizon {eh} ({user}, {desc}) who bought {history}, choose the most "
        "relevant item out of {candidates}.",
        "Decide which candidate to recommend to {user} ({desc}). Purchase history: {history}. Candidates: "
        "{candidates}. Evidence horizon indicator: {eh}.",
        "With evidence horizon level {eh}, {user} ({desc}) bought {history}. Select the item from "
        "{candidates} that this user would prefer.",
        "Rank the candidates {candidates} for {user} ({desc}) with evidence horizon {eh}, given the history "
        "{history}, and state the top choice.",
    ),
    "ctr": (
        "Should we recommend {item} to {user} ({desc})? They previously bought {history}. Evidence horizon: {eh}.",
        "Is it a good idea to suggest {item} to {user} ({desc}), whose past purchases are {history}? User "
        "evidence horizon level: {eh}.",
        "{user} ({desc}) has bought {history}. Would this user click on {item}? Evidence horizon score: {eh}.",
        "Would {user} ({desc}), with purchase history {history}, be likely to click on {item}? Evidence "
        "horizon value: {eh}.",
        "Based on the profile of {user} ({desc}) and the purchases {history}, should {item} be proposed to "
        "them? Evidence horizon metric: {eh}.",
        "Judge whether showing {item} to {user} ({desc}) is appropriate. Past purchases: {history}. "
        "Evidence horizon: {eh}.",
        "For {user} ({desc}), who bought {history}, is {item} a relevant recommendation? User evidence horizon: {eh}.",
        "Determine whether {user} ({desc}) would engage with {item}, given the history {history}. Evidence "
        "horizon level: {eh}.",
        "Evidence horizon of {user} ({desc}): {eh}. Past purchases: {history}. Will the user click on "
        "{item}? Answer yes or no.",
        "Assess whether {user} ({desc}) would click on {item} after buying {history}. Evidence horizon "
        "indicator: {eh}.",
    ),
    "explanation": (
        "Help {user} ({desc}) write an explanation for a {rating} rating of this product: {item}.",
        "Assist {user} ({desc}) in writing a review that justifies a {rating} rating for {item}.",
        "Generate a product explanation with a {rating} rating for {user} ({desc}) about {item}.",
        "Write, on behalf of {user} ({desc}), a justification of a {rating} rating for {item}.",
        "Compose a descriptive text about {item} that matches a {rating} rating, tailored to {user} ({desc}).",
        "Draft a review of {item} with a {rating} rating for {user} ({desc}).",
        "For {user} ({desc}), produce an evaluation statement for {item} consistent with a {rating} rating.",
        "Create an explanatory text about {item} for {user} ({desc}) that supports a {rating} rating.",
        "Develop a rationale for {user} ({desc}) explaining a {rating} rating of the product {item}.",
        "Write a personalised description of {item} for {user} ({desc}) reflecting a {rating} rating.",
    ),
}
N_TEMPLATES = 10
assert all(len(v) == N_TEMPLATES for v in TEMPLATES.values())
# Which slots each task's templates must contain (checked by the tests).
REQUIRED_SLOTS = {
    "sequential": ("{user}", "{desc}", "{history}", "{eh}"),
    "direct": ("{user}", "{desc}", "{history}", "{eh}", "{candidates}"),
    "ctr": ("{user}", "{desc}", "{history}", "{eh}", "{item}"),
    "explanation": ("{user}", "{desc}", "{item}", "{rating}"),
}


# ----------------------------------------------------------------------------- item text
def item_text(title: str | None, brand: str | None = None, category: str | None = None, max_chars: int = 80) -> str:
    """Human-readable reference to an item: title words plus brand and leaf category.

    Never includes the numeric id. Angle brackets are removed so an item title can never forge an
    image placeholder or a special token."""
    title = (title or "").strip()
    extras = [x.strip() for x in (brand, category) if x and x.strip() and x.strip().lower() != "unknown"]
    extras = [x for x in extras if x.lower() not in title.lower()]
    text = title or "unnamed item"
    if extras:
        text = f"{text} [{', '.join(extras)}]"
    text = text.replace("<", "").replace(">", "")
    return text[:max_chars].rstrip()


@dataclass
class ItemRef:
    """One item as shown in a prompt: its id (used only to look up the photo), its text, and
    whether a photo exists."""

    item_id: int
    text: str
    has_photo: bool = True


@dataclass
class ToolHint:
    """What one tool said, as shown to the VLM: ranked item texts (sequential/direct) or a click
    probability (ctr)."""

    name: str
    items: list[str] = field(default_factory=list)
    prob: float | None = None


@dataclass
class PromptInputs:
    user_id: int
    user_desc: str
    history: Sequence[ItemRef] = ()  # oldest first
    eh_value: float | None = None
    eh_bucket: str | None = None
    item: ItemRef | None = None  # ctr / explanation target
    candidates: Sequence[ItemRef] = ()  # direct
    rating: float | None = None  # explanation
    tool_hints: Sequence[ToolHint] = ()


@dataclass
class RenderedPrompt:
    text: str
    image_items: list[int]  # item ids whose photos fill the image slots, in order
    template_id: int


@dataclass
class RenderOptions:
    image_token: str = DEFAULT_IMAGE_TOKEN
    max_history_items: int = 20  # most recent items kept
    max_history_photos: int = 5  # most recent items that get a photo slot
    max_candidate_photos: int = 0  # direct: photos for the first N candidates (costly)
    item_photo: bool = True  # ctr / explanation: photo of the target item
    max_tool_items: int = 5  # items shown per tool hint


def _fmt_eh(value: float | None, bucket: str | None) -> str:
    if value is None and bucket is None:
        return "unknown"
    if value is None:
        return str(bucket)
    return f"{value:.2f} ({bucket})" if bucket else f"{value:.2f}"


def _fmt_rating(rating: float | None) -> str:
    if rating is None or not np.isfinite(rating):
        return "unspecified"
    return f"{int(round(float(rating)))}-star"


def _fmt_tools(task: str, hints: Sequence[ToolHint], max_items: int) -> str:
    parts = []
    for h in hints:
        if task == "ctr":
            if h.prob is not None:
                parts.append(f"{h.name} estimates a click probability of {h.prob:.2f}")
        elif h.items:
            parts.append(f"{h.name} suggests {'; '.join(h.items[:max_items])}")
    return (" Tool hints: " + ". ".join(parts) + ".") if parts else ""


class _Slots:
    """Renders list slots while recording the photo order (placeholders appear in text order)."""

    def __init__(self, opts: RenderOptions):
        self.opts = opts

    def item(self, ref: ItemRef, photo: bool) -> tuple[str, list[int]]:
        text = ref.text.replace(self.opts.image_token, "")
        if photo and ref.has_photo:
            return f"{text} {self.opts.image_token}", [ref.item_id]
        return text, []

    def history(self, refs: Sequence[ItemRef]) -> tuple[str, list[int]]:
        refs = list(refs)[-self.opts.max_history_items :] if self.opts.max_history_items > 0 else []
        if not refs:
            return "(no purchases yet)", []
        first_photo = len(refs) - self.opts.max_history_photos
        texts, imgs = [], []
        for i, ref in enumerate(refs):
            t, im = self.item(ref, photo=i >= first_photo)
            texts.append(t)
            imgs += im
        return "; ".join(texts), imgs

    def candidates(self, refs: Sequence[ItemRef]) -> tuple[str, list[int]]:
        texts, imgs = [], []
        for i, ref in enumerate(refs):
            t, im = self.item(ref, photo=i < self.opts.max_candidate_photos)
            texts.append(f"({i + 1}) {t}")
            imgs += im
        return " ".join(texts), imgs


def render_prompt(
    task: str, inputs: PromptInputs, template_id: int, opts: RenderOptions | None = None
) -> RenderedPrompt:
    """Fill template ``template_id`` of ``task``; see the module docstring for the photo order."""
    if task not in TEMPLATES:
        raise ValueError(f"unknown task '{task}', expected one of {TASKS}")
    opts = opts or RenderOptions()
    template = TEMPLATES[task][template_id]
    slots = _Slots(opts)
    values: dict[str, tuple[str, list[int]]] = {
        "user": (f"user_{int(inputs.user_id)}", []),
        "desc": ((inputs.user_desc or "no profile yet").replace(opts.image_token, ""), []),
        "eh": (_fmt_eh(inputs.eh_value, inputs.eh_bucket), []),
        "rating": (_fmt_rating(inputs.rating), []),
    }
    if "{history}" in template:
        values["history"] = slots.history(inputs.history)
    if "{candidates}" in template:
        if not inputs.candidates:
            raise ValueError("direct prompts need a non-empty candidate list")
        values["candidates"] = slots.candidates(inputs.candidates)
    if "{item}" in template:
        if inputs.item is None:
            raise ValueError(f"{task} prompts need a target item")
        values["item"] = slots.item(inputs.item, photo=opts.item_photo)
    # Assemble in template order so the image list follows placeholder order.
    out, images = [], []
    for literal, name, _spec, _conv in string.Formatter().parse(template):
        out.append(literal)
        if name is None:
            continue
        text, imgs = values[name]
        out.append(text)
        images += imgs
    text = "".join(out)
    if task != "explanation":
        text += _fmt_tools(task, inputs.tool_hints, opts.max_tool_items)
    return RenderedPrompt(text=text, image_items=images, template_id=template_id)


# ------------------------------------------------------------------------ template choice
class TemplateSampler:
    """Chooses a template per example: a seeded uniform mixture over the ten templates, or always
    ``single_template`` (the single-template ablation). The choice is a pure function of
    (seed, task, example key), so every worker and every re-run agrees."""

    def __init__(self, mixture: bool = True, single_template: int = 0, seed: int = 0):
        if not 0 <= single_template < N_TEMPLATES:
            raise ValueError(f"single_template must be in [0, {N_TEMPLATES})")
        self.mixture = mixture
        self.single_template = single_template
        self.seed = seed

    def pick_many(self, task: str, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.int64).astype(np.uint64)
        if not self.mixture:
            return np.full(len(keys), self.single_template, dtype=np.int64)
        salt = splitmix64(np.array([self.seed * 7919 + TASKS.index(task)], dtype=np.uint64))
        h = splitmix64(keys ^ salt)
        return (h % np.uint64(N_TEMPLATES)).astype(np.int64)

    def pick(self, task: str, key: int) -> int:
        return int(self.pick_many(task, np.array([key]))[0])
