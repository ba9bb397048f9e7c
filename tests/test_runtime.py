"""Ray start-up (reasonrec.runtime) on the shared local cluster."""

from __future__ import annotations

import logging

from reasonrec.config import RayConfig
from reasonrec.runtime import STATE_API_MISS, TRAIN_CLEANER_LOGGER, init_ray


def test_a_local_cluster_without_dashboard_drops_only_the_train_cleaners_state_api_misses(ray_local):
    ray = ray_local

    class CleanerLogProbe:
        """Stands where Ray Train's placement-group cleaner runs: a detached actor of the job.
        (Defined here so that Ray ships it by value: tests/ is not importable on workers.)"""

        def passes(self, messages: list[str]) -> list[bool]:
            logger = logging.getLogger(TRAIN_CLEANER_LOGGER)
            return [
                bool(logger.filter(logger.makeRecord(logger.name, logging.WARNING, __file__, 0, m, None, None)))
                for m in messages
            ]

    probe = ray.remote(num_cpus=0)(CleanerLogProbe).options(lifetime="detached").remote()
    try:
        passed = ray.get(
            probe.passes.remote(
                [
                    f"{STATE_API_MISS}. State API may be temporarily unavailable. Continuing to monitor.",
                    "Controller actor died; removing placement group",
                ]
            )
        )
    finally:
        ray.kill(probe)
    assert passed == [False, True]


def test_each_job_sets_ray_datas_no_progress_timeout_also_on_a_joined_cluster(ray_local):
    """A score shard of a slow VLM moves no block for longer than Ray's 1800 s: the job's setting
    must reach the DataContext even when this process already joined the cluster."""
    ctx = ray_local.data.DataContext.get_current()
    before = ctx.execution_no_progress_timeout_s
    try:
        init_ray(RayConfig())
        assert ctx.execution_no_progress_timeout_s == RayConfig.data_no_progress_timeout_s != 1800
        init_ray(RayConfig(data_no_progress_timeout_s=-1))
        assert ctx.execution_no_progress_timeout_s == -1
        init_ray(RayConfig(data_no_progress_timeout_s=0))  # 0 leaves the current value
        assert ctx.execution_no_progress_timeout_s == -1
    finally:
        ctx.execution_no_progress_timeout_s = before


def test_auto_shuffle_strategy_sorts_small_inputs_and_hashes_large_ones(ray_local):
    from reasonrec.runtime import AUTO_SORT_SHUFFLE_MAX_ROWS, pick_shuffle_strategy

    ctx = ray_local.data.DataContext.get_current()
    before = ctx.shuffle_strategy
    try:
        auto = RayConfig()
        assert auto.shuffle_strategy == "auto"
        assert pick_shuffle_strategy(auto, AUTO_SORT_SHUFFLE_MAX_ROWS) == "sort_shuffle_pull_based"
        assert pick_shuffle_strategy(auto, AUTO_SORT_SHUFFLE_MAX_ROWS + 1) == "shuffle_v2"
        init_ray(RayConfig(shuffle_strategy="sort_shuffle_push_based"))  # a named one is set for the job
        assert (
            pick_shuffle_strategy(RayConfig(shuffle_strategy="sort_shuffle_push_based"), 10**9)
            == "sort_shuffle_push_based"
        )
    finally:
        ctx.shuffle_strategy = before
