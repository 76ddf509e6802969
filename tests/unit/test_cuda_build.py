"""compress/cuda_build.py: which GPUs the kernels are compiled for, and nvcc's flags for them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from compress import cuda_build
from compress.cuda_build import ARCH_LIST_VARIABLE, Target, jit_targets, nvcc_flags, parse_targets

REPO = Path(__file__).resolve().parents[2]


def gencode(targets) -> list[str]:
    return [flag for flag in nvcc_flags(targets) if flag.startswith("-gencode")]


def test_prebuilt_library_runs_on_ampere_and_hopper_and_carries_ptx_for_newer_gpus():
    targets = cuda_build.prebuilt_targets({})
    assert gencode(targets) == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    # Three nvcc compiles, run side by side.
    assert "--threads=3" in nvcc_flags(targets)


def test_arch_list_variable_overrides_both_builds():
    environ = {ARCH_LIST_VARIABLE: "8.6 9.0a+PTX"}
    expected = (Target(8, 6), Target(9, 0, "a", ptx=True))
    assert cuda_build.prebuilt_targets(environ) == expected
    assert jit_targets(environ, [("NVIDIA H200", (9, 0))]) == expected
    assert gencode(expected)[-1] == "-gencode=arch=compute_90a,code=compute_90a"


def test_jit_build_compiles_for_the_visible_gpus_from_sm_80_only():
    devices = [("Tesla T4", (7, 5)), ("NVIDIA H200", (9, 0)), ("NVIDIA A10", (8, 6))]
    targets = jit_targets({}, [*devices, ("NVIDIA H100", (9, 0))])
    assert targets == (Target(8, 6), Target(9, 0))
    assert nvcc_flags(targets) == [
        *cuda_build.BASE_NVCC_FLAGS,
        "--threads=2",
        "-gencode=arch=compute_86,code=sm_86",
        "-gencode=arch=compute_90,code=sm_90",
    ]
    # One target: one compile, no --threads.
    assert nvcc_flags(jit_targets({ARCH_LIST_VARIABLE: "native"}, devices[1:2])) == [
        *cuda_build.BASE_NVCC_FLAGS,
        "-gencode=arch=compute_90,code=sm_90",
    ]
    assert cuda_build.targets_tag(targets) == "sm86_sm90"


def test_jit_build_refuses_before_compiling_when_no_gpu_can_run_the_kernels():
    with pytest.raises(ValueError, match=r"Tesla T4 \(sm_75\), Tesla V100 \(sm_70\)"):
        jit_targets({}, [("Tesla T4", (7, 5)), ("Tesla V100", (7, 0))])
    with pytest.raises(ValueError, match="none visible"):
        jit_targets({}, [])


@pytest.mark.parametrize(
    ("listed", "message"),
    [
        ("7.5;8.0", r"TORCH_CUDA_ARCH_LIST: 7.5 is before sm_80"),
        ("Turing", r"'Turing' is not a GPU architecture"),
        ("sm_90", r"'sm_90' is not a GPU architecture"),
        ("9.0+ptx", r"'9.0\+ptx' is not a GPU architecture"),
        (" ; ", r"TORCH_CUDA_ARCH_LIST: no GPU architecture given"),
    ],
)
def test_arch_lists_the_kernels_cannot_be_built_for_are_refused_naming_the_variable(
    listed, message
):
    with pytest.raises(ValueError, match=message):
        parse_targets(listed, ARCH_LIST_VARIABLE)


def test_named_families_expand_as_torch_expands_them():
    assert parse_targets("Hopper", ARCH_LIST_VARIABLE) == (Target(9, 0, ptx=True),)
    ampere = parse_targets("Ampere;8.0", ARCH_LIST_VARIABLE)  # repeats once
    assert ampere == (Target(8, 0), Target(8, 6, ptx=True))


def test_setup_py_loads_this_module_without_importing_the_package(monkeypatch):
    """setup.py runs before compress's dependencies may be importable: it loads
    compress/cuda_build.py by path, and gets the same flags."""
    monkeypatch.chdir(REPO)
    setup_py = REPO / "setup.py"
    # Everything but the final setup() call: the helper that loads the module.
    head = setup_py.read_text().split("\next_modules, cmdclass")[0]
    namespace: dict = {"__name__": "setup_under_test", "__file__": str(setup_py)}
    exec(compile(head, str(setup_py), "exec"), namespace)
    monkeypatch.setitem(sys.modules, "cuda_build", None)  # removed again after the test
    loaded = namespace["_cuda_build"]()
    assert loaded is not cuda_build and loaded.__file__ == cuda_build.__file__
    assert loaded.nvcc_flags(loaded.prebuilt_targets({})) == nvcc_flags(
        cuda_build.prebuilt_targets({})
    )
