"""Curriculum LoRA fine-tune of the VLM: data, one worker's training loop, checkpoints, reload.

Ray-free: ``ray_jobs/finetune.py`` runs :class:`FinetuneLoop` on every Ray Train worker (rank,
world size and a DDP wrapper come from there); tests and benchmarks run it in-process.

* Data: the ``instructions`` stage's examples; photos are looked up by item id in the prepared
  ``items`` table (only the items the examples reference), never copied per example.
* Sampling: :class:`~reasonrec.vlm.curriculum.CurriculumSampler` over the examples' ``phase`` (EH
  bucket). One optimizer step consumes a global batch of ``per_device_batch_size * grad_accum *
  world_size`` examples; each rank takes its own equal slice, split into ``grad_accum``
  micro-batches (``DataLoader(batch_size=per_device_batch_size)`` over the rank's slice).
* Optimisation: AdamW + the phase-aligned LR schedule from ``reasonrec.vlm.curriculum``, gradient
  accumulation (DDP gradient sync only on the last micro-batch), gradient clipping, optional bf16
  mixed precision (``torch.autocast`` around the forward; backward and the update in full precision).
* Determinism: the LoRA init is seeded, the sampler is a pure function of (seed, step), and the
  dropout RNG is reseeded from (seed, step, rank) every step, so a run resumed from a checkpoint
  (adapter + optimizer + scheduler + step) continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, Dataset

from reasonrec.data.catalog import Catalog, load_catalog
from reasonrec.metrics import hit_at_k, ndcg_at_k
from reasonrec.prompts.cot import parse_output
from reasonrec.vlm.builder import VLMBundle, build_vlm, load_adapter, save_adapter
from reasonrec.vlm.collate import VLMCollator
from reasonrec.vlm.config import CurriculumConfig, VLMConfig
from reasonrec.vlm.curriculum import CurriculumSampler, make_lr_scheduler, make_optimizer, phase_at
from reasonrec.vlm.infer import ItemTrie, VLMPredictor

STAGE = "finetune"
INSTRUCTIONS_STAGE = "instructions"
INSTRUCTIONS_TABLE = "examples"  # {run}/instructions/examples/*.parquet
ADAPTER_DIR = "adapter"  # inside a checkpoint and inside the finetune stage
TRAINER_STATE = "trainer_state.pt"
PHASE_NAMES = {1: "warmup", 2: "progressive", 3: "cold_start"}
AUTOCAST_DTYPES = {"none": None, "bfloat16": torch.bfloat16}  # finetune.autocast -> compute dtype
AUTOCAST_CHOICES = (*AUTOCAST_DTYPES, "auto")  # "auto": bf16 where the hardware has it
log = logging.getLogger(__name__)
_COLUMNS = ["example_id", "task", "split", "phase", "prompt", "image_items", "target"]


# ------------------------------------------------------------------------------------ data
@dataclass
class FinetuneData:
    """Instruction examples (train and valid rows, ordered by example_id), the photos they use and
    the catalog (item texts and popularity) that ranking validation ranks."""

    train: pa.Table
    valid: pa.Table
    images: dict[int, bytes | None]
    catalog: Catalog | None = None


def finetune_data(examples: pa.Table, items: pa.Table, catalog: Catalog | None = None) -> FinetuneData:
    """Split instruction rows by ``split`` and keep the photos of the referenced items only."""
    examples = examples.select(_COLUMNS).sort_by("example_id")
    used = pc.unique(pc.list_flatten(examples.column("image_items")))
    items = items.filter(pc.is_in(items.column("item_id"), value_set=used))
    images = dict(zip(items.column("item_id").to_pylist(), items.column("image").to_pylist()))
    missing = set(used.to_pylist()) - set(images)
    if missing:
        raise ValueError(
            f"instruction examples reference {len(missing)} item(s) missing from the items "
            f"table, e.g. {sorted(missing)[:5]}"
        )
    split = examples.column("split")
    train, valid = examples.filter(pc.equal(split, "train")), examples.filter(pc.equal(split, "valid"))
    if train.num_rows == 0:
        raise ValueError("no instruction examples with split == 'train'")
    return FinetuneData(train=train, valid=valid, images=images, catalog=catalog)


def load_finetune_data(store, with_catalog: bool = False) -> FinetuneData:
    """Read the ``instructions`` stage, the photos it references (the ``images`` stage's, else
    ``prepare/items``'s) and, for ranking validation (``with_catalog``), the catalog's texts."""
    examples = store.read_table(INSTRUCTIONS_STAGE, INSTRUCTIONS_TABLE, columns=_COLUMNS)
    from reasonrec.data.images import item_photos  # the images stage's photos, else prepare's bytes

    used = pc.unique(pc.list_flatten(examples.column("image_items")))
    items = item_photos(store, used)
    return finetune_data(examples, items, load_catalog(store, photos=False) if with_catalog else None)


class InstructionDataset(Dataset):
    """Examples in the collator's format, photos resolved from the shared lookup."""

    def __init__(self, table: pa.Table, images: dict[int, bytes | None]):
        self.prompts = table.column("prompt").to_pylist()
        self.targets = table.column("target").to_pylist()
        self.image_items = table.column("image_items").to_pylist()
        self.example_ids = table.column("example_id").to_pylist()
        self.images = images

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {
            "prompt": self.prompts[i],
            "target": self.targets[i],
            "example_id": self.example_ids[i],
            "images": [self.images[j] for j in self.image_items[i] or ()],
        }


def valid_subset(n: int, max_examples: int, seed: int) -> np.ndarray:
    """Indices of the validation examples scored: all, or a seeded sample of ``max_examples``."""
    if max_examples <= 0 or n <= max_examples:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 3]).choice(n, max_examples, replace=False))


