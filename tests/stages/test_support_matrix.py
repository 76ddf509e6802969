"""The support matrix (tests/support_matrix.py): every family × capability passes its parity
check or is one of the refusals listed here, with its message; and README's table is the one
these cells produce (regenerate it with `python -m tests.support_matrix --write`)."""

from __future__ import annotations

import pytest

from tests.families import FAMILIES
from tests.support_matrix import (
    CELLS,
    README,
    Outcome,
    cell_dir,
    markdown,
    readme_table,
    run_cell,
)

pytest.importorskip(
    "compressed_tensors",
    reason="compressed-tensors not installed (the matrix's "
    "stock-transformers cells need it; scripts/setup.sh installs it)",
)
pytest.importorskip("onnxruntime", reason="the onnx extra (onnxruntime) is not installed")

# (family, cell) → a phrase its refusal must contain. A cell not listed must pass; a listed one
# must be refused, so a capability gained or lost shows up here and in README.
EXPECTED_REFUSALS: dict[tuple[str, str], str] = {
    ("qwen2_moe", "prune → INT4"): "FFN channel pruning needs a dense MLP",
    ("mixtral", "prune → INT4"): "FFN channel pruning needs a dense MLP",
    ("qwen2_moe", "int-quantized export"): "int-quantized cannot carry quantized MoE experts",
    ("mixtral", "int-quantized export"): "int-quantized cannot carry quantized MoE experts",
    ("qwen2_moe", "ONNX + ORT"): "mixture-of-experts layers",
    ("mixtral", "ONNX + ORT"): "mixture-of-experts layers",
}

_outcomes: dict[tuple[str, str], Outcome] = {}


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cell(family: str, cell: str, tmp_path) -> None:
    outcome = run_cell(family, cell, cell_dir(tmp_path, family, cell))
    _outcomes[family, cell] = outcome
    expected = EXPECTED_REFUSALS.get((family, cell))
    if expected is None:
        assert outcome.status == "ok", f"{family} × {cell} refused: {outcome.detail}"
    else:
        assert outcome.status == "refused", f"{family} × {cell} was expected to be refused"
        assert expected in outcome.detail


def test_readme_shows_the_matrix_the_cells_produce() -> None:
    missing = [(f, c) for f in FAMILIES for c in CELLS if (f, c) not in _outcomes]
    if missing:
        pytest.skip(f"{len(missing)} cells were not run in this session (deselected)")
    shown = readme_table(README.read_text(encoding="utf-8"))
    assert shown is not None, f"{README} has no support-matrix block"
    assert shown == markdown(_outcomes), (
        "README's support matrix is stale: run `python -m tests.support_matrix --write`"
    )
