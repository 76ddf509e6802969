"""End to end on the real demo model (SmolLM2-135M-Instruct), real lm-eval, real data.

Limits are tiny so this stays within a few minutes on 2 cores: it proves the path works and
that the artifact's quality is what RTN should give, not that the model is good.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import compress
from tests.conftest import DEMO_SOURCE, REPO, SHARED_DATA

pytestmark = pytest.mark.slow


def _wikitext_windows(tokenizer, count: int, length: int) -> torch.Tensor:
    path = SHARED_DATA / "wikitext-2" / "test.txt"
    if not path.is_file():
        pytest.skip(f"WikiText-2 not found at {path}")
    ids = tokenizer(path.read_text(encoding="utf-8")[:20000], return_tensors="pt").input_ids[0]
    return ids[: count * length].view(count, length)


def _kl_and_agreement(base: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    base_logp = base.float().log_softmax(-1)
    other_logp = other.float().log_softmax(-1)
    kl = (base_logp.exp() * (base_logp - other_logp)).sum(-1).mean().item()
    agree = (base.argmax(-1) == other.argmax(-1)).float().mean().item()
    return kl, agree


def test_compress_run_on_demo_model(tmp_path, demo_gguf, eval_data_dir):
    recipe = yaml.safe_load((REPO / "recipes" / "int4-group.yaml").read_text())
    recipe["name"] = "e2e-int4"
    recipe["output"] = {"dir": str(tmp_path / "runs")}
    recipe["eval"]["tasks"] = [
        {"name": "mmlu_anatomy", "num_fewshot": 5, "limit": 3},
        {"name": "gsm8k", "num_fewshot": 5, "limit": 2, "max_gen_toks": 16},
    ]
    recipe["gate"]["budgets"] = {"mmlu_anatomy": {"max_drop": 1.0}, "gsm8k": {"max_drop": 1.0}}
    recipe["gate"]["quality"] = {"max_kl_divergence": 10.0}  # gated and reported, cannot reject
    # The recipe's own GPTQ calibration and quality windows, made small to keep this quick;
    # paths are absolute because the run's working directory is tmp_path.
    recipe["calibration"] |= {
        "path": str(SHARED_DATA / "wikitext-2" / "valid.txt"),
        "num_samples": 4,
        "seq_len": 256,
    }
    recipe["eval"]["quality"] |= {
        "path": str(SHARED_DATA / "wikitext-2" / "test.txt"),
        "max_windows": 2,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    env = {**os.environ, "COMPRESS_EVAL_DATA_DIR": str(eval_data_dir), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "compress", "run", str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]  # budgets of 100 points cannot reject
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    artifact = Path(summary["artifact"])
    assert artifact == tmp_path / "runs" / "release" / "e2e-int4"

    report = json.loads((artifact / "report.json").read_text())
    tasks = {t["task"]: t for t in report["gate"]["tasks"]}
    assert set(tasks) == {"mmlu_anatomy", "gsm8k"}
    assert tasks["mmlu_anatomy"]["estimate"]["n"] == 3 and tasks["gsm8k"]["estimate"]["n"] == 2
    assert all(t["outcome"] == "ship" and t["rule"] == "non_inferiority" for t in tasks.values())
    card = (artifact / "README.md").read_text()
    assert "license: apache-2.0" in card  # from the GGUF file's general.license
    assert report["sizes"]["quantized_layers_ratio"] <= 0.3  # INT4 g64 vs bf16
    assert report["stages"][0]["details"]["method"] == "gptq"
    # GPTQ INT4 g64 on this model: KL ≈ 0.11 with 32 calibration windows; 4 short ones here.
    assert 0 < report["quality"]["kl_divergence"] < 0.3
    assert report["quality"]["top1_agreement"] > 0.7
    (kl_check,) = report["gate"]["quality"]
    assert kl_check["signal"] == "kl_divergence" and kl_check["passed"] is True
    assert report["stages"][0]["memory"]["peak_rss_increase_bytes"] > 0
    for label in ("baseline", "artifact"):
        items = report["evaluation"][label]["mmlu_anatomy"]["items"]
        assert len(items) == 3 and set(items.values()) <= {0.0, 1.0}

    verify = subprocess.run(
        [sys.executable, "-m", "compress", "verify", str(artifact)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert verify.returncode == 0, verify.stderr


def test_rtn_quality_on_demo_model(demo_model):
    """INT8 per channel is nearly lossless; INT4 g64 loses what RTN is known to lose."""
    from compress.quant.config import QuantizeConfig
    from compress.registry import StageContext, handler_for

    model, tokenizer = demo_model("float32")
    windows = _wikitext_windows(tokenizer, count=2, length=128)
    with torch.no_grad():
        baseline = model(windows).logits
    measured = {}
    for config in (
        QuantizeConfig(bits=8, group_size=-1, symmetric=True),
        QuantizeConfig(bits=4, group_size=64, symmetric=False),
    ):
        model, _ = demo_model("float32")
        handler_for(config).apply(model, config, StageContext(dtype="float32"))
        with torch.no_grad():
            measured[config.scheme] = _kl_and_agreement(baseline, model(windows).logits)
    kl8, agree8 = measured["int8-channel-sym"]
    kl4, agree4 = measured["int4-g64-asym"]
    # Reference points measured with a plain RTN on this model (../shared/ANCHORS.md):
    # INT8 per channel KLD 0.0028, top-1 96.9%; INT4 g64 asymmetric KLD 0.294, top-1 70.8%.
    assert kl8 < 0.01 and agree8 > 0.9
    assert kl8 < kl4 < 0.6 and agree4 > 0.55


def test_load_matches_in_memory_quantized_model(tmp_path, demo_model):
    from compress.artifact import save_artifact
    from compress.models import load_model, resolve_source
    from compress.quant.config import QuantizeConfig
    from compress.recipe import ModelConfig
    from compress.registry import StageContext, handler_for

    model, tokenizer = load_model(resolve_source(ModelConfig(source=DEMO_SOURCE)), "bfloat16")
    # The premise of the demo_model fixture the other slow tests use: its bfloat16 copy is
    # exactly this load.
    cast, _ = demo_model("bfloat16")
    assert cast.config.dtype == model.config.dtype == torch.bfloat16
    loaded_state, cast_state = model.state_dict(), cast.state_dict()
    assert loaded_state.keys() == cast_state.keys()
    assert all(torch.equal(loaded_state[k], cast_state[k]) for k in loaded_state)
    del cast, cast_state
    config = QuantizeConfig(bits=4, group_size=64, symmetric=False)
    handler_for(config).apply(model, config, StageContext(dtype="bfloat16"))
    path = save_artifact(
        model, tokenizer, tmp_path / "a", recipe_yaml="", manifest_fields={"dtype": "bfloat16"}
    )
    loaded, loaded_tokenizer = compress.load(path)
    ids = loaded_tokenizer("Edge deployment needs small models.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