# ---------------------------------------------------------------------------- training
@dataclass
class StepMetrics:
    """One optimizer step, over all ranks."""

    step: int  # 0-based index of the step just taken
    phase: int  # curriculum phase (1 warm-up, 2 progressive, 3 cold-start)
    loss: float  # mean training loss over ranks and micro-batches
    lr: float  # learning rate the step used
    tokens: int  # input tokens (prompt + image + target, no padding), all ranks
    seconds: float
    tokens_per_s: float
    example_ids: list  # this rank's examples in this step (its slice of the global batch)


def native_bf16(device: torch.device | str) -> bool:
    """Whether bf16 matmuls have fast kernels on ``device``. oneDNN has them from AVX-512 on (native
    with AVX-512 BF16 or AMX); an AVX2-only CPU emulates bf16, and there a ``small`` VLM training
    step under bf16 autocast was many times slower than in fp32 (BENCHMARKS.md)."""
    d = torch.device(device)
    if d.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if d.type == "cpu":
        # oneDNN's own ISA check, the one torch's bf16 CPU tests use; torch has no public API for it.
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a torch build without oneDNN: no fast bf16 either
            return False
    return True  # other accelerators: trust the setting


def resolve_autocast(device: torch.device | str, mode: str) -> str:
    """``finetune.autocast`` as this worker runs it: ``"auto"`` becomes ``"bfloat16"`` where
    :func:`native_bf16`, else ``"none"``; an explicit ``"bfloat16"`` on emulating hardware is kept
    (it was asked for) with a warning, because the fine-tune will be many times slower."""
    if mode not in AUTOCAST_CHOICES:
        raise ValueError(f"finetune.autocast={mode!r}: expected one of {sorted(AUTOCAST_CHOICES)}")
    if mode == "none":
        return mode
    native = native_bf16(device)
    if mode == "auto":
        return "bfloat16" if native else "none"
    if not native:
        log.warning(
            "finetune.autocast=bfloat16 on a %s without bf16 kernels: bf16 is emulated there and a "
            "training step is many times slower than in fp32 (BENCHMARKS.md); "
            "set finetune.autocast=auto or none",
            torch.device(device).type,
        )
    return mode


