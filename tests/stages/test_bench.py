"""`compress bench` on a tiny artifact: the timed loop decodes what greedy generation decodes,
both models are measured, and the table goes into bench.json / bench.md beside the artifact,
outside its seal (the sealed report is unchanged and the artifact still verifies). Speeds
themselves are benchmarks' business, not asserted here."""

from __future__ import annotations

import json

import pytest
import torch

from compress.artifact import load_artifact, verify_artifact
from compress.bench import timed_greedy
from compress.cli import main
from compress.errors import EXIT_BAD_INPUT, EXIT_OK
from tests.stages.test_gate_cli import shipped_report  # noqa: F401  (fixture)
from tests.stages.test_pipeline import scorer  # noqa: F401  (fixture)


def test_the_timed_loop_decodes_what_greedy_generation_does(shipped_report):  # noqa: F811
    model, _ = load_artifact(shipped_report.parent, with_tokenizer=False)
    prompt = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    _, _, tokens = timed_greedy(model, prompt, 6)
    expected = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=6,
        min_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
    )[:, 12:]
    assert torch.equal(tokens, expected)


def test_bench_writes_its_table_beside_the_report(shipped_report, tiny_llama_dir, capsys):  # noqa: F811
    artifact = shipped_report.parent
    sealed_report = shipped_report.read_bytes()
    options = ["--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "2"]
    code = main(["bench", str(artifact), "--baseline", str(tiny_llama_dir), *options])
    assert code == EXIT_OK
    section = json.loads(capsys.readouterr().out)
    for side in ("baseline", "artifact"):
        assert (
            section[side]["prefill_tokens_per_s"] > 0 and section[side]["decode_tokens_per_s"] > 0
        )
    assert section["artifact"]["size_on_disk_bytes"] < section["baseline"]["size_on_disk_bytes"]
    assert json.loads((artifact / "bench.json").read_text())["torch"]["table"] == section["table"]
    assert "| artifact / baseline |" in (artifact / "bench.md").read_text()
    assert shipped_report.read_bytes() == sealed_report
    verify_artifact(artifact)
    assert main(["bench", str(artifact), "--new-tokens", "1"]) == EXIT_BAD_INPUT


def test_onnx_bench_runs_both_models_with_onnx_runtime(shipped_report, tiny_llama_dir, capsys):  # noqa: F811
    pytest.importorskip("onnxruntime", reason="the onnx extra (onnxruntime) is not installed")
    artifact = shipped_report.parent
    options = ["--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "2", "--runtime", "onnx"]
    assert main(["bench", str(artifact), "--baseline", str(tiny_llama_dir), *options]) == EXIT_OK
    section = json.loads(capsys.readouterr().out)
    assert section["runtime"] == "onnx" and section["baseline"]["label"].endswith("float32)")
    for side in ("baseline", "artifact"):
        assert section[side]["decode_tokens_per_s"] > 0
    # model.onnx sizes: MatMulNBits blocks against float32 matrices.
    assert section["artifact"]["size_on_disk_bytes"] < section["baseline"]["size_on_disk_bytes"]
    bench = json.loads((artifact / "bench.json").read_text())
    assert bench["onnx"]["table"] == section["table"]
    assert "compress bench --runtime onnx" in (artifact / "bench.md").read_text()
    verify_artifact(artifact)
