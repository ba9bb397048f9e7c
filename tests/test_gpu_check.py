"""bench/gpu_check.py stays runnable where a lent GPU machine runs it: without Ray, omegaconf,
xgboost, torchrec or gguf (issue 33 item 9). Here on CPU, with tiny sizes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
ABSENT = ("ray", "omegaconf", "xgboost", "torchrec", "gguf")  # not installed on the GPU machine
# A None entry in sys.modules makes `import name` (and `from name import ...`) raise ImportError.
BLOCK = f"import sys\nfor name in {ABSENT!r}:\n    sys.modules[name] = None\n"
SMALL = [
    f"{p}.{k}={v}"
    for p in ("tiny", "wide")
    for k, v in {
        "max_length": 256,
        "max_history_items": 3,
        "max_history_photos": 1,
        "num_beams": 2,
        "max_thought_tokens": 4,
    }.items()
] + [
    "wide.text_hidden_size=64",
    "wide.text_intermediate_size=128",
    "wide.text_heads=4",
    "wide.text_kv_heads=2",
    "wide.vision_hidden_size=32",
    "wide.vision_heads=2",
    "wide.image_size=64",
    "wide.image_tokens_per_item=4",
]


def _python(code: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )


def test_the_block_catches_an_indirect_import(tmp_path):
    # The run config imports omegaconf: under the block it must fail, or the next test proves nothing.
    r = _python(BLOCK + "import reasonrec.config\n", tmp_path)
    assert r.returncode != 0 and "omegaconf" in r.stderr


def test_runs_on_cpu_without_ray_omegaconf_xgboost_torchrec_gguf(tmp_path):
    out = tmp_path / "gpu_check.json"
    args = ["--device", "cpu", "--steps", "1", "--batch-size", "2", "--queries", "2", "--infer-batch", "2"]
    args += ["--items", "12", "--pool", "3", "--out", str(out), "--set", *SMALL]
    r = _python(BLOCK + f"from bench import gpu_check\ngpu_check.main({args!r})\n", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dtype"] == "float32" and report["environment"]["device"] == "cpu"
    assert [res["preset"] for res in report["results"]] == ["tiny", "wide"]
    for res in report["results"]:
        tr = res["train"]
        assert tr["steps"] == 1 and tr["tokens"] > 0 and tr["tokens_per_s"] > 0 and math.isfinite(tr["loss_last"])
        assert 0 < tr["trainable_params"] < tr["params"]  # LoRA: most weights frozen
        inf = res["infer"]
        assert inf["forward_bound"]["tokens_per_s"] > 0
        for task in ("sequential_trie", "sequential_pool", "ctr"):
            assert inf[task]["queries"] == 2 and inf[task]["ms_per_query"] > 0 and inf[task]["peak_mb"] > 0
    assert report["results"][1]["config"]["text_hidden_size"] == 64  # the --set override reached the model
    assert "| tiny | sequential_pool |" in r.stdout  # the printed table


def test_wide_preset_is_wide_and_shallow():
    wide, tiny = gpu_check.preset_config("wide", {}), gpu_check.preset_config("tiny", {})
    assert wide.text_hidden_size >= 32 * tiny.text_hidden_size and wide.text_layers <= 4
    assert wide.model == tiny.model == "tiny" and wide.tiny_tokenizer == "bytes"  # nothing read from disk