def training_autocast(device: torch.device | str, mode: str) -> torch.autocast:
    """The training forward's precision context for ``finetune.autocast`` (``"none"``: disabled;
    ``"auto"``: see :func:`resolve_autocast`)."""
    mode = resolve_autocast(device, mode) if mode == "auto" else mode
    if mode not in AUTOCAST_DTYPES:
        raise ValueError(f"finetune.autocast={mode!r}: expected one of {sorted(AUTOCAST_CHOICES)}")
    dtype = AUTOCAST_DTYPES[mode]
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class FinetuneLoop:
    """One worker's view of the fine-tune. ``wrap`` (e.g. Ray Train's ``prepare_model``) wraps
    the model for data-parallel training after the optimizer is built; checkpoints always save
    the unwrapped peft model."""

    def __init__(
        self,
        data: FinetuneData,
        vlm_cfg: VLMConfig,
        cur_cfg: CurriculumConfig,
        max_steps: int,
        per_device_batch_size: int,
        grad_accum: int = 1,
        grad_clip: float = 1.0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        autocast: str = "none",
    ):
        if not vlm_cfg.lora.enabled:
            raise ValueError("the fine-tune trains a LoRA adapter: set vlm.lora.enabled=true")
        self.autocast = resolve_autocast(device, autocast)  # an unknown value fails here, not at the first step
        self.cur = cur_cfg
        self.max_steps, self.per_device, self.grad_accum = int(max_steps), int(per_device_batch_size), int(grad_accum)
        self.grad_clip, self.rank, self.world_size = grad_clip, rank, world_size
        self.device = torch.device(device)
        with torch.random.fork_rng():
            torch.manual_seed(cur_cfg.seed)  # the LoRA init draws from the global RNG
            self.bundle: VLMBundle = build_vlm(vlm_cfg)
        self.bundle.model.to(self.device)
        self.model = self.bundle.model
        self.collator = VLMCollator(self.bundle)
        self.train_set = InstructionDataset(data.train, data.images)
        self.valid_set = InstructionDataset(data.valid, data.images)
        self.valid_task = data.valid.column("task").to_pylist()
        self.valid_bucket = data.valid.column("phase").to_pylist()
        self.catalog = data.catalog
        self._ranker: tuple[VLMPredictor, ItemTrie] | None = None  # built on first use
        self.sampler = CurriculumSampler(
            data.train.column("phase").to_numpy(zero_copy_only=False),
            self.max_steps,
            self.per_device * self.grad_accum,
            cur_cfg,
            rank=rank,
            world_size=world_size,
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, cur_cfg)
        self.scheduler = make_lr_scheduler(self.optimizer, self.max_steps, cur_cfg)
        self.step = 0

    # -------------------------------------------------------------------------- helpers
    def wrap(self, fn: Callable) -> None:
        self.model = fn(self.model)

    def _collate(self, examples: list[dict]) -> tuple[list, dict]:
        return [e["example_id"] for e in examples], self.collator(examples)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items()}

    def _all_sum(self, values: Sequence[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if _dist():
            if torch.distributed.get_backend() == "nccl":
                t = t.to(self.device)
            torch.distributed.all_reduce(t)
        return t.cpu().tolist()

    # ------------------------------------------------------------------------- training
    def train_steps(
        self,
        end_step: int | None = None,
        on_step: Callable[[StepMetrics], None] | None = None,
        time_budget_s: float = 0.0,
        elapsed_s: float = 0.0,
    ) -> int:
        """Train from ``self.step`` to ``end_step`` (default: ``max_steps``). Stops early, on every
        rank at the same step, once ``elapsed_s`` + this call's training seconds exceed
        ``time_budget_s`` (0 = no budget); trains nothing when ``elapsed_s`` already has. Training
        seconds are the steps' own, what ``StepMetrics.seconds`` reports and the job sums into
        ``train_seconds``: time spent in ``on_step`` (checkpoints, validations) is not counted, so
        a resumed run meets its budget at the same step as one that never stopped. Returns the
        step reached."""
        end = self.max_steps if end_step is None else min(end_step, self.max_steps)
        if self.step >= end or (time_budget_s and elapsed_s >= time_budget_s):
            return self.step
        self.sampler.set_start_step(self.step)
        loader = DataLoader(self.train_set, batch_size=self.per_device, sampler=self.sampler, collate_fn=self._collate)
        micro = iter(loader)
        ddp = isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        spent = 0.0
        self.model.train()
        for step in range(self.step, end):
            t0 = time.perf_counter()
            torch.manual_seed(self.cur.seed * 1_000_003 + step * 1_009 + self.rank)  # dropout, resumable
            lr = self.optimizer.param_groups[0]["lr"]
            loss_sum, tokens, ids = 0.0, 0, []
            for k in range(self.grad_accum):
                batch_ids, batch = next(micro)
                batch = self._to_device(batch)
                sync = not ddp or k == self.grad_accum - 1
                with contextlib.nullcontext() if sync else self.model.no_sync():
                    with training_autocast(self.device, self.autocast):
                        loss = self.model(**batch).loss
                    (loss / self.grad_accum).backward()  # outside autocast, as torch recommends
                loss_sum += float(loss.detach())
                tokens += int(batch["attention_mask"].sum())
                ids += batch_ids
            if self.grad_clip and self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step = step + 1
            seconds = time.perf_counter() - t0
            spent += seconds
            over = bool(time_budget_s) and elapsed_s + spent > time_budget_s
            g_loss, g_n, g_tokens, g_over = self._all_sum([loss_sum, self.grad_accum, tokens, float(over)])
            if on_step is not None:
                on_step(
                    StepMetrics(
                        step=step,
                        phase=phase_at(step, self.max_steps, self.cur),
                        loss=g_loss / g_n,
                        lr=lr,
                        tokens=int(g_tokens),
                        seconds=seconds,
                        tokens_per_s=g_tokens / max(seconds, 1e-9),
                        example_ids=ids,
                    )
                )
            if g_over:
                break
        return self.step

    @torch.no_grad()
    def validation_loss(self, max_examples: int = 0) -> float | None:
        """Token-weighted loss on the valid examples (each rank scores its share; summed over
        ranks). None when there are no valid examples."""
        idx = valid_subset(len(self.valid_set), max_examples, self.cur.seed)
        if len(idx) == 0:
            return None
        return dataset_loss(
            self.bundle,
            self.valid_set,
            idx[self.rank :: self.world_size],
            self.per_device,
            self.collator,
            reduce=self._all_sum,
        )

    def rank_valid_subset(self, max_examples: int, buckets: Sequence[str] = ()) -> np.ndarray:
        """Indices (into the valid set) of the sequential validation examples ranking validation
        scores: of the EH ``buckets`` (empty: all), a seeded sample of at most ``max_examples``."""
        pool = np.array(
            [
                i
                for i, (t, b) in enumerate(zip(self.valid_task, self.valid_bucket))
                if t == "sequential" and (not buckets or b in buckets)
            ],
            np.int64,
        )
        return pool[valid_subset(len(pool), max_examples, self.cur.seed)]

    @torch.no_grad()
    def validation_ranking(self, max_examples: int, k: int = 5, buckets: Sequence[str] = ()) -> dict[str, float]:
        """HR@k and NDCG@k of the model ranking the whole catalog for :meth:`rank_valid_subset`'s
        examples, the way the scoring job ranks (``VLMPredictor.rank_catalog``: greedy thought, then
        constrained beam search over the catalog trie; without ``thought_tool_sets`` mixing, which
        needs the shown tools' names the instruction rows do not keep). An example is a hit at the
        first rank whose item text is its answer's (instruction rows keep the answer's text, not its
        item id). Each rank scores its share, summed over ranks: ``{"hr", "ndcg", "n"}``."""
        if self.catalog is None:
            raise ValueError("ranking validation needs the catalog: build FinetuneData with catalog=")
        idx = self.rank_valid_subset(max_examples, buckets)
        if len(idx) == 0:
            raise ValueError(
                f"ranking validation: no sequential validation examples (EH buckets "
                f"{list(buckets) or 'all'}) among the {len(self.valid_set)} validation rows"
            )
        was_training = self.bundle.model.training
        if self._ranker is None:
            predictor = VLMPredictor(self.bundle, self.collator)  # puts the model in eval mode
            self._ranker = predictor, self.catalog.trie(predictor.tok)
        predictor, trie = self._ranker
        self.bundle.model.eval()
        hits = ndcg = 0.0
        mine = idx[self.rank :: self.world_size]
        for lo in range(0, len(mine), self.per_device):
            examples = [self.valid_set[int(i)] for i in mine[lo : lo + self.per_device]]
            for ex, out in zip(examples, predictor.rank_catalog(examples, trie, k=k)):
                answer = (parse_output(ex["target"], "sequential").answer or "").strip()
                texts = [self.catalog.text[i].strip() for i in out.items[:k]]
                r = np.array([texts.index(answer) if answer in texts else k])
                hits += float(hit_at_k(r, k)[0])
                ndcg += float(ndcg_at_k(r, k)[0])
        self.bundle.model.train(was_training)
        hits, ndcg = self._all_sum([hits, ndcg])
        return {"hr": hits / len(idx), "ndcg": ndcg / len(idx), "n": int(len(idx))}

    # ----------------------------------------------------------------------- checkpoints
    def save_state(self, path: str | os.PathLike) -> None:
        """Adapter (safetensors, loadable by ``load_adapter``) + optimizer/scheduler state + step."""
        path = Path(path)
        save_adapter(self.bundle, path / ADAPTER_DIR)
        torch.save(
            {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "step": self.step},
            path / TRAINER_STATE,
        )

    def load_state(self, path: str | os.PathLike) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = Path(path)
        weights = load_file(str(path / ADAPTER_DIR / "adapter_model.safetensors"), device=str(self.device))
        result = set_peft_model_state_dict(self.bundle.model, weights)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"checkpoint adapter does not fit this model: {result.unexpected_keys[:5]}")
        state = torch.load(path / TRAINER_STATE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])


