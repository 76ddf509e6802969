"""The random search over the emulated kernels (tests/kernels/fuzz_emulated.py) runs and can fail.

Longer searches are run by hand (its docstring); here a few cases keep the script working.
"""

from __future__ import annotations

import logging

import pytest

from tests.kernels import cuda_emulator, fuzz_emulated
from tests.kernels import test_dequant_matmul_emulated as emulated


@pytest.fixture(scope="module", autouse=True)
def emulator_builds():
    if isinstance(cuda_emulator.load(), str):
        pytest.skip("cannot build the CUDA emulator (needs g++ and the CUDA headers)")


def test_a_short_search_passes_and_says_what_it_ran(caplog):
    with caplog.at_level(logging.INFO, logger="fuzz_emulated"):
        assert fuzz_emulated.main(["--cases", "24", "--seed", "1"]) == 0
    assert "24 cases" in caplog.text and "0 failed" in caplog.text


def test_a_wrong_reference_is_reported_as_failures(monkeypatch, caplog):
    # Tolerances no fp16 / bf16 output meets: every matmul case must be reported.
    monkeypatch.setattr(emulated, "REL_TOL", dict.fromkeys(emulated.REL_TOL, 0.0))
    with caplog.at_level(logging.INFO, logger="fuzz_emulated"):
        assert fuzz_emulated.main(["--cases", "8", "--seed", "1"]) == 1
    assert "FAILED" in caplog.text
