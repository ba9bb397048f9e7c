"""Evidence-horizon curriculum: phase mixtures, determinism, sharding, resume, LR curve."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reasonrec.vlm.config import CurriculumConfig
from reasonrec.vlm.curriculum import (
    CurriculumSampler,
    bucket_codes,
    lr_factor_fn,
    make_lr_scheduler,
    make_optimizer,
    mixture_at,
    phase_at,
)

rng = np.random.default_rng(0)
BUCKETS = rng.choice(["low", "medium", "high"], size=3000, p=[0.2, 0.3, 0.5])
CODES = bucket_codes(BUCKETS)


def _shares(sampler, steps):
    idx = np.concatenate([sampler.global_batch_at(s) for s in steps])
    return np.bincount(CODES[idx], minlength=3) / len(idx)


def test_phase_mixtures():
    cfg = CurriculumConfig(warmup_end=0.3, cold_start_begin=0.9, cold_mix=[0.1, 0.2, 0.7])
    T = 200
    s = CurriculumSampler(BUCKETS, T, per_device_batch_size=16, cfg=cfg)
    assert [phase_at(t, T, cfg) for t in (0, 59, 60, 179, 180, 199)] == [1, 1, 2, 2, 3, 3]
    # phase 1: only low-EH examples
    assert _shares(s, range(0, 60))[0] == 1.0
    # phase 2: medium mixed in, growing towards the end of the phase
    early, late = _shares(s, range(60, 90)), _shares(s, range(150, 180))
    assert late[1] > early[1] > 0.0 and late[0] < early[0]
    # phase 3: high-EH share above 0.6 (target 0.7)
    assert _shares(s, range(180, 200))[2] > 0.6
    assert np.allclose(mixture_at(190, T, cfg), [[0.1, 0.2, 0.7]])


def test_uniform_ablation_and_missing_buckets():
    s = CurriculumSampler(BUCKETS, 50, 32, CurriculumConfig(enabled=False))
    early = _shares(s, range(0, 10))
    assert abs(early[2] - 0.5) < 0.08 and early[0] > 0.1  # natural shares from the start
    no_low = np.array(["medium", "high"] * 50)
    s2 = CurriculumSampler(no_low, 20, 4, CurriculumConfig())
    idx = np.concatenate(list(s2.batches()))
    assert len(idx) == 80 and set(no_low[idx]) <= {"medium", "high"}
    with pytest.raises(ValueError):
        bucket_codes(["low", "cold"])


def test_without_replacement_within_bucket_epoch():
    s = CurriculumSampler(BUCKETS, 10, 6, CurriculumConfig(warmup_end=1.0, cold_start_begin=1.0))
    n_low = int((CODES == 0).sum())
    idx = np.concatenate(list(s.batches()))[:n_low]  # 60 draws < n_low: all distinct
    assert len(set(idx.tolist())) == len(idx)


def test_sharding_and_resume_are_consistent():
    cfg = CurriculumConfig(seed=5)
    T, P, W = 40, 3, 4
    full = CurriculumSampler(BUCKETS, T, P * W, cfg, chunk_steps=7)
    ranks = [CurriculumSampler(BUCKETS, T, P, cfg, rank=r, world_size=W, chunk_steps=7) for r in range(W)]
    per_rank = [list(r) for r in ranks]
    assert all(len(x) == T * P for x in per_rank)  # equal-size shards
    for step in (0, 13, 39):
        glob = np.concatenate([per_rank[r][step * P : (step + 1) * P] for r in range(W)])
        assert np.array_equal(glob, full.global_batch_at(step))
    resumed = CurriculumSampler(BUCKETS, T, P, cfg, rank=2, world_size=W, start_step=25, chunk_steps=7)
    assert len(resumed) == 15 * P
    assert list(resumed) == per_rank[2][25 * P :]
    loader = torch.utils.data.DataLoader(range(len(BUCKETS)), batch_size=P, sampler=ranks[1])
    first = next(iter(loader))
    assert first.tolist() == per_rank[1][:P]


def test_lr_curve_warmup_cosine_floor_and_cold_phase():
    cfg = CurriculumConfig(lr=2e-5, min_lr=1e-7, lr_warmup=0.05, cold_start_begin=0.9, cold_lr_multiplier=0.5)
    T = 1000
    model = torch.nn.Linear(2, 2)
    opt = make_optimizer(model.parameters(), cfg)
    assert isinstance(opt, torch.optim.AdamW)
    sched = make_lr_scheduler(opt, T, cfg)
    lrs = []
    for _ in range(T):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lrs = np.array(lrs)
    warm = 50
    assert lrs[0] == pytest.approx(2e-5 / warm)
    assert np.all(np.diff(lrs[:warm]) > 0) and lrs[warm - 1] == pytest.approx(2e-5)
    # cosine between warm-up and phase 3
    f = lr_factor_fn(T, cfg)
    mid = warm + (T - 1 - warm) // 2
    floor = 1e-7 / 2e-5
    assert f(mid) == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (mid - warm) / (T - 1 - warm))))
    assert np.all(np.diff(lrs[warm:900]) <= 0)
    # reduced LR in the last phase: a 0.5x drop at the boundary
    cos900 = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (900 - warm) / (T - 1 - warm)))
    assert lrs[900] == pytest.approx(2e-5 * 0.5 * cos900)
    assert lrs[900] / lrs[899] < 0.55
    # floor 1e-7, reached at the end, never below
    assert lrs.min() >= 1e-7 * (1 - 1e-9)
    assert lrs[-1] == pytest.approx(1e-7)
    # uniform ablation: no cold-phase drop
    g = lr_factor_fn(T, CurriculumConfig(enabled=False, lr_warmup=0.05, cold_start_begin=0.9))
    assert g(900) / g(899) > 0.95


def test_scheduler_resume_matches():
    cfg = CurriculumConfig()
    m = torch.nn.Linear(2, 2)
    opt = make_optimizer(m.parameters(), cfg)
    s = make_lr_scheduler(opt, 100, cfg)
    for _ in range(37):
        opt.step()
        s.step()
    opt2 = make_optimizer(m.parameters(), cfg)
    s2 = make_lr_scheduler(opt2, 100, cfg)
    s2.load_state_dict(s.state_dict())
    opt2.param_groups[0]["lr"] = s2.get_last_lr()[0]
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
