"""Structured configuration: typed dataclass schemas, layered YAML presets, dotlist overrides.

Composition order (RecBole-style layering): schema defaults -> the files named in a preset's
``defaults:`` list (base -> data source -> model, recursively) -> the preset itself -> command-line
``key=value`` overrides. Unknown keys and wrong types raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from reasonrec.vlm.config import CurriculumConfig, VLMConfig
from reasonrec.vocab import EH_BUCKETS, TASKS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


# ----------------------------------------------------------------------------------- schemas
@dataclass
class StorageConfig:
    """How to reach the artifact root and s3:// sources. Credentials come from the standard AWS
    chain (env vars, profile, instance role); only the endpoint is set here (MinIO, moto, ...)."""

    s3_endpoint_url: Optional[str] = None
    s3_anon: bool = False


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: attach to RAY_ADDRESS if set (ray job submit), else start local
    num_cpus: Optional[int] = None  # only for a local cluster started by the entry point
    include_dashboard: bool = False
    # Ray Data parallelism for shuffles (groupby); 200 (Ray's default) is slow on small clusters.
    shuffle_partitions: int = 8
    # Ray Data's shuffle algorithm (DataContext.shuffle_strategy). "auto": prepare picks, once it has
    # read the interactions, a sort shuffle (tasks) up to reasonrec.runtime.AUTO_SORT_SHUFFLE_MAX_ROWS
    # rows and Ray's hash shuffle ("shuffle_v2", a pool of aggregator actors per shuffle) above: the
    # actors' start-up made a small prepare 4.6x slower, the sort's memory a 10M-row one 4x larger
    # (BENCHMARKS.md). Or one of Ray's names, for every job.
    shuffle_strategy: str = "auto"
    # Ray Data read/map parallelism (number of shards/blocks); -1 lets Ray decide.
    parallelism: int = -1
    # Ray Data fails a dataset after this long without any block moving (Ray's default: 1800 s).
    # A score shard of a large VLM on CPU can legitimately take longer (a 41-query shard did), so
    # the default is 4 h; 0 keeps Ray's (or RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S), -1 disables it.
    data_no_progress_timeout_s: float = 14400.0


@dataclass
class SyntheticConfig:
    """The synthetic multimodal world; its generative process (the ground truth) is documented
    in reasonrec/data/sources/synthetic.py. Every draw is a hash of (seed, entity id), so the data
    do not depend on the shard counts, which only set the parallelism."""

    n_users: int = 400
    n_items: int = 120
    n_categories: int = 4  # each category has its own shape and colour palette
    n_styles: int = 3  # each style has its own pattern
    n_brands: int = 8  # each brand belongs to one category
    # Long tail of activity: length = min_len + floor(activity_scale * Lomax(activity_alpha)),
    # capped at max_len (alpha 1.2, scale 2: ~3/4 of users have <= 5 interactions).
    min_len: int = 1
    max_len: int = 60
    activity_alpha: float = 1.2
    activity_scale: float = 2.0
    # Tastes: softmax(taste_sharpness * N(0,1)) over categories and over styles (higher = pickier).
    taste_sharpness: float = 2.0
    # Item popularity: lognormal(0, popularity_sigma), used by taste draws and successor lists.
    popularity_sigma: float = 1.0
    # Next item: successor of the previous item (p_transition), a uniform random item (p_noise),
    # else a draw from the user's taste. Each item has n_successors successors whose weights
    # decay geometrically (successor_decay); half substitutes, half complements.
    p_transition: float = 0.7
    p_noise: float = 0.05
    n_successors: int = 4
    successor_decay: float = 0.6
    # Time: a user's first interaction is uniform in [start_ts, start_ts + time_span_s); gaps are
    # exponential with mean mean_gap_s, or (probability p_burst) with mean burst_gap_s.
    start_ts: int = 1_600_000_000
    time_span_s: int = 63_072_000
    mean_gap_s: int = 259_200
    burst_gap_s: int = 300
    p_burst: float = 0.3
    image_size: int = 32
    with_images: bool = True
    # Append a product-line name so no two items share a title. Off, items of one brand, colour,
    # pattern and category share title and photo (120 items: 58 texts), so a model that reads
    # text cannot tell apart items whose successors differ, while id-based tools can.
    distinct_titles: bool = False
    n_user_shards: int = 4
    n_item_shards: int = 2
    seed: int = 0


@dataclass
class SourceConfig:
    """One input source. ``kind`` picks the reader: synthetic, p5, amazon, recbole, pixelrec, hm."""

    kind: str = "synthetic"
    path: Optional[str] = None  # folder (or file) of the source; local path or s3://
    domain: str = "default"
    # amazon: review file and metadata file names under ``path`` (json lines, optionally .gz)
    reviews_file: Optional[str] = None
    meta_file: Optional[str] = None
    # amazon / pixelrec / hm: local or s3:// folder of images keyed by item key
    images_dir: Optional[str] = None
    # recbole: dataset name (files are <name>.inter / .item / .user)
    dataset_name: Optional[str] = None
    # hm: keep only the first N transactions' users (0 = all); handy for a quick look
    max_rows: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class DataConfig:
    sources: List[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    # k-core filter (0 = off): iteratively drop users/items with fewer than k interactions
    kcore: int = 0
    # evidence horizon normalizer: max (paper, exact) | quantile | rank | log
    eh_normalizer: str = "max"
    eh_quantile: float = 0.95  # cap for the quantile normalizer
    eh_thresholds: List[float] = field(default_factory=lambda: [0.3, 0.7])
    direct_negatives: int = 99
    ctr_negatives: int = 4
    # CTR split: "loo" (leak-free: test / valid positives = the leave-one-out test / valid items
    # the histories do not hold) or "random" (a ctr_split draw per user; leaks test positives
    # into the ranking tools' training histories).
    ctr_protocol: str = "loo"
    ctr_split: List[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    explanation_split: List[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    # time-shift split: interactions with ts < cutoff are train; None -> this quantile of ts
    timeshift_cutoff: Optional[int] = None
    timeshift_quantile: float = 0.9
    # Which split the per-user tables (loo and everything derived from it) follow: "loo" (random
    # split by position: each user's last item test, second last valid) or "timeshift" (test = a
    # user's first interaction at or after the time-shift cut-off, valid = the last before it,
    # history = the ones before it; users without both are not tested).
    split_protocol: str = "loo"
    seed: int = 42


DEFAULT_TOOLS = [
    "popularity",
    "sasrec",
    "lightsans",
    "gru4rec",
    "transition",
    "bpr_mf",
    "bpr_mlp",
    "lightgcn",
    "semantic",
    "dlrm",
    "dcnv2",
    "xdeepfm",
    "xgb_ctr",
]


@dataclass
class ToolsConfig:
    """The tool repository (paper section 3.3): which tools to train and how."""

    enabled: List[str] = field(default_factory=lambda: list(DEFAULT_TOOLS))
    # Per-tool hyper-parameters, merged over each tool's own defaults, e.g. {sasrec: {epochs: 30}}.
    params: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    ensemble: bool = True  # also build the majority-vote ensemble of the enabled tools
    num_workers: int = 1  # Ray Train workers (data-parallel) for the torch tools
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 1  # worker-group restarts (from the last checkpoint) before failing
    # Mid-tool checkpoints (through ray.train.report) at most this often; a finished tool is
    # always checkpointed. 0 = after every epoch. Tiny tools' epochs take milliseconds: a
    # checkpoint per epoch made the quickstart's train_tools mostly checkpoint copying.
    checkpoint_every_s: float = 30.0
    prediction_k: int = 20  # top-K kept per query in the tool predictions
    predict_batch_size: int = 512
    predict_actors: int = 1  # actor-pool size for writing predictions
    # LOO query splits the ranking predictions cover (evaluate reads valid/test; train-split
    # predictions are for offline analysis -- build_instructions asks the tools live).
    predict_splits: List[str] = field(default_factory=lambda: ["train", "valid", "test"])
    # > 0: also train a copy of each ranking tool without every user's last N training items
    # (``tools/holdout/<name>``); build_instructions then takes the hints of training examples
    # that predict one of those items from these copies (out-of-sample, like test time) and shows
    # no hints on the other training examples. 0 = hints from the tools trained on everything.
    holdout_items: int = 0


@dataclass
class InstructionsConfig:
    """Instruction examples for the VLM fine-tune (paper 3.2, Appendix A)."""

    tasks: List[str] = field(default_factory=lambda: list(TASKS))
    splits: List[str] = field(default_factory=lambda: ["train", "valid"])
    # A tool is "usable" for a ranking query when it ranked the truth within its top usable_k.
    usable_k: int = 10
    max_tool_hints: int = 3  # tools whose answers are shown in a prompt (the paper's cap)
    # Share of ranking/CTR examples whose prompt shows tool hints (the high-risk prompt); the
    # rest show none (the medium-risk prompt).
    hint_fraction: float = 0.5
    # Which tools a hinted example shows: "random" (a seeded draw per example) or "usable_rate"
    # (the task's tools with the highest usable rate on validation rows, best first: what the
    # planner's ``fixed`` tool choice shows at scoring time).
    hint_order: str = "random"
    # With hint_order=usable_rate: these tools lead that ranking, in this order (the rest follow by
    # usable rate), in training and in the fixed tool choice at scoring. For a tool known to be
    # better on new traffic than on validation rows, which the tools' training history overlaps.
    tool_order: List[str] = field(default_factory=list)
    # Direct prompts list this many of the candidates (a seeded subset that ignores the truth);
    # the VLM still scores every candidate by answer likelihood.
    prompt_candidates: int = 20
    noisy_tools_fraction: float = 0.1  # examples whose tool hints are replaced by wrong ones
    # Make each ranking tool's training hints as reliable as its answers on validation rows (the
    # tools answer training prefixes in-sample): a share of its right answers is shown with the
    # truth ranked out of its list (instructions.hint_keep_rates).
    hint_calibration: bool = False
    template_mixture: bool = True  # False: every example uses template ``single_template``
    single_template: int = 0
    # Cap per (task, split) so a CPU budget stays bounded; 0 = all. Sampled by hash, not head().
    max_examples_per_task: int = 0
    # Training split, sequential + direct: also predict up to this many earlier items of each
    # user's training sequence from the items before them (0: only the last training item, one
    # example per user). A sequential tool learns from every transition; this lets the VLM too.
    train_prefixes: int = 0
    seed: int = 0


@dataclass
class FinetuneConfig:
    """Curriculum LoRA fine-tune on Ray Train (TorchTrainer + DDP)."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 1  # worker-group restarts from the latest checkpoint
    max_steps: int = 200  # optimizer steps (the curriculum phases are fractions of this)
    per_device_batch_size: int = 4  # global batch = per_device_batch_size * num_workers * grad_accum
    grad_accum: int = 1
    checkpoint_every: int = 50  # steps between checkpoints (ray.train.report)
    log_every: int = 10
    time_budget_s: float = (
        0.0  # training seconds (steps only, over resumes); 0 = none; stop (and checkpoint) once exceeded
    )
    grad_clip: float = 1.0
    # Mixed precision: "bfloat16" runs the training forward under torch.autocast (matmuls in bf16,
    # weights, optimizer state and gradients in vlm.dtype); "none" trains in vlm.dtype. bf16 needs
    # no loss scaling (float16 would, so it is not offered). Validation loss is always computed
    # without autocast, so runs with and without it compare. "auto": bfloat16 on hardware with
    # bf16 kernels (CUDA, AVX-512 CPUs), none elsewhere, decided per worker: emulated bf16 made an
    # AVX2-only CPU's training step many times slower (BENCHMARKS.md).
    autocast: str = "none"
    # Validation loss (before/after) on a seeded sample of at most this many examples: bounds
    # its cost on big instruction sets.
    max_valid_examples: int = 256
    # Ranking validation at every checkpoint (0 = off): the model ranks the whole catalog (greedy
    # thought + constrained beam search, as the scoring job does) for a seeded sample of at most this
    # many sequential validation examples, of the EH buckets in valid_rank_buckets (empty = all);
    # HR@valid_rank_k and NDCG go to the checkpoint's metrics and metrics.json's valid_curve, with
    # the validation loss at that step. Costs a few seconds per example on a CPU.
    valid_rank_examples: int = 0
    valid_rank_k: int = 5
    valid_rank_buckets: List[str] = field(default_factory=list)
    # The adapter the stage exports: "last" (the final step) or "best_valid_hr" (the checkpoint with
    # the highest validation HR, ties to the later step; needs valid_rank_examples > 0). The
    # teacher-forced validation loss is no guide here: it ranked models the wrong way round (RESULTS.md).
    export: str = "last"


