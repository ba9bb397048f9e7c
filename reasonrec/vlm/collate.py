"""Instruction examples -> model inputs.

An example is ``{"prompt": str with image placeholders, "images": [PIL | bytes | None, ...],
"target": str}`` (``target`` optional at inference). The prompt is wrapped in the tokenizer's chat
template (user turn, generation prompt), each placeholder is expanded to ``tokens_per_image``
image tokens (the model pools each photo to that many features), and the target is appended as
the assistant turn. Labels are -100 on the prompt and padding: the loss is on the assistant part
only (thought tokens, answer, end-of-turn).

The target is tokenized in two pieces, the thought up to the ``Answer:`` marker and the answer,
exactly as inference scores answers after a generated thought, so answer tokens match.

Too long? The target is capped at ``max_target_tokens``; then prompt tokens are cut right after
the first ``truncation_head_tokens`` (chat header, user id, description survive; the oldest
history goes first). A cut never splits a photo: every image it touches is removed whole, with
its pixels.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from reasonrec.prompts.cot import split_target
from reasonrec.vlm.builder import VLMBundle

_SENTINEL = "\x00PROMPT\x00"


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    images: list[Image.Image]


class VLMCollator:
    """Callable collate function for a DataLoader; also used by inference (``encode_prompts``).

    ``bad_images`` counts photos that could not be decoded (replaced by a grey image so the
    example still trains; the caller reports the count)."""

    def __init__(self, bundle: VLMBundle, max_length: int | None = None, max_target_tokens: int | None = None):
        cfg = bundle.config
        self.bundle = bundle
        self.tok = bundle.tokenizer
        self.max_length = max_length or cfg.max_length
        self.max_target_tokens = max_target_tokens or cfg.max_target_tokens
        self.head = cfg.truncation_head_tokens
        self.n_img = bundle.tokens_per_image
        self.image_token = bundle.image_token
        self.image_token_id = bundle.image_token_id
        self.eos_id = self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        self.prefix, self.suffix = self._chat_frame(cfg.system_prompt)
        bos = self.tok.bos_token
        # Add the tokenizer's own specials (e.g. Llama's <s>) unless the template writes them.
        self.add_special = not (bos and self.prefix.startswith(bos))
        self.bad_images = 0
        side = getattr(bundle.image_processor, "crop_size", None) or {}
        self._blank_size = (side.get("width", 224), side.get("height", 224)) if isinstance(side, dict) else (224, 224)

    # ----------------------------------------------------------------------- text pieces
    def _chat_frame(self, system: str | None) -> tuple[str, str]:
        """Render the chat template once around a sentinel -> (text before, text after)."""
        tok = self.tok
        attempts = []
        if system:
            attempts.append([{"role": "system", "content": system}, {"role": "user", "content": _SENTINEL}])
        attempts.append([{"role": "user", "content": _SENTINEL}])
        attempts.append([{"role": "user", "content": [{"type": "text", "text": _SENTINEL}]}])
        if tok.chat_template:
            for msgs in attempts:
                try:
                    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
                except Exception:  # templates differ in what they accept (system role, content lists)
                    continue
                if isinstance(text, str) and text.count(_SENTINEL) == 1:
                    before, after = text.split(_SENTINEL)
                    return before, after
        return "USER: ", "\nASSISTANT:"  # LLaVA-1.5 convention when no template exists

    def _ids(self, text: str, special: bool = False) -> list[int]:
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def prompt_ids(self, prompt: str, assistant_prefix: str = "") -> list[int]:
        """Chat-framed prompt with expanded image placeholders (+ optional assistant text that
        was already generated, e.g. the thought up to ``Answer:``)."""
        expanded = prompt.replace(self.image_token, self.image_token * self.n_img)
        ids = self._ids(self.prefix + expanded + self.suffix, special=self.add_special)
        if assistant_prefix:
            ids = ids + self._ids(assistant_prefix)
        return ids

    def target_ids(self, target: str) -> list[int]:
        thought, answer = split_target(target)
        ids = (self._ids(thought) if thought else []) + self._ids(answer)
        ids = ids[: max(self.max_target_tokens - 1, 1)]
        return ids + [self.eos_id]

    # --------------------------------------------------------------------------- images
    def _image(self, img: Any) -> Image.Image:
        try:
            if isinstance(img, Image.Image):
                return img.convert("RGB")
            if isinstance(img, (bytes, bytearray, memoryview)):
                with Image.open(io.BytesIO(bytes(img))) as im:
                    return im.convert("RGB")
            if isinstance(img, np.ndarray):
                return Image.fromarray(img.astype(np.uint8)).convert("RGB")
        except Exception:  # corrupt bytes: counted and replaced, the example still trains
            pass
        self.bad_images += 1
        return Image.new("RGB", self._blank_size, (127, 127, 127))

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor | None:
        if not images:
            return None
        out = self.bundle.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return out.to(self.bundle.base_model.dtype)

    # ---------------------------------------------------------------------- truncation
    def _cut_prompt(self, ids: list[int], n_cut: int) -> tuple[list[int], set[int]]:
        """Remove ``n_cut`` prompt tokens after the head, widened to whole photos. Returns the new
        ids and the indices of the photos removed."""
        arr = np.asarray(ids)
        tail = len(self._ids(self.suffix))
        start = min(self.head, max(len(arr) - tail - n_cut, 0))
        end = min(start + n_cut, len(arr))
        img_pos = np.flatnonzero(arr == self.image_token_id)
        img_of = np.arange(len(img_pos)) // max(self.n_img, 1)  # photo index of each image token
        touched = set(img_of[(img_pos >= start) & (img_pos < end)].tolist())
        if touched:
            sel = np.isin(img_of, list(touched))
            start = min(start, int(img_pos[sel].min()))
            end = max(end, int(img_pos[sel].max()) + 1)
        return arr[:start].tolist() + arr[end:].tolist(), touched

    # ----------------------------------------------------------------------------- encode
    def encode(self, example: Mapping[str, Any], with_target: bool = True, assistant_prefix: str = "") -> Encoded:
        prompt = example["prompt"]
        raw_images = list(example.get("images") or [])
        n_slots = prompt.count(self.image_token)
        if n_slots != len(raw_images):
            raise ValueError(f"prompt has {n_slots} image placeholders but {len(raw_images)} images were given")
        images = [self._image(im) for im in raw_images]
        p_ids = self.prompt_ids(prompt, assistant_prefix)
        t_ids = self.target_ids(example["target"]) if with_target and example.get("target") is not None else []
        over = len(p_ids) + len(t_ids) - self.max_length
        if over > 0:
            p_ids, dropped = self._cut_prompt(p_ids, over)
            images = [im for i, im in enumerate(images) if i not in dropped]
            if len(p_ids) + len(t_ids) > self.max_length:  # prompt alone still too long: cap the target
                t_ids = t_ids[: max(self.max_length - len(p_ids), 0)]
        labels = [-100] * len(p_ids) + list(t_ids)
        return Encoded(input_ids=p_ids + list(t_ids), labels=labels, images=images)

    def _pad(self, seqs: list[list[int]], value: int, left: bool) -> torch.Tensor:
        n = max(len(s) for s in seqs)
        out = torch.full((len(seqs), n), value, dtype=torch.long)
        for i, s in enumerate(seqs):
            if s:
                if left:
                    out[i, n - len(s) :] = torch.tensor(s)
                else:
                    out[i, : len(s)] = torch.tensor(s)
        return out

    def batch(self, encoded: list[Encoded], left_pad: bool = False, with_labels: bool = True) -> dict:
        ids = [e.input_ids for e in encoded]
        out = {
            "input_ids": self._pad(ids, self.pad_id, left_pad),
            "attention_mask": self._pad([[1] * len(s) for s in ids], 0, left_pad),
        }
        if with_labels:
            out["labels"] = self._pad([e.labels for e in encoded], -100, left_pad)
        pv = self.pixel_values([im for e in encoded for im in e.images])
        if pv is not None:
            out["pixel_values"] = pv
        return out

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict:
        """Training batch: right-padded input_ids, attention_mask, labels, pixel_values."""
        return self.batch([self.encode(ex) for ex in examples])

    def encode_prompts(
        self, examples: Sequence[Mapping[str, Any]], assistant_prefixes: Sequence[str] | None = None
    ) -> dict:
        """Inference batch: left-padded prompts (no labels), optionally continued by assistant text."""
        prefixes = assistant_prefixes or [""] * len(examples)
        enc = [self.encode(ex, with_target=False, assistant_prefix=p) for ex, p in zip(examples, prefixes)]
        return self.batch(enc, left_pad=True, with_labels=False)
