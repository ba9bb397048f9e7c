"""Evidence-horizon curriculum (paper 3.2 (4), Fig. 3, Appendix A): sampler and LR schedule.

Phases over the training steps ``[0, T)``:

1. warm-up ``[0, warmup_end*T)``: only low-EH (dense) examples;
2. progressive ``[warmup_end*T, cold_start_begin*T)``: the bucket mixture moves linearly from
   (low 1, medium 0, high 0) to ``progressive_mix``, mixing in medium (and some high) EH;
3. cold-start emphasis ``[cold_start_begin*T, T)``: ``cold_mix`` upsamples high EH (the paper
   upsamples after 95% of steps), trained with a reduced learning rate.

Mixture weights are renormalised over non-empty buckets, so data without e.g. low-EH users still
trains. ``enabled=False`` samples uniformly over all examples (the ablation).

The sampler is a pure function of (seed, step): the bucket of every slot of a global batch is
drawn from a per-chunk RNG, and each bucket is consumed as a stream of seeded permutations
(without replacement within an epoch of that bucket). A worker resuming at step s recomputes the
bucket counts before s (vectorised, cheap) and continues exactly where it left off; ranks take
equal contiguous slices of each global batch.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from reasonrec.vlm.config import CurriculumConfig
from reasonrec.vocab import EH_BUCKETS

BUCKETS = EH_BUCKETS  # code i = BUCKETS[i]
_CODE = {b: i for i, b in enumerate(BUCKETS)}


def bucket_codes(buckets: Sequence[str] | np.ndarray) -> np.ndarray:
    """Map bucket names (or codes 0/1/2) to int8 codes."""
    arr = np.asarray(buckets)
    if arr.dtype.kind in "iu":
        codes = arr.astype(np.int8)
    else:
        try:
            codes = np.array([_CODE[str(b)] for b in arr], dtype=np.int8)
        except KeyError as exc:
            raise ValueError(f"unknown evidence-horizon bucket {exc.args[0]!r}; expected {BUCKETS}") from None
    if len(codes) and (codes.min() < 0 or codes.max() > 2):
        raise ValueError("bucket codes must be 0 (low), 1 (medium) or 2 (high)")
    return codes


def phase_bounds(total_steps: int, cfg: CurriculumConfig) -> tuple[int, int]:
    """First step of phase 2 and of phase 3."""
    if not 0.0 <= cfg.warmup_end <= cfg.cold_start_begin <= 1.0:
        raise ValueError("need 0 <= warmup_end <= cold_start_begin <= 1")
    return int(round(cfg.warmup_end * total_steps)), int(round(cfg.cold_start_begin * total_steps))


def phase_at(step: int, total_steps: int, cfg: CurriculumConfig) -> int:
    p2, p3 = phase_bounds(total_steps, cfg)
    return 1 if step < p2 else (2 if step < p3 else 3)


def mixture_at(steps: np.ndarray | int, total_steps: int, cfg: CurriculumConfig) -> np.ndarray:
    """Target (low, medium, high) mixture per step, shape [len(steps), 3] (before renormalising
    over non-empty buckets)."""
    steps = np.atleast_1d(np.asarray(steps, dtype=np.float64))
    p2, p3 = phase_bounds(total_steps, cfg)
    start = np.array([1.0, 0.0, 0.0])
    prog = np.asarray(cfg.progressive_mix, dtype=np.float64)
    cold = np.asarray(cfg.cold_mix, dtype=np.float64)
    prog, cold = prog / prog.sum(), cold / cold.sum()
    frac = np.clip((steps - p2) / max(p3 - p2, 1), 0.0, 1.0)[:, None]
    mix = (1 - frac) * start + frac * prog
    mix = np.where((steps < p2)[:, None], start, mix)
    return np.where((steps >= p3)[:, None], cold, mix)


class CurriculumSampler(Sampler[int]):
    """Yields example indices for one rank, ``per_device_batch_size`` per step, from
    ``start_step`` to ``total_steps`` (use with ``DataLoader(batch_size=per_device_batch_size)``)."""

    def __init__(
        self,
        eh_buckets: Sequence[str] | np.ndarray,
        total_steps: int,
        per_device_batch_size: int,
        cfg: CurriculumConfig | None = None,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        chunk_steps: int = 1024,
    ):
        self.cfg = cfg or CurriculumConfig()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        codes = bucket_codes(eh_buckets)
        if len(codes) == 0:
            raise ValueError("cannot sample from zero examples")
        self.total_steps = int(total_steps)
        self.per_device = int(per_device_batch_size)
        self.world_size, self.rank = int(world_size), int(rank)
        self.global_batch = self.per_device * self.world_size
        self.chunk_steps = int(chunk_steps)
        if self.cfg.enabled:
            self.members = [np.flatnonzero(codes == b) for b in range(3)]
        else:  # uniform ablation: one stream over everything
            self.members = [np.arange(len(codes)), np.zeros(0, np.int64), np.zeros(0, np.int64)]
        self.sizes = np.array([len(m) for m in self.members])
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}
        self._chunk_cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.start_step = 0
        self.set_start_step(start_step)

    # ------------------------------------------------------------------ mixture and choices
    def effective_mixture(self, steps: np.ndarray | int) -> np.ndarray:
        """The bucket probabilities actually used: target mixture renormalised over non-empty
        buckets (uniform mode: everything from the single stream)."""
        steps = np.atleast_1d(np.asarray(steps))
        if not self.cfg.enabled:
            return np.tile([1.0, 0.0, 0.0], (len(steps), 1))
        mix = mixture_at(steps, self.total_steps, self.cfg) * (self.sizes > 0)
        dead = mix.sum(1) <= 0  # target buckets all empty: fall back to natural shares
        mix[dead] = self.sizes / self.sizes.sum()
        return mix / mix.sum(1, keepdims=True)

    def _chunk_buckets(self, c: int) -> np.ndarray:
        steps = np.arange(c * self.chunk_steps, min((c + 1) * self.chunk_steps, self.total_steps))
        rng = np.random.default_rng([self.cfg.seed, 1, c])
        u = 1.0 - rng.random((len(steps), self.global_batch))  # in (0, 1]
        cum = np.cumsum(self.effective_mixture(steps), axis=1)
        return (u[:, :, None] > cum[:, None, :2]).sum(-1).astype(np.int8)

    def _chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """(bucket per slot [S, G], stream position per slot [S, G]) for chunk c."""
        if c in self._chunk_cache:
            return self._chunk_cache[c][:2]
        # Stream offsets at the chunk start: counts of each bucket in all earlier chunks (carried
        # over from the previous chunk when iterating forward, recomputed after a jump).
        if c - 1 in self._chunk_cache:
            offsets = self._chunk_cache[c - 1][2].copy()
        else:
            offsets = np.zeros(3, dtype=np.int64)
            for prev in range(c):
                offsets += np.bincount(self._chunk_buckets(prev).ravel(), minlength=3)
        b = self._chunk_buckets(c)
        flat = b.ravel()
        onehot = np.zeros((len(flat), 3), dtype=np.int64)
        onehot[np.arange(len(flat)), flat] = 1
        pos = (np.cumsum(onehot, axis=0) - 1)[np.arange(len(flat)), flat] + offsets[flat]
        end = offsets + onehot.sum(0)
        self._chunk_cache = {c: (b, pos.reshape(b.shape), end)}  # one chunk: bounded memory
        return self._chunk_cache[c][:2]

    def _index(self, bucket: int, pos: int) -> int:
        n = self.sizes[bucket]
        epoch, k = divmod(int(pos), int(n))
        key = (bucket, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 8:
                self._perm_cache.clear()
            self._perm_cache[key] = np.random.default_rng([self.cfg.seed, 2, bucket, epoch]).permutation(n)
        return int(self.members[bucket][self._perm_cache[key][k]])

    # ------------------------------------------------------------------------ public API
    def global_batch_at(self, step: int) -> np.ndarray:
        """All ranks' indices for ``step`` (rank r owns slice [r*P, (r+1)*P))."""
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} outside [0, {self.total_steps})")
        c, s = divmod(step, self.chunk_steps)
        b, pos = self._chunk(c)
        return np.array([self._index(int(b[s, g]), int(pos[s, g])) for g in range(self.global_batch)])

    def batch_at(self, step: int) -> np.ndarray:
        lo = self.rank * self.per_device
        return self.global_batch_at(step)[lo : lo + self.per_device]

    def set_start_step(self, step: int) -> None:
        """Resume: the next iteration starts at global step ``step``."""
        if not 0 <= step <= self.total_steps:
            raise ValueError(f"start step {step} outside [0, {self.total_steps}]")
        self.start_step = int(step)

    def batches(self) -> Iterator[np.ndarray]:
        for step in range(self.start_step, self.total_steps):
            yield self.batch_at(step)

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from (int(i) for i in batch)

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.per_device


