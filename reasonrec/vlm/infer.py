"""VLM inference for the planner: full-catalog top-K, candidate scoring, CTR, explanations.

Every call first lets the model write its thought (greedy, until ``Answer:``), which carries the
verbalised confidence, then produces the answer after that thought:

* sequential: **constrained beam search over a prefix trie** of the catalog's title token
  sequences (each title + end-of-turn). No candidate list is shown to the model, so nothing
  leaks the answer, and every beam is a real item. Scoring every title's likelihood instead would
  cost ~12k items x ~10 tokens = ~120k token positions per user; beam search costs
  ``num_beams`` x (title depth ~15-25) positions with a KV cache, i.e. a few hundred, which is
  what makes ~12k-item catalogs affordable with the small model on CPU. The prompt is prefilled
  once per row and its KV cache copied to the beams (not re-encoded per beam). The trie processor also
  renormalises each step over the allowed tokens, so a beam's summed log-prob is the model's
  probability of that item *within the catalog*; the top beam's probability is the token-level
  confidence. With ``thought_tool_sets`` = N > 0 and tools shown, the items' probabilities are
  mixed over the N likeliest values of the thought's ``Tools:`` field (N beam searches).
* direct: log-likelihood of each given candidate's text as the answer (prompt prefilled once,
  KV cache shared by chunks of candidates); softmax over candidates -> confidence.
* ctr: P(yes) = softmax over the " yes" / " no" answer tokens; confidence max(p, 1 - p).
* explanation: greedy generation; confidence = geometric-mean token probability.

The answer step reuses the thought's KV cache (``vlm.reuse_thought_cache``, the default): the
thought pass has already run the prompt (with photos) and the thought's tokens through the model,
so the answer's input, prompt + thought text, is only run from where it stops matching the tokens
cached by the thought pass (usually just the last thought token; more where re-tokenising the
thought text or a cut prompt changes tokens). The prompt is thus prefilled once per query, not
twice. The cached rows are copied into a left-padded :class:`~transformers.DynamicCache` laid out
as the answer batch, so positions and masks are those of a fresh prefill; answers are the same up
to float rounding (the cached keys come from a different batch shape and from one-token decode
steps).

``expected_calibration_error`` scores either kind of confidence against correctness.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from reasonrec.metrics import expected_calibration_error  # noqa: F401  (re-exported)
from reasonrec.prompts.cot import ANSWER_MARKER, Thought, parse_output, tool_alternatives
from reasonrec.vlm.builder import VLMBundle
from reasonrec.vlm.collate import VLMCollator


@dataclass
class VLMOutput:
    task: str
    items: list[int] | None = None  # sequential / direct: ranked item ids
    scores: list[float] | None = None  # their log-probabilities
    prob: float | None = None  # ctr: P(yes)
    text: str | None = None  # answer text (title / yes|no / explanation)
    conf_verbal: float | None = None  # parsed from the thought (None if not produced)
    conf_token: float = 0.0  # from token probabilities, in [0, 1]
    thought: Thought = field(default_factory=Thought)
    thought_text: str = ""
    latency_ms: float = 0.0


# ------------------------------------------------------------------------------- trie
def shared_text_log_share(texts: Sequence[str], prior: Sequence[float] | None = None) -> np.ndarray:
    """log(w_i / sum of w over the entries with the same text). The model scores a text, not an
    item: items that share a text (catalogs repeat titles; the synthetic world's 120 items have 58)
    split that text's probability in proportion to a prior (e.g. training popularity + 1), so a
    ranked list interleaves other texts instead of filling its top K with one text's copies."""
    keys = [t.strip() for t in texts]
    w = np.ones(len(keys)) if prior is None else np.asarray(prior, np.float64)
    if (w <= 0).any():
        raise ValueError("item prior weights must be positive")
    total: dict[str, float] = {}
    for key, x in zip(keys, w):
        total[key] = total.get(key, 0.0) + float(x)
    return np.log(w / np.array([total[key] for key in keys]))


class ItemTrie:
    """Prefix trie over the token sequences ``tok(" " + text) + [eos]`` of catalog items (the
    answer is tokenized with its leading space after ``Answer:``, as in training). Items with the
    same text share a leaf and its probability (:func:`shared_text_log_share` with ``prior``)."""

    _END = -1  # key under which a terminal node stores its item ids

    def __init__(
        self,
        tokenizer,
        texts: Sequence[str],
        item_ids: Sequence[int] | None = None,
        prior: Sequence[float] | None = None,
    ):
        self.eos_id = tokenizer.eos_token_id
        item_ids = list(range(len(texts))) if item_ids is None else [int(i) for i in item_ids]
        seqs = tokenizer([" " + t.strip() for t in texts], add_special_tokens=False)["input_ids"]
        self.log_share = dict(zip(item_ids, shared_text_log_share(texts, prior).tolist()))
        self.root: dict = {}
        self.depth = 0
        for seq, iid in zip(seqs, item_ids):
            node = self.root
            for t in list(seq) + [self.eos_id]:
                node = node.setdefault(t, {})
            node.setdefault(self._END, []).append(iid)  # identical titles share a leaf
            self.depth = max(self.depth, len(seq) + 1)
        for leaf in self._leaves(self.root):  # most likely item of a shared text first
            leaf.sort(key=lambda i: -self.log_share[i])
        self._allowed_cache: dict[int, torch.Tensor] = {}

    def _leaves(self, node: dict):
        for key, child in node.items():
            if key == self._END:
                yield child
            else:
                yield from self._leaves(child)

    def node(self, prefix: Sequence[int]) -> dict | None:
        node = self.root
        for t in prefix:
            node = node.get(int(t))
            if node is None:
                return None
        return node

    def allowed(self, prefix: Sequence[int]) -> torch.Tensor | None:
        node = self.node(prefix)
        if node is None:
            return None
        key = id(node)
        if key not in self._allowed_cache:
            self._allowed_cache[key] = torch.tensor([k for k in node if k != self._END], dtype=torch.long)
        return self._allowed_cache[key]

    def items(self, seq: Sequence[int]) -> list[int]:
        """Item ids of a complete sequence (ending with eos; trailing padding ignored)."""
        seq = list(seq)
        if self.eos_id in seq:
            seq = seq[: seq.index(self.eos_id) + 1]
        node = self.node(seq)
        return list(node.get(self._END, [])) if node else []


class TrieConstraint(LogitsProcessor):
    """Masks tokens that leave the trie and renormalises over the allowed ones, so summed beam
    scores are log-probabilities over catalog items."""

    def __init__(self, trie: ItemTrie):
        self.trie = trie
        self.start: int | None = None  # prompt length (0 when generating from embeddings)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        out = torch.full_like(scores, -math.inf)
        for row in range(input_ids.shape[0]):
            allowed = self.trie.allowed(input_ids[row, self.start :].tolist())
            if allowed is None or len(allowed) == 0:  # dead beam: any finite path to stop it
                out[row, self.trie.eos_id] = 0.0
                continue
            allowed = allowed.to(scores.device)
            out[row, allowed] = torch.log_softmax(scores[row, allowed], dim=-1)
        return out


# ------------------------------------------------------------------------ thought cache
@dataclass
class CachedRow:
    """What the thought pass left in its KV cache for one row: the token ids the cache covers (the
    prompt's real tokens, then the generated ones) and per layer its keys and values
    ``[1, heads, len(ids), head_dim]`` (padding columns dropped)."""

    ids: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]

    def common_prefix(self, ids: Sequence[int]) -> int:
        n, m = 0, min(len(ids), len(self.ids))
        while n < m and ids[n] == self.ids[n]:
            n += 1
        return n