@torch.no_grad()
def dataset_loss(
    bundle: VLMBundle,
    dataset: InstructionDataset,
    indices: Sequence[int],
    batch_size: int,
    collator: VLMCollator | None = None,
    reduce: Callable | None = None,
) -> float:
    """Token-weighted mean loss of ``bundle``'s model on ``dataset[indices]`` (eval mode)."""
    collator = collator or VLMCollator(bundle)
    model = bundle.model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, n_tok = 0.0, 0
    idx = list(indices)
    for lo in range(0, len(idx), batch_size):
        batch = collator([dataset[i] for i in idx[lo : lo + batch_size]])
        n = int((batch["labels"][:, 1:] != -100).sum())  # the model shifts labels by one
        if n:
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            total += float(loss) * n
            n_tok += n
    model.train(was_training)
    if reduce is not None:
        total, n_tok = reduce([total, n_tok])
    return total / n_tok if n_tok else math.nan


# ---------------------------------------------------------------------------- progress
def new_progress() -> dict:
    """Run record kept in every checkpoint (JSON): bounded size whatever the step count."""
    return {
        "step": 0,
        "train_seconds": 0.0,
        "tokens": 0,
        "phase_loss": {},
        "log": [],
        "resumes": [],
        "valid_loss_before": None,
        "valid_loss": None,
        "valid_curve": [],
        "window": None,
    }


