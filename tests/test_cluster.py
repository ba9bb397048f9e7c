"""Validation of the cluster configs under cluster/ and of the commands the docs tell people to run.

No cloud and no Kubernetes here, so the manifests are checked for what can go wrong without one:
they parse (multi-document), the Ray launcher config passes Ray's own schema, the KubeRay specs
are internally consistent (worker groups, rayStartParams vs container resources, GPU requests,
autoscaler v2, S3 credentials on every Ray container), the RayService's serveConfigV2 passes Ray
Serve's schema, and every ``python -m ray_jobs.X --config configs/Y.yaml key=value ...`` named in
cluster/ or in README code blocks names an entry point that exists, a preset that loads and keys
that exist. The preset's GPU demand must fit the cluster it is submitted to. The checker is run on
broken copies too, to prove it catches each kind of mistake.
"""

from __future__ import annotations

import ast
import copy
import functools
import math
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from reasonrec.config import ConfigError, RunConfig, load_config

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
GPU_PRESET = "configs/llava7b.yaml"
WORKER_GROUPS = {"cpu-workers", "gpu-workers"}
SERVE_IMPORT_PATH = "reasonrec.serve.app:build_app"
EXPECTED_FILES = [
    "aws.yaml",
    "serve.yaml",
    "kuberay/raycluster.yaml",
    "kuberay/rayjob.yaml",
    "kuberay/rayservice.yaml",
    "local_job_submit.sh",
    "Dockerfile",
]


# ------------------------------------------------------------------------------------ helpers
def _qty(v) -> float:
    """A Kubernetes CPU/GPU quantity ("500m", "4", 1) as a number."""
    s = str(v).strip()
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def _env(container: dict) -> dict:
    return {e.get("name"): e for e in container.get("env") or []}


def gpu_demand(cfg: RunConfig) -> int:
    """GPUs the preset asks for at once in one stage (fine-tune, tools, scoring, serving)."""
    return max(
        cfg.finetune.num_workers if cfg.finetune.use_gpu else 0,
        cfg.tools.num_workers if cfg.tools.use_gpu else 0,
        math.ceil(cfg.score.vlm_actors * cfg.score.vlm_gpus),
        math.ceil(cfg.serve.vlm_replicas[1] * cfg.serve.vlm_gpus),
    )


class Capacity:
    """What a cluster can offer at most: total GPUs, and the CPUs of the smallest GPU node."""

    def __init__(self, gpus: float, cpus_per_gpu_node: float | None):
        self.gpus, self.cpus_per_gpu_node = gpus, cpus_per_gpu_node

    def check(self, cfg: RunConfig, where: str) -> list[str]:
        errs = []
        need = gpu_demand(cfg)
        if need > self.gpus:
            errs.append(f"{where}: preset needs {need} GPUs at once but the cluster has at most {self.gpus:g}")
        if (
            cfg.finetune.use_gpu
            and self.cpus_per_gpu_node is not None
            and cfg.finetune.cpus_per_worker > self.cpus_per_gpu_node
        ):
            errs.append(
                f"{where}: finetune.cpus_per_worker={cfg.finetune.cpus_per_worker} does not fit a GPU "
                f"node's {self.cpus_per_gpu_node:g} CPUs"
            )
        return errs


# ------------------------------------------------------------------------- command checking
_CMD = re.compile(r"\bpython[0-9.]*\s+-m\s+ray_jobs\.")
_SHELL_OPS = {"&&", "||", ";", "|", "&", ">", ">>", "2>&1"}
_PLACEHOLDER = re.compile(r"[$<{]")


def find_commands(text: str) -> list[str]:
    """Every ``python -m ray_jobs.X ...`` command line in shell-like text (continuations joined)."""
    text = text.replace("\\\n", " ")
    return [line[m.start() :] for line in text.splitlines() for m in [_CMD.search(line)] if m]


def _comment_text(text: str) -> str:
    return "\n".join(line.split("#", 1)[1] for line in text.splitlines() if line.lstrip().startswith("#"))


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _has_main(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)


@functools.cache
def _load_cached(path: str, layers_text: str, overrides: tuple) -> tuple[RunConfig | None, str | None]:
    """load_config, memoised on the preset's text and every config file's (omegaconf is slow)."""
    try:
        return load_config(path, list(overrides)), None
    except ConfigError as exc:
        return None, str(exc)