@dataclass
class PlannerConfig:
    """Risk-aware planner (paper 3.3, 4.3, Appendix B)."""

    # Tiers: low risk = EH bucket in bypass_buckets AND confidence >= bypass_confidence -> tools
    # only; high risk = EH bucket in consult_buckets AND confidence < consult_confidence -> VLM
    # consults tools; anything else is medium -> VLM alone. Paper: bypass [low], consult [high].
    bypass_buckets: List[str] = field(default_factory=lambda: ["low"])
    consult_buckets: List[str] = field(default_factory=lambda: ["high"])
    bypass_confidence: float = 0.5
    consult_confidence: float = 0.3
    # VLM-aware bypass (our extension of the paper's rule): the planner stage also measures how
    # often the fine-tuned VLM (with the chosen tools in its prompt) is right on validation
    # queries per EH bucket; a query is low risk too when P(tool right) >= that rate +
    # vlm_margin, i.e. the tools are likelier right than the VLM would be.
    vlm_aware: bool = False
    vlm_margin: float = 0.0
    vlm_fit_queries: int = 64  # validation queries per task the VLM answers for that estimate
    max_tools: int = 3
    # learned (xgboost on usable labels) | random | oracle (uses the truth: evaluation only) | fixed
    # (one ranking for every query: validation usable rate, or the instructions' tool_ranking
    # under instructions.hint_order=usable_rate)
    tool_choice: str = "learned"
    # The learned choice is kept only where it beats the best fixed tool on held-out validation
    # queries by more than guard_z standard errors of the paired difference; else that fixed
    # tool answers (planner/summary.json says which and why). -1: no guard.
    guard_z: float = 2.0
    # Ranking tasks: also learn to rank the union of every tool's top fusion_top_n answers
    # (xgboost rank:ndcg on validation queries, reasonrec/fusion.py); the guard keeps it only where
    # it beats the best fixed tool (and the learned choice) on the held-out half by guard_z SEs.
    fusion: bool = True
    fusion_top_n: int = 10
    fusion_rounds: int = 100
    # "the tool answer is right" = the primary tool ranks the truth within its top correct_k
    correct_k: int = 5
    confidence_rounds: int = 100  # xgboost boosting rounds (confidence and tool choice models)
    max_fit_queries: int = 5000  # validation queries per task the planner models are fitted on
    calibration_holdout: float = 0.3  # share of them held out to report the confidence's calibration
    seed: int = 0