# -------------------------------------------------------------------------- LR schedule
def lr_factor_fn(total_steps: int, cfg: CurriculumConfig, base_lr: float | None = None) -> Callable[[int], float]:
    """Multiplier of ``base_lr`` at a step: linear warm-up, cosine decay to ``min_lr`` at the last
    step, times ``cold_lr_multiplier`` from the phase-3 boundary on, never below ``min_lr``."""
    base_lr = cfg.lr if base_lr is None else base_lr
    floor = min(cfg.min_lr / base_lr, 1.0) if base_lr > 0 else 0.0
    warm = max(int(math.ceil(cfg.lr_warmup * total_steps)), 0)
    _, p3 = phase_bounds(total_steps, cfg)
    decay_len = max(total_steps - 1 - warm, 1)

    def factor(step: int) -> float:
        if step < warm:
            f = (step + 1) / warm
        else:
            progress = min(max((step - warm) / decay_len, 0.0), 1.0)
            f = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if cfg.enabled and step >= p3:
            f *= cfg.cold_lr_multiplier
        return max(f, floor)

    return factor


def make_optimizer(params, cfg: CurriculumConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (paper: AdamW, lr 2e-5)."""
    params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, cfg: CurriculumConfig, last_epoch: int = -1
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR with one factor function per param group (the floor is an absolute LR)."""
    if last_epoch >= 0:  # LambdaLR resuming needs initial_lr in each group
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
    fns = [lr_factor_fn(total_steps, cfg, g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fns, last_epoch=last_epoch)