def record_step(progress: dict, m: StepMetrics, log_every: int) -> dict | None:
    """Fold one step into ``progress``; every ``log_every`` steps close a log window and return it."""
    progress["step"] = m.step + 1
    progress["train_seconds"] += m.seconds
    progress["tokens"] += m.tokens
    name = PHASE_NAMES[m.phase]
    s, n = progress["phase_loss"].get(name, (0.0, 0))
    progress["phase_loss"][name] = (s + m.loss, n + 1)
    w = progress["window"] or {"first_step": m.step, "loss": 0.0, "n": 0, "tokens": 0, "seconds": 0.0}
    w.update(loss=w["loss"] + m.loss, n=w["n"] + 1, tokens=w["tokens"] + m.tokens, seconds=w["seconds"] + m.seconds)
    progress["window"] = w
    if (m.step + 1) % max(log_every, 1):
        return None
    return close_window(progress, m)


def close_window(progress: dict, last: StepMetrics | None = None) -> dict | None:
    w, progress["window"] = progress["window"], None
    if not w:
        return None
    entry = {
        "step": progress["step"],
        "phase": PHASE_NAMES[last.phase] if last else None,
        "loss": w["loss"] / w["n"],
        "lr": last.lr if last else None,
        "tokens": w["tokens"],
        "seconds": round(w["seconds"], 4),
        "tokens_per_s": w["tokens"] / max(w["seconds"], 1e-9),
    }
    progress["log"].append(entry)
    return entry


def summarize(progress: dict) -> dict:
    """metrics.json content from a run record."""
    loss_by_phase = {k: s / n for k, (s, n) in progress["phase_loss"].items() if n}
    return {
        "steps": progress["step"],
        "loss_by_phase": loss_by_phase,
        "valid_loss_before": progress["valid_loss_before"],
        "valid_loss": progress["valid_loss"],
        "valid_curve": progress.get("valid_curve", []),
        "train_seconds": round(progress["train_seconds"], 2),
        "tokens": progress["tokens"],
        "tokens_per_s": progress["tokens"] / max(progress["train_seconds"], 1e-9),
        "log": progress["log"],
        "resumes": progress["resumes"],
    }


# ------------------------------------------------------------------------------ reload
def load_finetuned(store, vlm_cfg: VLMConfig | None = None) -> VLMBundle:
    """The fine-tuned VLM of a run, ready for inference: base model + the ``finetune`` stage's
    adapter. ``vlm_cfg`` (e.g. the scoring run's, for its inference settings) must describe the
    same base model; None uses the config saved with the adapter."""
    store.require(STAGE)
    if not store.scheme:
        return load_adapter(store.path(STAGE, ADAPTER_DIR), vlm_cfg)
    with tempfile.TemporaryDirectory(prefix="reasonrec-adapter-") as d:
        store.fs.get(store.path(STAGE, ADAPTER_DIR) + "/", d + "/", recursive=True)
        return load_adapter(d, vlm_cfg)


def training_config(vlm_cfg: VLMConfig) -> dict:
    """The VLM settings that shape training (inference-only and cache settings left out), for
    the stage's config hash: changing beam width must not retrain the adapter."""
    d = asdict(vlm_cfg)
    for k in (
        "num_beams",
        "thought_tool_sets",
        "sequential_pool",
        "reuse_thought_cache",
        "max_thought_tokens",
        "max_explanation_tokens",
        "cache_dir",
        "local_files_only",
    ):
        d.pop(k)
    return d