def cached_rows(cache: DynamicCache, prompt_ids: torch.Tensor, mask: torch.Tensor, new_ids: torch.Tensor) -> list:
    """Split a left-padded batch's KV cache (prompt ``[B, P]`` + generated ``new_ids`` ``[B, G]``)
    into one :class:`CachedRow` per row. The cache covers fewer columns than prompt + generated
    (the last generated token is never run through the model)."""
    n_cached = cache.get_seq_length()
    width = prompt_ids.shape[1]
    full = torch.cat([prompt_ids, new_ids.to(prompt_ids.device)], dim=1)[:, :n_cached]
    rows = []
    for i, n_real in enumerate(mask.sum(-1).tolist()):
        lo = width - int(n_real)
        rows.append(
            CachedRow(
                full[i, lo:].tolist(),
                [
                    (layer.keys[i : i + 1, :, lo:n_cached], layer.values[i : i + 1, :, lo:n_cached])
                    for layer in cache.layers
                ],
            )
        )
    return rows


# -------------------------------------------------------------------------- predictor
class VLMPredictor:
    """Loads nothing itself: wraps a built bundle (load once per actor) and a collator."""

    def __init__(self, bundle: VLMBundle, collator: VLMCollator | None = None):
        self.bundle = bundle
        self.cfg = bundle.config
        self.collator = collator or VLMCollator(bundle)
        self.tok = bundle.tokenizer
        self.model = bundle.base_model  # LoRA layers are injected in place: adapters apply
        self.model.eval()
        yes = self.tok(" yes", add_special_tokens=False)["input_ids"]
        no = self.tok(" no", add_special_tokens=False)["input_ids"]
        # Shared leading tokens (a byte tokenizer splits off the space) are fed as context; the
        # first differing tokens decide yes vs no.
        n = 0
        while n < min(len(yes), len(no)) - 1 and yes[n] == no[n]:
            n += 1
        self.yes_no_common = yes[:n]
        self.yes_id, self.no_id = yes[n], no[n]

    # ------------------------------------------------------------------------ internals
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _prompts(self, examples, prefixes=None) -> dict:
        """Left-padded prompt batch on the model's device."""
        batch = self.collator.encode_prompts(examples, prefixes)
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def _embed(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Token embeddings with photo features scattered into the image slots (what LLaVA does
        inside forward), so prefill and greedy generation can start from embeddings: HF's beam
        expansion would repeat ``pixel_values`` rows out of step with the prompts' photos."""
        ids = batch["input_ids"]
        emb = self.model.get_input_embeddings()(ids)
        pv = batch.get("pixel_values")
        if pv is not None:
            feats = self.model.model.get_image_features(pixel_values=pv, return_dict=True).pooler_output
            feats = torch.cat(list(feats), dim=0).to(emb.dtype)
            mask = (ids == self.bundle.image_token_id).unsqueeze(-1)
            emb = emb.masked_scatter(mask, feats)
        return emb

    def _gen_kwargs(self) -> dict:
        return {"pad_token_id": self.collator.pad_id, "eos_token_id": self.tok.eos_token_id}

    @torch.no_grad()
    def thoughts(self, examples: Sequence[Mapping[str, Any]], return_cache: bool = False):
        """Greedy thought for each example, returned up to and including ``Answer:`` (appended
        when the model did not write it). ``return_cache``: ``(thoughts, rows)`` with the
        :class:`CachedRow` of each example, for the answer step to continue from."""
        batch = self._prompts(examples)
        out = self.model.generate(
            inputs_embeds=self._embed(batch),
            attention_mask=batch["attention_mask"],
            max_new_tokens=self.cfg.max_thought_tokens,
            do_sample=False,
            num_beams=1,
            stop_strings=[ANSWER_MARKER],
            tokenizer=self.tok,
            return_dict_in_generate=True,
            **self._gen_kwargs(),
        )
        texts = []
        for row in out.sequences:
            text = self.tok.decode(row, skip_special_tokens=True)
            i = text.find(ANSWER_MARKER)
            texts.append(text[: i + len(ANSWER_MARKER)] if i >= 0 else text.rstrip() + "\n" + ANSWER_MARKER)
        if not return_cache:
            return texts
        cache = out.past_key_values
        rows = cached_rows(cache, batch["input_ids"], batch["attention_mask"], out.sequences) if cache else None
        return texts, rows

    def _with_thoughts(self, examples, thoughts) -> tuple[list[str], list[CachedRow] | None]:
        """The thoughts (written now when not given) and, when written now and
        ``reuse_thought_cache`` is on, what their pass cached per row (else None)."""
        if thoughts is not None:
            return list(thoughts), None
        if not self.cfg.reuse_thought_cache:
            return list(self.thoughts(examples)), None
        texts, rows = self.thoughts(examples, return_cache=True)
        return list(texts), rows

    @torch.no_grad()
    def _prefill(self, batch: Mapping[str, torch.Tensor], reuse: Sequence[CachedRow] | None, leave: int = 0):
        """Run a left-padded batch through the model except its last ``leave`` columns, with
        ``use_cache``; returns the model output (logits of the columns run, the cache of all
        columns up to there). ``reuse`` (one :class:`CachedRow` per row): the leading tokens each
        row shares with its cached row are taken from the cache, not run again; the columns run
        are the last R up to the end, R = the most tokens a row does not share (at least 1),
        so rows sharing more re-run a few cached tokens."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        n_rows, width = ids.shape
        end = width - leave
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        start, cache = 0, None
        if reuse is not None:
            lens = [int(n) - leave for n in mask.sum(-1).tolist()]  # real tokens up to ``end``
            shared = [
                min(row.common_prefix(ids[i, end - n : end].tolist()), n - 1)
                for i, (row, n) in enumerate(zip(reuse, lens))
            ]
            run = max(n - c for n, c in zip(lens, shared))
            start = end - run
            keep = [max(n - run, 0) for n in lens]  # cached tokens each row takes (<= shared)
            if start > 0 and max(keep) > 0:
                layers = []
                for li, (k0, v0) in enumerate(reuse[0].kv):
                    k = k0.new_zeros((n_rows, k0.shape[1], start, k0.shape[3]))
                    v = v0.new_zeros((n_rows, v0.shape[1], start, v0.shape[3]))
                    for i, (row, n) in enumerate(zip(reuse, keep)):
                        if n:
                            k[i, :, start - n :] = row.kv[li][0][0, :, :n]
                            v[i, :, start - n :] = row.kv[li][1][0, :, :n]
                    layers.append((k, v))
                cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)
            else:
                start = 0
        cols = ids[:, start:end]
        if start == 0 or (cols == self.bundle.image_token_id).any():
            emb = self._embed(batch)[:, start:end]  # photos among the columns run: their features
        else:
            emb = self.model.get_input_embeddings()(cols)
        return self.model(
            inputs_embeds=emb,
            attention_mask=mask[:, :end],
            position_ids=pos[:, start:end],
            past_key_values=cache,
            use_cache=True,
        )

    @staticmethod
    def _verbal(thought_text: str, task: str) -> Thought:
        return parse_output(thought_text, task).thought

    # --------------------------------------------------------------------------- tasks
    @torch.no_grad()
    def tool_field_posterior(
        self, example: Mapping[str, Any], thought: str, shown: Sequence[str], reuse: CachedRow | None = None
    ) -> list[tuple[str, float]]:
        """The thought under each value its ``Tools:`` field can take with ``shown`` tools in the
        prompt, and the model's probability of that value given the prompt and the thought before
        it, normalised over the values; likeliest first. The rest of the thought (the confidence) is
        kept as written. ``[(thought, 1.0)]`` when no tool is shown or the thought has no field."""
        alts = tool_alternatives(thought, shown)
        if not alts:
            return [(thought, 1.0)]
        # The thought is tokenized whole, as in training; its shared head cancels in the softmax.
        conts = [self.tok(head, add_special_tokens=False)["input_ids"] for head, _ in alts]
        lp = self._continuation_logprobs(example, "", conts, len(conts), reuse)
        p = np.exp(lp - lp.max())
        p /= p.sum()
        return [(alts[j][1], float(p[j])) for j in np.argsort(-p, kind="stable")]

    @torch.no_grad()
    def rank_catalog(
        self,
        examples: Sequence[Mapping[str, Any]],
        trie: ItemTrie,
        k: int = 10,
        thoughts: Sequence[str] | None = None,
        shown_tools: Sequence[Sequence[str]] | None = None,
    ) -> list[VLMOutput]:
        """Sequential recommendation: top-``k`` items of the whole catalog per example.
        ``shown_tools`` (the tools whose answers each prompt shows) with ``thought_tool_sets`` = N > 0:
        the items' probabilities are mixed over the N likeliest values of the thought's tool field
        (weights renormalised over those N) instead of taken under the greedy thought alone."""
        t0 = time.perf_counter()
        thoughts, reuse = self._with_thoughts(examples, thoughts)
        top = self.cfg.thought_tool_sets
        if top > 0 and shown_tools is not None and any(shown_tools):
            ranked = self._mixed_items(examples, trie, k, thoughts, shown_tools, top, reuse)
        else:
            ranked = self._beam_items(examples, trie, k, thoughts, reuse)
        results, ms = [], (time.perf_counter() - t0) * 1000 / len(examples)
        for thought, (items, item_scores) in zip(thoughts, ranked):
            th = self._verbal(thought, "sequential")
            results.append(
                VLMOutput(
                    "sequential",
                    items=items,
                    scores=item_scores,
                    conf_verbal=th.confidence,
                    thought=th,
                    thought_text=thought,
                    conf_token=float(min(max(math.exp(item_scores[0]), 0.0), 1.0)) if items else 0.0,
                    latency_ms=ms,
                )
            )
        return results

    def _mixed_items(self, examples, trie, k, thoughts, shown_tools, top, reuse=None) -> list:
        rows, owner, log_w = [], [], []
        for i, (ex, thought, shown) in enumerate(zip(examples, thoughts, shown_tools)):
            post = self.tool_field_posterior(ex, thought, shown, reuse[i] if reuse else None)[:top]
            mass = sum(p for _, p in post)
            for alt, p in post:
                rows.append(alt)
                owner.append(i)
                log_w.append(math.log(max(p / mass, 1e-300)))
        scores: list[dict[int, float]] = [{} for _ in examples]
        ranked = self._beam_items(
            [examples[i] for i in owner], trie, k, rows, [reuse[i] for i in owner] if reuse else None
        )
        # An item outside one thought's beams gets no probability from that thought (a lower bound).
        for i, w, (items, item_scores) in zip(owner, log_w, ranked):
            for iid, s in zip(items, item_scores):
                scores[i][iid] = float(np.logaddexp(scores[i].get(iid, -np.inf), w + s))
        out = []
        for sc in scores:
            items = sorted(sc, key=lambda it: -sc[it])[:k]
            out.append((items, [sc[it] for it in items]))
        return out

    def _beam_items(self, examples, trie, k, thoughts, reuse=None) -> list[tuple[list[int], list[float]]]:
        """Constrained beam search over the catalog trie after each (prompt + thought): the top-``k``
        items and their log-probabilities within the catalog. ``reuse``: the thought pass's cached
        rows (:meth:`_prefill`)."""
        beams = max(self.cfg.num_beams, k)
        batch = self._prompts(examples, thoughts)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        # Prefill the prompt (with photos) ONCE per row, then copy its KV cache to the beams:
        # beam search would otherwise re-encode the whole prompt num_beams times. generate() then
        # only runs the last prompt token (text, already cached photos need no pixels).
        cache = self._prefill(batch, reuse, leave=1).past_key_values
        cache.batch_repeat_interleave(beams)
        proc = TrieConstraint(trie)
        # early_stopping="never" with length_penalty=0 is canonical beam search: it stops only when
        # no running beam can beat the worst finished one. early_stopping=True stopped as soon as
        # every slot looked finished and could return fewer than k items, long titles missing (the small
        # model on the synthetic world: 7-9 of 10 items for 73 of 147 queries; tests/test_vlm.py).
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            past_key_values=cache,
            do_sample=False,
            num_beams=beams,
            num_return_sequences=beams,
            max_new_tokens=trie.depth,
            length_penalty=0.0,
            early_stopping="never",
            logits_processor=LogitsProcessorList([proc]),
            return_dict_in_generate=True,
            output_scores=True,
            **self._gen_kwargs(),
        )
        seqs, scores = out.sequences[:, ids.shape[1] :], out.sequences_scores
        ranked = []
        for i in range(len(examples)):
            items, item_scores = [], []
            for j in range(i * beams, (i + 1) * beams):
                if not float(scores[j]) > -1e8:  # filler beams (fewer live paths than beams)
                    continue
                for iid in trie.items(seqs[j].tolist()):
                    if iid not in items:
                        items.append(iid)
                        item_scores.append(float(scores[j]) + trie.log_share[iid])
            order = np.argsort(-np.asarray(item_scores), kind="stable")[:k]
            ranked.append(([items[o] for o in order], [item_scores[o] for o in order]))
        return ranked

    @torch.no_grad()
    def _continuation_logprobs(
        self, example, prefix: str, continuations: list[list[int]], chunk: int, reuse: CachedRow | None = None
    ) -> np.ndarray:
        """Summed log-probs of each token sequence after the (prompt + prefix) of one example;
        the prompt is prefilled once (from ``reuse``, the thought pass's cached row, where it
        matches) and its KV cache copied per chunk of continuations."""
        batch = self._prompts([example], [prefix])
        n_prompt = batch["input_ids"].shape[1]
        pre = self._prefill(batch, None if reuse is None else [reuse])
        first = torch.log_softmax(pre.logits[0, -1].float(), dim=-1)
        totals = np.zeros(len(continuations))
        for lo in range(0, len(continuations), chunk):
            part = continuations[lo : lo + chunk]
            n, width = len(part), max(len(s) for s in part)
            ids = torch.full((n, width), self.collator.pad_id, dtype=torch.long)
            mask = torch.zeros((n, width), dtype=torch.long)
            for r, s in enumerate(part):
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            cache = copy.deepcopy(pre.past_key_values)
            cache.batch_repeat_interleave(n)
            attn = torch.cat([torch.ones((n, n_prompt), dtype=torch.long, device=self.device), mask], dim=1)
            pos = (n_prompt + torch.arange(width, device=self.device)).unsqueeze(0).expand(n, -1)
            out = self.model(
                input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True
            )
            logp = torch.log_softmax(out.logits.float(), dim=-1)
            # token 0 is predicted by the prompt's last position, token j by continuation j-1
            tok_lp = torch.cat([first[ids[:, :1]], logp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)], 1)
            totals[lo : lo + n] = (tok_lp * mask).sum(1).cpu().numpy()
        return totals

    @torch.no_grad()
    def score_candidates(
        self,
        examples: Sequence[Mapping[str, Any]],
        candidate_texts: Sequence[Sequence[str]],
        candidate_ids: Sequence[Sequence[int]],
        thoughts: Sequence[str] | None = None,
        chunk: int = 16,
        candidate_prior: Sequence[Sequence[float]] | None = None,
    ) -> list[VLMOutput]:
        """Direct recommendation: rank each example's candidates by answer log-likelihood
        (candidates with the same text split its likelihood by ``candidate_prior``)."""
        t0 = time.perf_counter()
        thoughts, reuse = self._with_thoughts(examples, thoughts)
        eos = self.tok.eos_token_id
        results = []
        priors = candidate_prior if candidate_prior is not None else [None] * len(examples)
        rows = reuse if reuse is not None else [None] * len(examples)
        for ex, thought, texts, ids, prior, row in zip(
            examples, thoughts, candidate_texts, candidate_ids, priors, rows
        ):
            # Each distinct text is scored once: candidates that share a title have its likelihood.
            keys = [t.strip() for t in texts]
            uniq = list(dict.fromkeys(keys))
            conts = [self.tok(" " + t, add_special_tokens=False)["input_ids"] + [eos] for t in uniq]
            lp_text = dict(zip(uniq, self._continuation_logprobs(ex, thought, conts, chunk, row)))
            lp = np.array([lp_text[k] for k in keys]) + shared_text_log_share(texts, prior)
            order = np.argsort(-lp, kind="stable")
            probs = np.exp(lp - lp.max())
            probs /= probs.sum()
            th = self._verbal(thought, "direct")
            results.append(
                VLMOutput(
                    "direct",
                    items=[int(ids[o]) for o in order],
                    scores=[float(lp[o]) for o in order],
                    text=texts[order[0]],
                    conf_verbal=th.confidence,
                    conf_token=float(probs[order[0]]),
                    thought=th,
                    thought_text=thought,
                )
            )
        ms = (time.perf_counter() - t0) * 1000 / max(len(results), 1)
        for r in results:
            r.latency_ms = ms
        return results

    @torch.no_grad()
    def ctr(self, examples: Sequence[Mapping[str, Any]], thoughts: Sequence[str] | None = None) -> list[VLMOutput]:
        """Click probability from the yes/no answer-token probabilities."""
        t0 = time.perf_counter()
        thoughts, reuse = self._with_thoughts(examples, thoughts)
        batch = self._prompts(examples, thoughts)
        if self.yes_no_common:  # left-padded rows: the common answer tokens go at the end
            common = torch.tensor(self.yes_no_common, device=self.device).expand(len(examples), -1)
            batch["input_ids"] = torch.cat([batch["input_ids"], common], dim=1)
            batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(common)], dim=1)
        out = self._prefill(batch, reuse)  # left padding: positions start at each row's first token
        two = out.logits[:, -1, [self.yes_id, self.no_id]].float()
        p_yes = torch.softmax(two, dim=-1)[:, 0].cpu().numpy()
        ms = (time.perf_counter() - t0) * 1000 / len(examples)
        results = []
        for p, thought in zip(p_yes, thoughts):
            th = self._verbal(thought, "ctr")
            results.append(
                VLMOutput(
                    "ctr",
                    prob=float(p),
                    text="yes" if p >= 0.5 else "no",
                    conf_verbal=th.confidence,
                    conf_token=float(max(p, 1 - p)),
                    thought=th,
                    thought_text=thought,
                    latency_ms=ms,
                )
            )
        return results

    @torch.no_grad()
    def explain(
        self,
        examples: Sequence[Mapping[str, Any]],
        thoughts: Sequence[str] | None = None,
        max_new_tokens: int | None = None,
    ) -> list[VLMOutput]:
        """Explanation generation (greedy)."""
        t0 = time.perf_counter()
        thoughts, reuse = self._with_thoughts(examples, thoughts)
        batch = self._prompts(examples, thoughts)
        if reuse is None:
            start = {"inputs_embeds": self._embed(batch)}
        else:  # the prompt from the thought's cache; generate() runs the last token
            start = {"input_ids": batch["input_ids"], "past_key_values": self._prefill(batch, reuse, 1).past_key_values}
        out = self.model.generate(
            **start,
            attention_mask=batch["attention_mask"],
            max_new_tokens=max_new_tokens or self.cfg.max_explanation_tokens,
            do_sample=False,
            num_beams=1,
            return_dict_in_generate=True,
            output_scores=True,
            **self._gen_kwargs(),
        )
        steps = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.scores], dim=1)  # [B, T, V]
        gen = out.sequences[:, -steps.shape[1] :]
        tok_lp = steps.gather(-1, gen.unsqueeze(-1)).squeeze(-1)
        eos = self.tok.eos_token_id
        ms = (time.perf_counter() - t0) * 1000 / len(examples)
        results = []
        for i, thought in enumerate(thoughts):
            row = gen[i].tolist()
            n = row.index(eos) + 1 if eos in row else len(row)
            mean_lp = float(tok_lp[i, :n].mean()) if n else -math.inf
            th = self._verbal(thought, "explanation")
            results.append(
                VLMOutput(
                    "explanation",
                    text=self.tok.decode(row[:n], skip_special_tokens=True).strip(),
                    conf_verbal=th.confidence,
                    conf_token=float(math.exp(mean_lp)),
                    thought=th,
                    thought_text=thought,
                    latency_ms=ms,
                )
            )
        return results


# ------------------------------------------------------------------------ calibration
def calibration_report(outputs: Sequence[VLMOutput], correct: Sequence[bool | int], n_bins: int = 10) -> dict:
    """ECE of the verbalised and of the token-probability confidences, plus coverage of the
    verbalised one (share of outputs that stated a confidence)."""
    verbal = [o.conf_verbal for o in outputs]
    return {
        "ece_verbal": expected_calibration_error(verbal, correct, n_bins),
        "ece_token": expected_calibration_error([o.conf_token for o in outputs], correct, n_bins),
        "verbal_coverage": float(np.mean([v is not None for v in verbal])) if verbal else float("nan"),
        "n": len(outputs),
    }