@dataclass
class ScoreConfig:
    """The batch-scoring job (the main job)."""

    tasks: List[str] = field(default_factory=lambda: list(TASKS))
    split: str = "test"  # which prepared queries to score, or ...
    queries_path: Optional[str] = None  # ... a Parquet query file (local or s3://)
    max_queries_per_task: int = 0  # 0 = all; sampled by hash for CPU budgets
    k: int = 10  # items returned per ranking query
    # "routed" (the planner decides), "tools" (tools only), "vlm" (VLM alone), "vlm_tools" (VLM
    # + tools always): the last three are the paper's comparison baselines.
    mode: str = "routed"
    # Stage (folder) the predictions go to: other names keep side runs (a query file, a baseline
    # mode) next to the main "score" output, which evaluate reads.
    stage_name: str = "score"
    # Router actors; 0 = auto (ray_jobs.score.router_actors: one per 100 shards, as the CPUs allow).
    # build_instructions and the planner fit use one actor when 0.
    tool_actors: int = 0
    vlm_actors: int = 1
    vlm_gpus: float = 0.0  # GPUs per VLM actor
    # CPUs each actor reserves (Ray's logical CPUs). 1 each means a router pool and a VLM pool
    # as large as the machine run one after the other; fractions let them overlap.
    tool_cpus: float = 1.0
    vlm_cpus: float = 1.0
    tool_batch_size: int = 256
    vlm_batch_size: int = 4
    shard_rows: int = 1000  # queries per output shard (the unit of resume)
    max_task_retries: int = 3  # actor restarts / batch retries before the job fails
    # Count torch FLOPs per query (torch.utils.flop_counter) for the cost-per-tier table (paper
    # Table A3). Only torch ops are counted (not NumPy top-k or xgboost); slows scoring a little.
    count_flops: bool = False
    # While shards finish, log a progress line (queries done / total, q/s, ETA, VLM calls) at
    # least this often, also while no shard finishes; 0 = off. Not part of the score hash.
    progress_every_s: float = 30.0
    # VLM calls for the whole run (-1 = unlimited, 0 = none): queries the planner routes to the VLM
    # compete for it by expected gain, P(VLM right) - P(tool right); the rest keep their tool's
    # answer, flagged vlm_skipped. Part of the score hash (when set).
    vlm_budget: int = -1