def _load_preset(repo: Path, preset: str, overrides: list[str], where: str) -> tuple[RunConfig | None, list[str]]:
    path = repo / preset
    if not path.is_file():
        return None, [f"{where}: preset {preset} does not exist"]
    concrete = [o for o in overrides if not _PLACEHOLDER.search(o.split("=", 1)[1])]
    layers_text = "".join(p.read_text() for p in sorted((repo / "configs").rglob("*.yaml")))
    cfg, err = _load_cached(str(path), layers_text, tuple(concrete))
    if err:
        return None, [f"{where}: {preset} with {concrete}: {err}"]
    errs = []
    for o in overrides:  # placeholder values ($OUT, <dir>): the key must still exist
        if o not in concrete:
            node: object = cfg
            for part in o.split("=", 1)[0].split("."):
                node = (
                    node[int(part)]
                    if part.isdigit() and isinstance(node, list) and int(part) < len(node)
                    else getattr(node, part, KeyError)
                )
                if node is KeyError:
                    errs.append(f"{where}: override '{o}': no such key in {preset}")
                    break
    return cfg, errs


def check_command(cmd: str, repo: Path, where: str) -> tuple[RunConfig | None, list[str]]:
    """Check one ``python -m ray_jobs.X [--config P] [key=value ...]`` command; returns the loaded
    preset (for capacity checks) and the problems found."""
    try:
        tokens = shlex.split(cmd, comments=True)
    except ValueError as exc:
        return None, [f"{where}: cannot parse command {cmd!r}: {exc}"]
    for i, tok in enumerate(tokens):
        if tok in _SHELL_OPS or tok.startswith((">", "|")):
            tokens = tokens[:i]
            break
    module = tokens[2].split(".", 1)[1] if len(tokens) > 2 and "." in tokens[2] else ""
    errs = []
    entry = repo / "ray_jobs" / f"{module}.py"
    if not module or not entry.is_file():
        errs.append(f"{where}: `python -m ray_jobs.{module}`: ray_jobs/{module}.py does not exist")
    elif not _has_main(entry):
        errs.append(f"{where}: ray_jobs/{module}.py has no main()")
    args = tokens[3:]
    preset = "configs/quickstart.yaml"
    if "--config" in args:
        j = args.index("--config")
        if j + 1 >= len(args):
            return None, errs + [f"{where}: --config without a path in {cmd!r}"]
        preset = args[j + 1]
    overrides = [a for a in args if re.match(r"^[A-Za-z_][\w.]*=", a)]
    cfg, more = _load_preset(repo, preset, overrides, where)
    return cfg, errs + more


def check_commands_in(text: str, repo: Path, where: str, capacity: Capacity | None = None) -> list[str]:
    errs = []
    for cmd in find_commands(text):
        cfg, e = check_command(cmd, repo, where)
        errs += e
        if cfg is not None and capacity is not None:
            errs += capacity.check(cfg, f"{where}: {cmd.split()[2]}")
    return errs


# ------------------------------------------------------------------ Ray cluster launcher
def launcher_capacity(cfg: dict) -> Capacity:
    types = cfg.get("available_node_types") or {}
    gpu = [
        t for n, t in types.items() if n != cfg.get("head_node_type") and (t.get("resources") or {}).get("GPU", 0) > 0
    ]
    total = sum(min(t.get("max_workers", 0), cfg.get("max_workers", 0)) * t["resources"]["GPU"] for t in gpu)
    cpus = min((t["resources"].get("CPU", 0) for t in gpu), default=None)
    return Capacity(total, cpus)


