"""Config: layered composition, overrides, errors naming the key, every preset validates."""

from dataclasses import asdict
from pathlib import Path

import pytest

from reasonrec.config import CONFIG_DIR, ConfigError, RunConfig, load_config, parse_cli, planner_warnings, section_hash

PRESETS = sorted(p for p in CONFIG_DIR.rglob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_yaml_validates_against_the_schema(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


def test_layering_order_and_overrides():
    cfg = load_config(CONFIG_DIR / "beauty.yaml", ["data.kcore=5", "output_root=s3://bucket/runs"])
    assert cfg.run_name == "beauty"  # preset
    assert cfg.data.sources[0].kind == "p5"  # data layer
    assert cfg.data.eh_normalizer == "rank"  # data layer overrides base's "max"
    assert cfg.data.direct_negatives == 99  # base layer
    assert cfg.data.kcore == 5 and cfg.output_root == "s3://bucket/runs"  # command line


@pytest.mark.parametrize(
    "override,key",
    [
        ("data.nope=1", "data.nope"),
        ("data.kcore=abc", "data.kcore"),
        ("data.eh_normalizer=median", "data.eh_normalizer"),
        ("data.ctr_split=[0.5,0.5,0.5]", "data.ctr_split"),
        ("ray.shuffle_partitions=many", "ray.shuffle_partitions"),
        ("finetune.autocast=float16", "finetune.autocast"),
        ("vlm.thought_tool_sets=-1", "vlm.thought_tool_sets"),
        ("tools.holdout_items=-2", "tools.holdout_items"),
        ("ray.data_no_progress_timeout_s=-5", "ray.data_no_progress_timeout_s"),
        ("instructions.tool_order=[sasrec]", "instructions.tool_order"),  # needs hint_order=usable_rate
        ("finetune.export=best", "finetune.export"),
        ("finetune.export=best_valid_hr", "finetune.export"),  # needs finetune.valid_rank_examples
        ("finetune.valid_rank_buckets=[cold]", "finetune.valid_rank_buckets"),
        ("finetune.valid_rank_k=0", "finetune.valid_rank_k"),
    ],
)
def test_bad_keys_and_types_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(CONFIG_DIR / "quickstart.yaml", [override])


def test_ranking_validation_needs_sequential_validation_examples():
    ok = load_config(
        CONFIG_DIR / "quickstart.yaml", ["finetune.valid_rank_examples=8", "finetune.export=best_valid_hr"]
    )
    assert ok.finetune.export == "best_valid_hr" and ok.finetune.valid_rank_buckets == []
    for no_rows in ("instructions.tasks=[ctr]", "instructions.splits=[train]"):
        with pytest.raises(ConfigError, match="'finetune.valid_rank_examples'"):
            load_config(CONFIG_DIR / "quickstart.yaml", ["finetune.valid_rank_examples=8", no_rows])


def test_unknown_key_in_a_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"defaults: [{CONFIG_DIR / 'base'}]\ndata:\n  kcores: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*'data.kcores'"):
        load_config(bad)


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(CONFIG_DIR / "quickstart.yaml", ["data.kcore"])


def test_print_config_shows_resolved_values(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_cli("x", ["--config", str(CONFIG_DIR / "quickstart.yaml"), "--print-config", "data.kcore=7"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "kcore: 7" in out and "run_name: quickstart" in out


def test_cli_config_error_exits_2_with_message(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_cli("x", ["--config", str(CONFIG_DIR / "quickstart.yaml"), "data.bogus=1"])
    assert exc.value.code == 2
    assert "data.bogus" in capsys.readouterr().err


def test_section_hash_changes_with_content():
    a = load_config(CONFIG_DIR / "quickstart.yaml")
    b = load_config(CONFIG_DIR / "quickstart.yaml", ["data.seed=1"])
    assert section_hash(a.data) == section_hash(load_config(CONFIG_DIR / "quickstart.yaml").data)
    assert section_hash(a.data) != section_hash(b.data)


def test_hints_trained_on_the_fixed_tools_warn_under_another_tool_choice():
    q = CONFIG_DIR / "quickstart.yaml"
    assert planner_warnings(load_config(q)) == []  # defaults: random hints, learned choice
    assert planner_warnings(load_config(q, ["instructions.hint_order=usable_rate", "planner.tool_choice=fixed"])) == []
    (w,) = planner_warnings(load_config(q, ["instructions.hint_order=usable_rate"]))
    assert "planner.tool_choice=learned" in w
    with pytest.raises(ConfigError, match="instructions.hint_order"):
        load_config(q, ["instructions.hint_order=best"])
    with pytest.raises(ConfigError, match="instructions.hint_fraction"):
        load_config(q, ["instructions.hint_fraction=1.5"])


# docs/experiments/2026-11-30-does-the-vlm-match-the-best-tool-on-cold-users.md, "One tool in the
# prompt" (run qs-1t): the quickstart preset plus these overrides, with
# the cache directory and time budget (runtime settings, not the recipe) written as the preset's.
ONE_TOOL_STUDY = (
    "data.sources.0.synthetic.n_users=1200 vlm.model=small vlm.cache_dir=runs/_cache/vlm_small "
    "curriculum.lr=0.0002 finetune.max_steps=400 finetune.checkpoint_every=50 finetune.log_every=10 "
    "finetune.time_budget_s=7200 finetune.cpus_per_worker=2 finetune.max_valid_examples=16 "
    "instructions.tasks=[sequential] instructions.train_prefixes=100 instructions.max_examples_per_task=0 "
    "instructions.hint_fraction=0.75 instructions.hint_order=usable_rate score.tasks=[sequential] "
    "planner.vlm_aware=false score.count_flops=false planner.tool_choice=fixed "
    "data.sources.0.synthetic.distinct_titles=true finetune.autocast=auto "
    "instructions.tool_order=[sasrec,lightsans] instructions.max_tool_hints=1 planner.max_tools=1 "
    "score.max_queries_per_task=0 score.vlm_actors=2 score.shard_rows=41 score.tool_cpus=0.5 score.vlm_cpus=0.75 "
    # the world's time spread and the pipeline's time-shift run came to the quickstart preset later
    "data.sources.0.synthetic.time_span_s=63072000 pipeline.timeshift_comparison=false"
).split()


def test_synthetic_small_preset_is_the_recorded_one_tool_study():
    preset = asdict(load_config(CONFIG_DIR / "synthetic_small.yaml"))
    study = asdict(load_config(CONFIG_DIR / "quickstart.yaml", ONE_TOOL_STUDY))
    assert preset.pop("run_name") == "synthetic_small" and study.pop("run_name") == "quickstart"
    assert preset == study
