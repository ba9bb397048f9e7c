"""The Serve application builder: our omegaconf config -> the deployment graph.

``reasonrec.serve.app:build_app`` is the import path for ``serve run`` / ``serve deploy`` config
files and KubeRay's RayService; its ``args`` are ``{"config": <preset path>, "overrides":
["key=value", ...]}`` (the same preset and overrides the batch jobs take). The app serves the run
``{output_root}/{run_name}`` that config names: its tools, planner and fine-tuned adapter.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict
from ray.serve import Application

from reasonrec.config import CONFIG_DIR, ConfigError, RunConfig, load_config
from reasonrec.serve.deployments import VLM, Ingress, Planner, Tools


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: str
    overrides: list[str] = []


def _preset(path: str) -> Path:
    """A relative preset path is taken from the working directory, else from the repository
    (Serve may build the app in a process whose working directory is elsewhere)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return CONFIG_DIR.parent / p


def build_app(args: dict) -> Application:
    a = AppArgs.model_validate(args)
    return build(load_config(_preset(a.config), a.overrides))


def _options(cfg: RunConfig, replicas: list[int], **resources) -> dict:
    s = cfg.serve
    return {
        "autoscaling_config": {
            "min_replicas": replicas[0],
            "max_replicas": replicas[1],
            "target_ongoing_requests": s.target_ongoing_requests,
            "upscale_delay_s": s.upscale_delay_s,
            "downscale_delay_s": s.downscale_delay_s,
            "look_back_period_s": s.look_back_period_s,
        },
        "ray_actor_options": resources,
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
    }


def build(cfg: RunConfig) -> Application:
    if cfg.planner.tool_choice == "oracle":
        raise ConfigError("config error: key 'planner.tool_choice': 'oracle' needs the truth; it cannot serve")
    s = cfg.serve
    vlm = VLM.options(
        **_options(cfg, s.vlm_replicas, num_cpus=s.vlm_cpus, num_gpus=s.vlm_gpus),
        user_config={"max_batch_size": s.vlm_batch_size, "batch_wait_timeout_s": s.vlm_batch_wait_s},
    ).bind(cfg)
    ingress = Ingress.options(**_options(cfg, s.ingress_replicas, num_cpus=s.ingress_cpus))
    if s.graph == "fused":  # the ingress routes itself (tools in process): only the VLM is a hop
        return ingress.bind(cfg, vlm)
    tools = Tools.options(**_options(cfg, s.tool_replicas, num_cpus=s.tool_cpus)).bind(cfg)
    planner = Planner.options(**_options(cfg, s.planner_replicas, num_cpus=s.planner_cpus)).bind(cfg, tools, vlm)
    return ingress.bind(cfg, planner)