def check_launcher(cfg: dict, where: str) -> list[str]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    errs = []
    try:
        validate_config(prepare_config(copy.deepcopy(cfg)))
    except Exception as exc:  # jsonschema.ValidationError, ValueError, KeyError, ...
        errs.append(f"{where}: Ray cluster-config schema: {str(exc).splitlines()[0]}")
    for key in ("cluster_name", "max_workers", "idle_timeout_minutes", "head_node_type", "available_node_types"):
        if key not in cfg:
            errs.append(f"{where}: missing '{key}'")
    types = cfg.get("available_node_types") or {}
    head = cfg.get("head_node_type")
    if head not in types:
        errs.append(f"{where}: head_node_type '{head}' is not one of available_node_types {sorted(types)}")
    workers = {n: t for n, t in types.items() if n != head}
    for name, t in types.items():
        if "InstanceType" not in (t.get("node_config") or {}):
            errs.append(f"{where}: node type '{name}' has no node_config.InstanceType")
        if "resources" not in t:
            errs.append(f"{where}: node type '{name}' does not declare its resources")
    for name, t in workers.items():
        lo, hi = t.get("min_workers", 0), t.get("max_workers")
        if hi is None:
            errs.append(f"{where}: worker type '{name}' has no max_workers")
        elif not 0 <= lo <= hi:
            errs.append(f"{where}: worker type '{name}': need 0 <= min_workers ({lo}) <= max_workers ({hi})")
        elif hi > cfg.get("max_workers", 0):
            errs.append(
                f"{where}: worker type '{name}': max_workers {hi} > cluster max_workers {cfg.get('max_workers')}"
            )
    gpu = {n for n, t in workers.items() if (t.get("resources") or {}).get("GPU", 0) > 0}
    if not gpu:
        errs.append(f"{where}: no GPU worker type (resources.GPU > 0)")
    if not set(workers) - gpu:
        errs.append(f"{where}: no CPU-only worker type")
    for name in gpu:
        itype = str(types[name].get("node_config", {}).get("InstanceType", ""))
        if not itype.startswith(("g", "p")):
            errs.append(f"{where}: GPU worker type '{name}' has non-GPU instance type '{itype}'")
    setup = " ".join(cfg.get("setup_commands", []) + cfg.get("worker_setup_commands", []))
    if "make setup VARIANT=gpu" not in setup:
        errs.append(f"{where}: setup commands do not install the GPU variant (make setup VARIANT=gpu)")
    if not any("ray start --head" in c for c in cfg.get("head_start_ray_commands", [])):
        errs.append(f"{where}: head_start_ray_commands do not run `ray start --head`")
    if not any("ray start --address=" in c for c in cfg.get("worker_start_ray_commands", [])):
        errs.append(f"{where}: worker_start_ray_commands do not run `ray start --address=...`")
    return errs


