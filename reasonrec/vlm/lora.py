"""LoRA (peft) on a built VLM: what is trained, the peft config, and wrapping the model.

LoRA targets the language model's attention projections only (``vlm.lora.target_modules``,
matched under ``language_model`` so CLIP's identically named q/k/v stay frozen); the projector
(``train_projector``) and a randomly initialised vision tower (``train_vision_tower=auto``) are
trained in full and saved with the adapter (peft ``modules_to_save``).

Building the base model, and saving/loading adapters with the config that built it, stay in
:mod:`reasonrec.vlm.builder`, which imports this module (not the other way round).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reasonrec.vlm.builder import VLMBundle


def _train_vision(bundle: VLMBundle) -> bool:
    mode = bundle.config.lora.train_vision_tower
    if mode not in ("auto", "yes", "no"):
        raise ValueError("vlm.lora.train_vision_tower must be auto, yes or no")
    return bundle.random_vision_tower if mode == "auto" else mode == "yes"


def lora_config(bundle: VLMBundle):
    from peft import LoraConfig

    lc = bundle.config.lora
    names = "|".join(sorted(set(lc.target_modules)))
    modules_to_save = (
        (["multi_modal_projector"] if lc.train_projector else [])
        + (["vision_tower"] if _train_vision(bundle) else [])
        + list(lc.modules_to_save)
    )
    return LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        # A regex keeps LoRA on the language model: CLIP's attention uses the same q/k/v names.
        target_modules=rf".*language_model.*\.({names})",
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
    )


def apply_lora(bundle: VLMBundle) -> VLMBundle:
    """Wrap ``bundle.model`` with fresh LoRA adapters (no-op when it already has them)."""
    from peft import get_peft_model

    if bundle.is_peft:
        return bundle
    bundle.rewrap(lambda model: get_peft_model(model, lora_config(bundle)))
    return bundle


def attach_adapter(bundle: VLMBundle, path: str | os.PathLike, is_trainable: bool = False) -> VLMBundle:
    """Wrap ``bundle.model`` (a base model without LoRA) with the adapter saved at ``path``."""
    from peft import PeftModel

    bundle.rewrap(lambda model: PeftModel.from_pretrained(model, str(path), is_trainable=is_trainable))
    if not is_trainable:
        bundle.model.eval()
    return bundle