@dataclass
class ServeConfig:
    """Ray Serve application (reasonrec/serve)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_history: int = 1000  # longer inline histories / candidate lists -> 413
    max_candidates: int = 1000
    max_items_ctr: int = 1000
    tool_replicas: List[int] = field(default_factory=lambda: [1, 4])  # autoscaling min, max
    vlm_replicas: List[int] = field(default_factory=lambda: [1, 2])
    planner_replicas: List[int] = field(default_factory=lambda: [1, 2])
    target_ongoing_requests: int = 4
    max_ongoing_requests: int = 16
    max_queued_requests: int = 64
    vlm_batch_size: int = 4
    vlm_batch_wait_s: float = 0.02
    tool_cpus: float = 0.5
    vlm_cpus: float = 1.0
    vlm_gpus: float = 0.0
    # The FastAPI ingress and (split graph) the planner deployment. The request limits above apply
    # to every deployment; defaults fit one replica each on 2 CPUs.
    ingress_replicas: List[int] = field(default_factory=lambda: [1, 2])
    ingress_cpus: float = 0.1
    planner_cpus: float = 0.25
    request_timeout_s: float = 60.0  # HTTP requests still running after this get 408, never hang
    # A request body over this many bytes is a 413, answered from its Content-Length (or, chunked,
    # once that many bytes arrived) without reading the rest.
    max_body_bytes: int = 1048576
    # "fused": the ingress replica routes in-process (planner + tools there, concurrent requests'
    # rows micro-batched into one Router call), only medium / high rows take a hop (to the VLM);
    # "split": ingress -> planner -> tools / VLM, each its own deployment (tools scale apart).
    graph: str = "fused"
    route_batch_rows: int = 64  # most query rows per Router call of the fused ingress's micro-batch
    # torch FLOPs per query (score.count_flops's measurement) in the app: no answer reports them and
    # counting costs several times the tools' own compute, so off unless profiling.
    count_flops: bool = False
    # Autoscaling of every deployment: how long the load must stay above / below the target before
    # replicas are added / removed, and the window of ongoing requests averaged (Serve's defaults).
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    look_back_period_s: float = 30.0
    # Ray Serve's throughput-optimized mode on a Ray this launcher starts (on a cluster: `ray start`
    # with reasonrec.runtime.serve_env's variables, as cluster/ sets them): each ingress replica also answers HTTP
    # on its own port, from direct_port up (no proxy hop), user code on the replica's event loop,
    # gRPC between deployments. Serve's proxy keeps answering on `port`.
    direct_ingress: bool = True
    direct_port: int = 8100


@dataclass
class ImagesConfig:
    """The ``images`` stage (ray_jobs/images.py): item photos fetched, checked and resized once."""

    size: Optional[int] = None  # square side in pixels; None: vlm.image_size (336 when that is None too)
    format: str = "jpeg"  # re-encoded as jpeg | png
    quality: int = 90  # JPEG quality
    max_pixels: int = 50_000_000  # larger declared sizes are refused before decoding (too_large)
    max_bytes: int = 32 << 20  # larger files are refused before reading them whole (too_large)
    batch_size: int = 256  # items per map_batches call: bounds each worker's memory
    fetch_http: bool = True  # fetch http(s) image URLs (Amazon's imUrl); false: they stay unsupported
    http_timeout_s: float = 20.0  # per http(s) photo: to connect, to wait for the answer, to read the body
    http_retries: int = 2  # further tries after a connection error, a timeout or a 408/429/5xx answer


@dataclass
class EvaluateConfig:
    """The ``evaluate`` stage (``{run}/report/``)."""

    # Other runs (names under the same output_root) whose evaluated numbers the report shows next to
    # this run's, each under its own split protocol: e.g. a time-shift run compared with the
    # random-split (leave-one-out) run of the same world and budget. Each needs its report already.
    compare_with: List[str] = field(default_factory=list)
    # A multi-domain run (data.sources with several domains) reports every table per domain too;
    # this maps a domain to the single-domain run (a name under the same output_root; one not
    # evaluated yet is listed as missing) its per-domain drop section compares with, e.g. {beauty: beauty}.
    domain_baselines: Dict[str, str] = field(default_factory=dict)


@dataclass
class PipelineConfig:
    """``ray_jobs.pipeline`` (the main command) beyond running the stages in order."""

    # Also run the time-shift comparison (paper Fig. A1): a second run of the same world under
    # data.split_protocol=timeshift, tools only (score.mode=tools: no instructions, no fine-tune,
    # no explanation queries), named ``timeshift_run_name``; this run's report then shows its
    # numbers next to its own (as evaluate.compare_with does). Each stage of it is cached like the
    # main run's. Ignored by a run that is a time-shift run itself (data.split_protocol=timeshift).
    timeshift_comparison: bool = False
    timeshift_run_name: str = ""  # "" = "<run_name>-timeshift" (under the same output_root)
    # The time-shift run's data.timeshift_quantile (its cut-off); None = data.timeshift_quantile.
    timeshift_quantile: Optional[float] = None
    # The time-shift run's tools.enabled (a named subset keeps its cost down); [] = tools.enabled.
    timeshift_tools: List[str] = field(default_factory=list)


@dataclass
class RunConfig:
    run_name: str = "quickstart"
    output_root: str = "runs"
    seed: int = 0
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    vlm: VLMConfig = field(default_factory=VLMConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    instructions: InstructionsConfig = field(default_factory=InstructionsConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


# ----------------------------------------------------------------------------------- loading
class ConfigError(ValueError):
    """A config file or override is invalid; the message names the offending key."""


def _format_error(exc: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0]
    return ConfigError(f"config error in {origin}: key '{key}': {msg}")


def _load_yaml_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, DictConfig]]:
    """Return the layers of one preset file, its ``defaults:`` (recursively) first."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config error: cycle in defaults: {' -> '.join(map(str, seen + (path,)))}")
    if not path.exists():
        raise ConfigError(f"config error: file not found: {path}")
    raw = OmegaConf.load(path)
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"config error in {path}: top level must be a mapping")
    layers: list[tuple[str, DictConfig]] = []
    defaults = raw.pop("defaults", [])
    for name in defaults or []:
        dep = path.parent / str(name)
        if not dep.suffix:
            dep = dep.with_suffix(".yaml")
        layers.extend(_load_yaml_layers(dep, seen + (path,)))
    layers.append((str(path), raw))
    return layers


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Compose schema defaults, a preset file (with its defaults) and ``key=value`` overrides."""
    cfg = OmegaConf.structured(RunConfig)
    layers = _load_yaml_layers(Path(path)) if path else []
    for origin, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            raise _format_error(exc, origin) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"config error: override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        try:
            # update() (not a merge of from_dotlist) so list indices work: data.sources.0.path=...
            parsed = OmegaConf.from_dotlist([f"v={value}"])["v"]
            OmegaConf.update(cfg, key.strip(), parsed, merge=True)
        except OmegaConfBaseException as exc:
            raise _format_error(exc, f"override '{item}'") from None
        except (TypeError, IndexError, ValueError) as exc:
            raise ConfigError(f"config error in override '{item}': key '{key}': {exc}") from None
    try:
        OmegaConf.resolve(cfg)
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise _format_error(exc, str(path)) from None
    validate(obj)
    return resolve_paths(obj)


# ------------------------------------------------------------------------------------ paths
def _is_url(value: str) -> bool:
    return "://" in value


def _local_model_dir(value: str, base: str) -> bool:
    """``vlm.model`` names a built-in ("tiny", "small"), a hub id ("org/name") or a local folder;
    only the last is a path. A hub id is left alone unless a folder of that name exists."""
    import os

    if value in ("tiny", "small") or _is_url(value):
        return False
    return value.startswith((".", "/", "~")) or os.path.isdir(os.path.join(base, os.path.expanduser(value)))


def _path_fields(cfg: RunConfig) -> list[tuple[str, Any, str]]:
    """(dotted key, owning dataclass, attribute) of every config value that names a local file or
    folder. The one list of them: :func:`resolve_paths` and :func:`config_paths` read it."""
    out: list[tuple[str, Any, str]] = [
        ("output_root", cfg, "output_root"),
        ("score.queries_path", cfg.score, "queries_path"),
        ("vlm.cache_dir", cfg.vlm, "cache_dir"),
    ]
    for i, src in enumerate(cfg.data.sources):
        out += [(f"data.sources.{i}.path", src, "path"), (f"data.sources.{i}.images_dir", src, "images_dir")]
    return out


def resolve_paths(cfg: RunConfig, base: str | None = None) -> RunConfig:
    """Make every local path of ``cfg`` absolute against ``base`` (default: the working directory).

    Called once, on the driver, by :func:`load_config`: Ray Train workers, Ray Data tasks and actors
    and Serve replicas run in other working directories (a Train worker's is the Ray session's
    ``artifacts/<run>`` folder), so a relative path would name another place there. Under
    ``ray job submit`` the driver runs in the job's working directory (``--working-dir``), so a
    relative path means a path inside it. ``s3://`` (any URL) is left as it is; ``~`` is expanded.
    Idempotent; changes ``cfg`` in place and returns it."""
    import os

    base = os.path.abspath(base or os.getcwd())

    def absolute(value: str) -> str:
        return os.path.normpath(os.path.join(base, os.path.expanduser(value)))

    for _, owner, attr in _path_fields(cfg):
        value = getattr(owner, attr)
        if value and not _is_url(value):
            setattr(owner, attr, absolute(value))
    if cfg.vlm.model and _local_model_dir(cfg.vlm.model, base):
        cfg.vlm.model = absolute(cfg.vlm.model)
    return cfg


def config_paths(cfg: RunConfig) -> dict[str, str]:
    """The config's file and folder locations (set ones only), as stage manifests record them."""
    out = {key: getattr(owner, attr) for key, owner, attr in _path_fields(cfg) if getattr(owner, attr)}
    if cfg.vlm.model.startswith("/"):
        out["vlm.model"] = cfg.vlm.model
    return out