# ----------------------------------------------------------------------------------- KubeRay
def check_ray_cluster_spec(spec: dict, where: str) -> tuple[Capacity | None, list[str]]:
    errs = []
    if not isinstance(spec, dict):
        return None, [f"{where}: no Ray cluster spec"]
    if spec.get("enableInTreeAutoscaling") is not True:
        errs.append(f"{where}: enableInTreeAutoscaling must be true")
    head = spec.get("headGroupSpec") or {}
    head_containers = (head.get("template") or {}).get("spec", {}).get("containers") or [{}]
    v2_field = (spec.get("autoscalerOptions") or {}).get("version") == "v2"
    v2_env = str((_env(head_containers[0]).get("RAY_enable_autoscaler_v2") or {}).get("value", "")).lower() in (
        "1",
        "true",
    )
    if v2_field and v2_env:
        errs.append(
            f"{where}: autoscaler v2 set both by autoscalerOptions.version and RAY_enable_autoscaler_v2 "
            f"(KubeRay rejects that; keep autoscalerOptions.version)"
        )
    elif not (v2_field or v2_env):
        errs.append(f"{where}: autoscaler v2 not enabled (autoscalerOptions.version: v2)")
    groups = spec.get("workerGroupSpecs") or []
    names = [g.get("groupName") for g in groups]
    if len(names) != len(set(names)):
        errs.append(f"{where}: duplicate worker group names {names}")
    if set(names) != WORKER_GROUPS:
        errs.append(f"{where}: worker groups {sorted(map(str, names))} != {sorted(WORKER_GROUPS)}")
    pods = [("head", head, True)] + [(str(g.get("groupName")), g, False) for g in groups]
    gpus_total, gpu_node_cpus, secrets = 0.0, [], set()
    for name, group, is_head in pods:
        w = f"{where}: {name}"
        params = group.get("rayStartParams") or {}
        for k, v in params.items():
            if not isinstance(v, str):
                errs.append(f"{w}: rayStartParams.{k} must be a string (KubeRay), got {v!r}")
        pod = (group.get("template") or {}).get("spec") or {}
        containers = pod.get("containers") or []
        if not containers:
            errs.append(f"{w}: no containers")
            continue
        if pod.get("restartPolicy") != "Never":
            errs.append(f"{w}: restartPolicy should be Never with autoscaler v2 (a pod is never reused)")
        ray_c = containers[0]
        res = ray_c.get("resources") or {}
        lim, req = res.get("limits") or {}, res.get("requests") or {}
        if "cpu" not in lim:
            errs.append(f"{w}: container has no cpu limit")
            continue
        cpus = _qty(params.get("num-cpus", lim["cpu"]))
        if is_head and cpus > _qty(lim["cpu"]):
            errs.append(f"{w}: rayStartParams num-cpus {cpus:g} > container cpu limit {lim['cpu']}")
        if not is_head and cpus != _qty(lim["cpu"]):
            errs.append(f"{w}: rayStartParams num-cpus {cpus:g} != container cpu limit {lim['cpu']}")
        if "cpu" in req and _qty(req["cpu"]) > _qty(lim["cpu"]):
            errs.append(f"{w}: cpu request {req['cpu']} > limit {lim['cpu']}")
        ngpu = _qty(params.get("num-gpus", "0"))
        lim_gpu, req_gpu = (
            _qty(lim.get("nvidia.com/gpu", 0)),
            _qty(req.get("nvidia.com/gpu", lim.get("nvidia.com/gpu", 0))),
        )
        if ngpu != lim_gpu:
            errs.append(f"{w}: rayStartParams num-gpus {ngpu:g} != container nvidia.com/gpu limit {lim_gpu:g}")
        if req_gpu != lim_gpu:
            errs.append(f"{w}: nvidia.com/gpu request {req_gpu:g} != limit {lim_gpu:g}")
        if name == "gpu-workers" and lim_gpu < 1:
            errs.append(f"{w}: the GPU group does not request nvidia.com/gpu")
        if name == "cpu-workers" and lim_gpu > 0:
            errs.append(f"{w}: the CPU group requests GPUs")
        if not is_head:
            lo, hi = group.get("minReplicas", 0), group.get("maxReplicas")
            if hi is None or not 0 <= lo <= hi:
                errs.append(f"{w}: need 0 <= minReplicas ({lo}) <= maxReplicas ({hi})")
            elif not lo <= group.get("replicas", lo) <= hi:
                errs.append(f"{w}: replicas {group.get('replicas')} outside [{lo}, {hi}]")
            elif lim_gpu > 0:
                gpus_total += hi * lim_gpu
                gpu_node_cpus.append(cpus)
        env = _env(ray_c)
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            ref = ((env.get(key) or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
            if not ref.get("name"):
                errs.append(f"{w}: {key} does not come from a Secret (env valueFrom.secretKeyRef)")
            secrets.add(ref.get("name"))
    if len(secrets - {None}) > 1:
        errs.append(f"{where}: S3 credentials come from different secrets {sorted(secrets - {None})}")
    return Capacity(gpus_total, min(gpu_node_cpus, default=None)), errs


def _head_ports(spec: dict) -> dict:
    c = (((spec.get("headGroupSpec") or {}).get("template") or {}).get("spec") or {}).get("containers") or [{}]
    return {p.get("name"): p.get("containerPort") for p in c[0].get("ports") or []}


def check_serve_config(
    obj, repo: Path, where: str, head_ports: dict | None = None, cap: Capacity | None = None
) -> list[str]:
    """A Ray Serve config (RayService serveConfigV2, or a file for `serve deploy`)."""
    from ray.serve.schema import ServeDeploySchema

    errs = []
    try:
        serve_cfg = ServeDeploySchema.model_validate(obj)
    except Exception as exc:
        return [f"{where}: Serve config invalid: {str(exc).splitlines()[0]}"]
    port = serve_cfg.http_options.port
    if head_ports is not None and head_ports.get("serve") != port:
        errs.append(f"{where}: head container exposes no port 'serve' = http_options.port {port}")
    if len(serve_cfg.applications) != 1:
        errs.append(f"{where}: expected one application, got {len(serve_cfg.applications)}")
    for app in serve_cfg.applications:
        if app.import_path != SERVE_IMPORT_PATH:
            errs.append(f"{where}: import_path {app.import_path!r} != {SERVE_IMPORT_PATH!r}")
        if app.route_prefix != "/":
            errs.append(f"{where}: route_prefix {app.route_prefix!r} != '/'")
        args = app.args or {}
        if not isinstance(args.get("config"), str) or not isinstance(args.get("overrides", []), list):
            errs.append(f"{where}: args need config (a preset path) and overrides (a list)")
            continue
        cfg, e = _load_preset(repo, args["config"], [str(o) for o in args.get("overrides", [])], f"{where} args")
        errs += e
        if cfg is not None and cap is not None:
            errs += cap.check(cfg, f"{where} args")
        if cfg is not None and port != cfg.serve.port:
            errs.append(f"{where}: http_options.port {port} != the preset's serve.port {cfg.serve.port}")
        timeout = serve_cfg.http_options.request_timeout_s
        if cfg is not None and timeout is not None and timeout != cfg.serve.request_timeout_s:
            errs.append(
                f"{where}: http_options.request_timeout_s {timeout} != the preset's "
                f"serve.request_timeout_s {cfg.serve.request_timeout_s}"
            )
    return errs


def check_kuberay(doc: dict, repo: Path, where: str) -> tuple[Capacity | None, list[str]]:
    kind = doc.get("kind")
    where = f"{where} ({kind})"
    errs = []
    if doc.get("apiVersion") != "ray.io/v1":
        errs.append(f"{where}: apiVersion {doc.get('apiVersion')!r} != 'ray.io/v1'")
    spec = doc.get("spec") or {}
    if kind == "RayCluster":
        cap, e = check_ray_cluster_spec(spec, where)
        return cap, errs + e
    if kind == "RayJob":
        if not spec.get("entrypoint"):
            errs.append(f"{where}: no entrypoint")
        elif not find_commands(spec["entrypoint"]):
            errs.append(f"{where}: entrypoint does not run a ray_jobs module")
        if spec.get("shutdownAfterJobFinishes") is not True:
            errs.append(f"{where}: shutdownAfterJobFinishes must be true")
        if spec.get("runtimeEnvYAML"):
            from ray.runtime_env import RuntimeEnv

            try:
                RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))
            except Exception as exc:
                errs.append(f"{where}: runtimeEnvYAML: {exc}")
        if "rayClusterSpec" in spec:
            cap, e = check_ray_cluster_spec(spec["rayClusterSpec"], where)
            return cap, errs + e
        if not (spec.get("clusterSelector") or {}).get("ray.io/cluster"):
            errs.append(f"{where}: neither rayClusterSpec nor clusterSelector")
        return None, errs
    if kind == "RayService":
        cap, e = check_ray_cluster_spec(spec.get("rayClusterConfig"), where)
        try:
            serve_obj = yaml.safe_load(spec.get("serveConfigV2") or "")
        except yaml.YAMLError as exc:
            return cap, errs + e + [f"{where}: serveConfigV2 is not YAML: {str(exc).splitlines()[0]}"]
        return cap, errs + e + check_serve_config(
            serve_obj, repo, where, _head_ports(spec.get("rayClusterConfig") or {}), cap
        )
    return None, errs + [f"{where}: unexpected kind {kind!r}"]


# ------------------------------------------------------------------------------ the checker
def check_file(path: Path, repo: Path, where: str) -> list[str]:
    text = path.read_text()
    if path.suffix not in (".yaml", ".yml"):
        return check_commands_in(text, repo, where)
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        return [f"{where}: YAML does not parse: {str(exc).splitlines()[0]}"]
    if not docs:
        return [f"{where}: no YAML documents"]
    errs, caps = [], []
    for i, doc in enumerate(docs):
        w = f"{where}[{i}]" if len(docs) > 1 else where
        if not isinstance(doc, dict):
            errs.append(f"{w}: document is not a mapping")
        elif "kind" in doc:
            cap, e = check_kuberay(doc, repo, w)
            errs += e
            caps.append(cap)
        elif "available_node_types" in doc or "provider" in doc:
            errs += check_launcher(doc, w)
            caps.append(launcher_capacity(doc))
        elif "applications" in doc:
            errs += check_serve_config(doc, repo, w)
        else:
            errs.append(f"{w}: neither a KubeRay object, a Ray cluster-launcher config nor a Serve config")
    cap = next((c for c in caps if c is not None), None)
    strings = "\n".join(s for d in docs for s in _strings(d) if _CMD.search(s))
    return errs + check_commands_in(strings + "\n" + _comment_text(text), repo, where, cap)


def check_tree(cluster_dir: Path, repo: Path) -> list[str]:
    errs = []
    for path in sorted(p for p in cluster_dir.rglob("*") if p.is_file()):
        errs += check_file(path, repo, str(path.relative_to(cluster_dir)))
    return errs


def readme_code_blocks(text: str) -> str:
    return "\n".join(re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S))