_CHOICES = {
    "data.eh_normalizer": ("max", "quantile", "rank", "log"),
    "planner.tool_choice": ("learned", "random", "oracle", "fixed"),
    "instructions.hint_order": ("random", "usable_rate"),
    "score.mode": ("routed", "tools", "vlm", "vlm_tools"),
    "finetune.autocast": ("none", "bfloat16", "auto"),  # reasonrec.vlm.train.AUTOCAST_CHOICES
    "finetune.export": ("last", "best_valid_hr"),
    "ray.shuffle_strategy": (
        "auto",
        "sort_shuffle_pull_based",
        "sort_shuffle_push_based",
        "hash_shuffle",
        "shuffle_v2",
    ),
}
SOURCE_KINDS = ("synthetic", "p5", "amazon", "recbole", "pixelrec", "hm")


def planner_warnings(cfg: RunConfig) -> list[str]:
    """Valid settings that work against each other where the planner consults the VLM (score and
    Serve log them)."""
    out = []
    if cfg.instructions.hint_order == "usable_rate" and cfg.planner.tool_choice != "fixed":
        out.append(
            f"instructions.hint_order=usable_rate trained the VLM on the tools that planner.tool_choice=fixed "
            f"shows, but planner.tool_choice={cfg.planner.tool_choice} shows others per query: expect the VLM "
            f"to use their answers far less (docs/experiments/2026-11-29-does-the-fine-tuned-vlm-beat-popularity.md, "
            f"'Hints in most training examples')"
        )
    return out


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Checks the schema's types cannot express (choices, ranges)."""
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"config error: key '{key}': '{_get(cfg, key)}' not in {choices}")
    for key in ("instructions.tasks", "score.tasks"):
        bad = [t for t in _get(cfg, key) if t not in TASKS]
        if bad:
            raise ConfigError(f"config error: key '{key}': unknown task(s) {bad}; choose from {TASKS}")
    bad = [s for s in cfg.tools.predict_splits if s not in ("train", "valid", "test")]
    if bad or not cfg.tools.predict_splits:
        raise ConfigError(
            f"config error: key 'tools.predict_splits': need a non-empty subset of train/valid/test, "
            f"got {list(cfg.tools.predict_splits)}"
        )
    for key in ("planner.bypass_buckets", "planner.consult_buckets", "finetune.valid_rank_buckets"):
        bad = [b for b in _get(cfg, key) if b not in EH_BUCKETS]
        if bad:
            raise ConfigError(f"config error: key '{key}': unknown bucket(s) {bad}; choose from {EH_BUCKETS}")
    for key in (
        "tools.holdout_items",
        "vlm.thought_tool_sets",
        "vlm.sequential_pool",
        "score.progress_every_s",
        "score.tool_actors",
    ):
        if _get(cfg, key) < 0:
            raise ConfigError(f"config error: key '{key}': must be >= 0")
    if cfg.score.vlm_budget < -1:
        raise ConfigError("config error: key 'score.vlm_budget': must be >= 0, or -1 (unlimited)")
    ft = cfg.finetune
    if ft.valid_rank_examples < 0 or ft.valid_rank_k < 1:
        raise ConfigError("config error: keys 'finetune.valid_rank_examples' (>= 0) / 'finetune.valid_rank_k' (>= 1)")
    if ft.valid_rank_examples and not (
        {"sequential"} <= set(cfg.instructions.tasks) and "valid" in cfg.instructions.splits
    ):
        raise ConfigError(
            "config error: key 'finetune.valid_rank_examples': ranks sequential validation "
            "examples; instructions.tasks needs 'sequential' and instructions.splits 'valid'"
        )
    if ft.export == "best_valid_hr" and not ft.valid_rank_examples:
        raise ConfigError(
            "config error: key 'finetune.export': 'best_valid_hr' needs ranking validation; "
            "set finetune.valid_rank_examples > 0"
        )
    if cfg.ray.data_no_progress_timeout_s < 0 and cfg.ray.data_no_progress_timeout_s != -1:
        raise ConfigError(
            "config error: key 'ray.data_no_progress_timeout_s': seconds > 0, 0 (Ray's default) or -1 (off)"
        )
    if cfg.instructions.tool_order and cfg.instructions.hint_order != "usable_rate":
        raise ConfigError(
            "config error: key 'instructions.tool_order': orders the usable_rate ranking; "
            "set instructions.hint_order=usable_rate (random hints have no order to pin)"
        )
    if not 0.0 <= cfg.instructions.hint_fraction <= 1.0:
        raise ConfigError("config error: key 'instructions.hint_fraction': must be in [0, 1]")
    if not 1 <= cfg.planner.max_tools <= 3:
        raise ConfigError("config error: key 'planner.max_tools': must be 1..3 (the paper caps tool use at 3)")
    if cfg.planner.fusion and cfg.planner.fusion_top_n < cfg.planner.correct_k:
        raise ConfigError("config error: key 'planner.fusion_top_n': must be >= planner.correct_k")
    if cfg.serve.max_body_bytes <= 0:
        raise ConfigError("config error: key 'serve.max_body_bytes': must be > 0")
    if cfg.serve.graph not in ("fused", "split"):
        raise ConfigError(f"config error: key 'serve.graph': {cfg.serve.graph!r} is not one of fused, split")
    if cfg.serve.route_batch_rows < 1:
        raise ConfigError("config error: key 'serve.route_batch_rows': must be >= 1")
    for key in ("serve.tool_replicas", "serve.vlm_replicas", "serve.planner_replicas", "serve.ingress_replicas"):
        v = _get(cfg, key)
        if len(v) != 2 or not 0 <= v[0] <= v[1] or v[1] < 1:
            raise ConfigError(f"config error: key '{key}': need [min, max] with 0 <= min <= max, max >= 1")
    lo, hi = (list(cfg.data.eh_thresholds) + [None, None])[:2]
    if len(cfg.data.eh_thresholds) != 2 or not (0.0 <= lo <= hi <= 1.0):
        raise ConfigError("config error: key 'data.eh_thresholds': need two values 0 <= low <= high <= 1")
    if cfg.data.ctr_protocol not in ("loo", "random"):
        raise ConfigError(f"config error: key 'data.ctr_protocol': {cfg.data.ctr_protocol!r} is not one of loo, random")
    if cfg.data.split_protocol not in ("loo", "timeshift"):
        raise ConfigError(
            f"config error: key 'data.split_protocol': {cfg.data.split_protocol!r} is not one of loo, timeshift"
        )
    if not 0.0 < cfg.data.timeshift_quantile < 1.0:
        raise ConfigError("config error: key 'data.timeshift_quantile': must be in (0, 1)")
    pl = cfg.pipeline
    if pl.timeshift_quantile is not None and not 0.0 < pl.timeshift_quantile < 1.0:
        raise ConfigError("config error: key 'pipeline.timeshift_quantile': must be in (0, 1), or null")
    if pl.timeshift_comparison and (pl.timeshift_run_name or f"{cfg.run_name}-timeshift") == cfg.run_name:
        raise ConfigError("config error: key 'pipeline.timeshift_run_name': must differ from run_name")
    for name in ("ctr_split", "explanation_split"):
        parts = getattr(cfg.data, name)
        if len(parts) != 3 or abs(sum(parts) - 1.0) > 1e-6 or min(parts) < 0:
            raise ConfigError(f"config error: key 'data.{name}': need three fractions summing to 1")
    if not cfg.data.sources:
        raise ConfigError("config error: key 'data.sources': at least one source is required")
    for i, src in enumerate(cfg.data.sources):
        if src.kind not in SOURCE_KINDS:
            raise ConfigError(f"config error: key 'data.sources.{i}.kind': '{src.kind}' not in {SOURCE_KINDS}")
        if src.kind != "synthetic" and not src.path:
            raise ConfigError(f"config error: key 'data.sources.{i}.path': required for kind '{src.kind}'")
    if len({s.domain for s in cfg.data.sources}) != len(cfg.data.sources):
        raise ConfigError("config error: key 'data.sources': each source needs its own 'domain'")
    domains = {s.domain for s in cfg.data.sources}
    for domain, run in cfg.evaluate.domain_baselines.items():
        if domain not in domains:
            raise ConfigError(
                f"config error: key 'evaluate.domain_baselines.{domain}': not a domain of data.sources "
                f"{sorted(domains)}"
            )
        if not run or run == cfg.run_name:
            raise ConfigError(
                f"config error: key 'evaluate.domain_baselines.{domain}': needs another run's name, got {run!r}"
            )
    if cfg.data.direct_negatives < 1 or cfg.data.ctr_negatives < 1:
        raise ConfigError("config error: key 'data.direct_negatives'/'data.ctr_negatives': must be >= 1")


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def section_hash(obj: Any) -> str:
    """Stable hash of a config section (used in stage manifests)."""
    container = OmegaConf.to_container(OmegaConf.structured(obj)) if not isinstance(obj, (dict, list)) else obj
    blob = json.dumps(container, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------------------- CLI
def build_arg_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--config", default=str(CONFIG_DIR / "quickstart.yaml"), help="preset YAML (default: configs/quickstart.yaml)"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--force", action="store_true", help="re-run stages even if their manifest matches")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. output_root=s3://bucket/runs")
    return p


def parse_cli(description: str, argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, RunConfig]:
    """Parse ``--config PATH [--print-config] [--force] key=value ...``. Exits with status 2 and a
    one-line message on a config error, as argparse does for bad flags."""
    parser = build_arg_parser(description)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        parser.exit(2, f"{exc}\n")
    if args.print_config:
        print(to_yaml(cfg))
        parser.exit(0)
    return args, cfg