# ------------------------------------------------------------------------------------- tests
def test_expected_files_exist():
    missing = [f for f in EXPECTED_FILES if not (CLUSTER / f).is_file()]
    assert not missing, f"missing under cluster/: {missing}"


@pytest.mark.parametrize("name", sorted(str(p.relative_to(CLUSTER)) for p in CLUSTER.rglob("*") if p.is_file()))
def test_cluster_file_is_valid(name):
    errs = check_file(CLUSTER / name, REPO, name)
    assert not errs, "\n".join(errs)


def test_every_yaml_under_cluster_parses_and_has_a_known_shape():
    yamls = sorted(CLUSTER.rglob("*.yaml"))
    assert len(yamls) >= 4
    kinds = set()
    for p in yamls:
        for d in yaml.safe_load_all(p.read_text()):
            if d:
                kinds.add(d.get("kind", "launcher"))
    assert {"launcher", "RayCluster", "RayJob", "RayService"} <= kinds
    assert yaml.safe_load((CLUSTER / "serve.yaml").read_text())["applications"]


def test_manifests_name_real_entry_points_and_presets():
    """The commands the manifests run are there (and were checked by check_file)."""
    text = "\n".join(p.read_text() for p in CLUSTER.rglob("*") if p.is_file())
    cmds = find_commands(text)
    modules = {c.split()[2] for c in cmds}
    assert {"ray_jobs.pipeline", "ray_jobs.prepare"} <= modules
    assert any(f"--config {GPU_PRESET}" in c for c in cmds)


def test_rayjob_cluster_spec_equals_the_raycluster():
    (cluster,) = yaml.safe_load_all((CLUSTER / "kuberay/raycluster.yaml").read_text())
    (job,) = yaml.safe_load_all((CLUSTER / "kuberay/rayjob.yaml").read_text())
    (service,) = yaml.safe_load_all((CLUSTER / "kuberay/rayservice.yaml").read_text())
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    assert service["spec"]["rayClusterConfig"] == cluster["spec"]
    assert "s3://" in job["spec"]["entrypoint"]


def test_serve_file_equals_the_rayservice_config():
    (service,) = yaml.safe_load_all((CLUSTER / "kuberay/rayservice.yaml").read_text())
    assert yaml.safe_load((CLUSTER / "serve.yaml").read_text()) == yaml.safe_load(service["spec"]["serveConfigV2"])


def test_serving_clusters_start_ray_in_serves_throughput_mode():
    """Ray reads Serve's throughput-optimized variables when its processes start, so the clusters
    that serve set them on every node: the mode, the direct-ingress ports from the default
    serve.direct_port, and the router loop the sync planner needs; not the launcher-only 2 s drain
    (a load balancer / Service sits in front there)."""
    from reasonrec.config import ServeConfig
    from reasonrec.runtime import serve_env

    want = {k: v for k, v in serve_env(ServeConfig().direct_port).items() if "DRAINING" not in k}
    assert len(want) == 4
    (service,) = yaml.safe_load_all((CLUSTER / "kuberay/rayservice.yaml").read_text())
    spec = service["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    for pod in pods:
        for c in pod["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert {k: env.get(k) for k in want} == want, c["name"]
            assert not any("DRAINING" in k for k in env)
    (launcher,) = yaml.safe_load_all((CLUSTER / "aws.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(cmd for cmd in launcher[key] if "ray start" in cmd)
        assert all(f"{k}={v}" in start.split() for k, v in want.items()), key


def test_dockerfile_installs_like_the_makefile():
    text = (CLUSTER / "Dockerfile").read_text()
    assert "make setup VARIANT=${VARIANT}" in text and "ARG VARIANT=gpu" in text
    assert "WORKDIR /home/ray/reasonrec" in text  # relative --config paths in the manifests
    assert "/home/ray/reasonrec/.venv/bin" in text  # ray, python and workers from the venv


def test_gpu_preset_fits_every_cluster():
    cfg = load_config(REPO / GPU_PRESET)
    assert gpu_demand(cfg) == 8  # the paper's 8 GPUs, global batch 8
    assert cfg.finetune.per_device_batch_size * cfg.finetune.num_workers * cfg.finetune.grad_accum == 8
    (launcher,) = yaml.safe_load_all((CLUSTER / "aws.yaml").read_text())
    (cluster,) = yaml.safe_load_all((CLUSTER / "kuberay/raycluster.yaml").read_text())
    cap, errs = check_ray_cluster_spec(cluster["spec"], "raycluster")
    assert not errs
    for c, where in ((launcher_capacity(launcher), "aws.yaml"), (cap, "raycluster")):
        assert not c.check(cfg, where), c.check(cfg, where)


@pytest.mark.parametrize(
    "doc", ["README.md", "docs/pipeline.md", "docs/operations.md", "docs/serving.md", "docs/configuration.md"]
)
def test_readme_commands_are_valid(doc):
    blocks = readme_code_blocks((REPO / doc).read_text())
    assert find_commands(blocks), f"{doc} code blocks name no `python -m ray_jobs.X` command"
    errs = check_commands_in(blocks, REPO, doc)
    assert not errs, "\n".join(errs)


def _config_keys(cls, prefix: str = "") -> list[str]:
    """Every leaf key of the config schema, ``data.sources.N.x`` for the list of sources."""
    import dataclasses

    keys = []
    inst = cls()
    for f in dataclasses.fields(cls):
        v = getattr(inst, f.name)
        if dataclasses.is_dataclass(v):
            keys += _config_keys(type(v), f"{prefix}{f.name}.")
        elif isinstance(v, list) and v and dataclasses.is_dataclass(v[0]):
            keys += _config_keys(type(v[0]), f"{prefix}{f.name}.N.")
        else:
            keys.append(prefix + f.name)
    return keys


def test_configuration_reference_lists_every_key():
    from reasonrec.config import RunConfig

    doc = (REPO / "docs/configuration.md").read_text().split("\n## Reference", 1)[1]
    documented = set(re.findall(r"^\| `([\w.]+)` \|", doc, re.M)) - {"data.sources"}  # the list's own row
    keys = _config_keys(RunConfig)
    assert len(keys) > 150
    missing = [k for k in keys if k not in documented]
    extra = sorted(documented - set(keys))
    assert not missing, f"docs/configuration.md does not document: {missing}"
    assert not extra, f"docs/configuration.md documents keys the schema lacks: {extra}"


def test_readme_and_docs_stay_inside_the_repository():
    for doc in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        assert "../shared" not in doc.read_text(), f"{doc.relative_to(REPO)} points outside the repository"


# Each mutation breaks one thing in a copy of cluster/; the checker must report it.
MUTATIONS = [
    (
        "kuberay/raycluster.yaml",
        'num-cpus: "7"\n        num-gpus: "1"',
        'num-cpus: "7"\n        num-gpus: "2"',
        "num-gpus 2 != container nvidia.com/gpu limit 1",
    ),
    ("kuberay/raycluster.yaml", 'num-cpus: "15"', 'num-cpus: "16"', "num-cpus 16 != container cpu limit"),
    ("kuberay/raycluster.yaml", "    version: v2\n", "", "autoscaler v2 not enabled"),
    ("kuberay/raycluster.yaml", "- groupName: gpu-workers", "- groupName: gpus", "worker groups"),
    (
        "kuberay/raycluster.yaml",
        'requests: {cpu: "7", memory: 56Gi, nvidia.com/gpu: "1"}',
        'requests: {cpu: "7", memory: 56Gi, nvidia.com/gpu: "2"}',
        "nvidia.com/gpu request 2 != limit 1",
    ),
    (
        "kuberay/raycluster.yaml",
        'minReplicas: 0\n      maxReplicas: 8\n      rayStartParams:\n        num-cpus: "15"',
        'minReplicas: 9\n      maxReplicas: 8\n      rayStartParams:\n        num-cpus: "15"',
        "minReplicas (9) <= maxReplicas (8)",
    ),
    (
        "kuberay/rayjob.yaml",
        "python -m ray_jobs.pipeline",
        "python -m ray_jobs.pipelines",
        "ray_jobs/pipelines.py does not exist",
    ),
    (
        "kuberay/rayjob.yaml",
        "--config configs/llava7b.yaml",
        "--config configs/llava8b.yaml",
        "preset configs/llava8b.yaml does not exist",
    ),
    ("kuberay/rayjob.yaml", "data.sources.0.path=", "data.sources.0.pathx=", "config error"),
    (
        "kuberay/rayjob.yaml",
        '      maxReplicas: 8\n        rayStartParams:\n          num-cpus: "7"',
        '      maxReplicas: 2\n        rayStartParams:\n          num-cpus: "7"',
        "preset needs 8 GPUs",
    ),
    (
        "kuberay/rayjob.yaml",
        "shutdownAfterJobFinishes: true",
        "shutdownAfterJobFinishes: false",
        "shutdownAfterJobFinishes",
    ),
    (
        "kuberay/raycluster.yaml",
        "key: AWS_SECRET_ACCESS_KEY}}",
        "key: AWS_SECRET_ACCESS_KEY}}\n              - {name: X, value: y}",
        "",
    ),  # harmless extra env var: no error expected
    (
        "kuberay/raycluster.yaml",
        "key: AWS_SECRET_ACCESS_KEY}}",
        "key: WRONG}}\n              - {name: AWS_SECRET_ACCESS_KEY, value: y}",
        "AWS_SECRET_ACCESS_KEY does not come from a Secret",
    ),
    (
        "kuberay/rayservice.yaml",
        "config: configs/quickstart.yaml",
        "config: configs/nope.yaml",
        "preset configs/nope.yaml does not exist",
    ),
    ("kuberay/rayservice.yaml", "route_prefix: /", "route_prefix: /api", "route_prefix"),
    ("kuberay/rayservice.yaml", "port: 8000", "port: 9000", "no port 'serve'"),
    (
        "kuberay/rayservice.yaml",
        "import_path: reasonrec.serve.app:build_app",
        "import_pathx: x",
        "Serve config invalid",
    ),
    ("serve.yaml", "config: configs/quickstart.yaml", "config: configs/quickstart.yml", "does not exist"),
    ("serve.yaml", "request_timeout_s: 60", "request_timeout_s: 30", "serve.request_timeout_s 60"),
    ("serve.yaml", "import_path: reasonrec.serve.app:build_app", "import_path: reasonrec.serve:app", "import_path"),
    ("aws.yaml", "head_node_type: head", "head_node_type: headnode", "head_node_type 'headnode'"),
    (
        "aws.yaml",
        "min_workers: 0\n    max_workers: 8\n    resources: {CPU: 16}",
        "min_workers: 9\n    max_workers: 8\n    resources: {CPU: 16}",
        "min_workers (9) <= max_workers (8)",
    ),
    ("aws.yaml", "resources: {CPU: 8, GPU: 1}", "resources: {CPU: 8}", "no GPU worker type"),
    ("aws.yaml", "make setup VARIANT=gpu", "make setup", "GPU variant"),
    ("aws.yaml", "idle_timeout_minutes: 10", "idle_timeout_minutez: 10", "schema"),
    ("local_job_submit.sh", "data.direct_negatives=5", "data.direct_negativez=5", "direct_negativez"),
    ("local_job_submit.sh", "python -m ray_jobs.prepare", "python -m ray_jobs.prepair", "ray_jobs/prepair.py"),
    ("aws.yaml", "cluster_name: reasonrec", "cluster_name: [reasonrec", "does not parse"),
]


@pytest.mark.parametrize("name,old,new,expected", MUTATIONS, ids=[f"{m[0]}:{m[3] or 'benign'}"[:60] for m in MUTATIONS])
def test_checker_catches_a_broken_copy(tmp_path, name, old, new, expected):
    broken = tmp_path / "cluster"
    shutil.copytree(CLUSTER, broken)
    text = (broken / name).read_text()
    assert old in text, f"mutation target not found in {name}: {old!r} (update the test with the file)"
    (broken / name).write_text(text.replace(old, new, 1))
    errs = check_tree(broken, REPO)
    if expected:
        assert any(expected in e for e in errs), f"expected {expected!r} in:\n" + "\n".join(errs)
        assert all(e.startswith(name) for e in errs), "\n".join(errs)
    else:
        assert not errs, "\n".join(errs)


def test_checker_catches_a_broken_readme_command():
    text = (
        "```bash\npython -m ray_jobs.prepare --config configs/quickstart.yaml data.kcore=abc\n```\n"
        "```bash\n.venv/bin/python -m ray_jobs.nosuch --config configs/missing.yaml\n```\n"
    )
    errs = check_commands_in(readme_code_blocks(text), REPO, "README")
    assert any("data.kcore" in e for e in errs) and any("ray_jobs/nosuch.py" in e for e in errs)
    assert any("configs/missing.yaml" in e for e in errs)


def test_the_serve_import_path_named_in_cluster_imports():
    from ray._common.utils import import_attr

    assert callable(import_attr(SERVE_IMPORT_PATH))
