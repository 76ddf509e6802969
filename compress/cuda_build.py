"""Which GPUs the `cuda_ext/` kernels are compiled for, and the nvcc flags that say so.

Two builds use this, and nothing else decides their targets:
- setup.py's prebuilt library, which must run on machines other than the one that built it:
  machine code for sm_80 (runs on every 8.x GPU: A100, A10, L4, RTX 30/40, Jetson Orin) and
  sm_90 (H100, H200), plus sm_90's PTX, which the driver compiles at first load on newer GPUs
  (Blackwell) that neither machine code runs on. setup.py loads this file by path: it cannot
  import the package it is building.
- compress/cuda_ops.py's just-in-time build, which runs where it was built: machine code for
  the visible GPUs' own architectures only: native code for a GPU the prebuilt set reaches
  only through PTX (Blackwell), and half the library's bytes.

`TORCH_CUDA_ARCH_LIST` overrides both, as it does for torch's own extension builds ("8.0;9.0+PTX",
"8.6 8.9", "Hopper"). Targets before sm_80 are refused here, naming the variable, rather than
after minutes of compiling: the tensor-core kernel needs mma.sync m16n8k16 and the kernels do
bfloat16 arithmetic, both sm_80 features. A device before sm_80 keeps the pure-PyTorch path.

Imports nothing but the standard library (setup.py runs it in the build environment).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ARCH_LIST_VARIABLE = "TORCH_CUDA_ARCH_LIST"
MIN_CAPABILITY = (8, 0)
PREBUILT_TARGETS = "8.0;9.0+PTX"
BASE_NVCC_FLAGS = ("-O3", "--use_fast_math")

# torch's names for GPU families (torch.utils.cpp_extension), from sm_80 on.
NAMED_FAMILIES = {
    "Ampere": "8.0;8.6+PTX",
    "Ada": "8.9+PTX",
    "Hopper": "9.0+PTX",
    "Blackwell": "10.0;10.3;12.0;12.1+PTX",
}
_TARGET = re.compile(r"(\d+)\.(\d)([af]?)(\+PTX)?")


@dataclass(frozen=True, order=True)
class Target:
    """One GPU architecture to compile for: machine code, and its PTX where `ptx`."""

    major: int
    minor: int
    variant: str = ""  # "a" / "f": architecture- or family-specific features (e.g. 9.0a)
    ptx: bool = False

    @property
    def name(self) -> str:
        return f"{self.major}{self.minor}{self.variant}"

    def gencode(self) -> list[str]:
        flags = [f"-gencode=arch=compute_{self.name},code=sm_{self.name}"]
        if self.ptx:
            flags.append(f"-gencode=arch=compute_{self.name},code=compute_{self.name}")
        return flags


def parse_targets(text: str, source: str) -> tuple[Target, ...]:
    """Targets from a TORCH_CUDA_ARCH_LIST-style list (";", "," or spaces between entries),
    sorted and without repeats; ValueError naming `source` for an entry it cannot build."""
    for family, targets in NAMED_FAMILIES.items():
        text = text.replace(family, targets)
    entries = [entry for entry in re.split(r"[;,\s]+", text.strip()) if entry]
    if not entries:
        raise ValueError(f"{source}: no GPU architecture given")
    targets = set()
    for entry in entries:
        match = _TARGET.fullmatch(entry)
        if match is None:
            raise ValueError(
                f"{source}: {entry!r} is not a GPU architecture such as 8.0, 8.6, 9.0+PTX or "
                f"{'/'.join(NAMED_FAMILIES)}"
            )
        major, minor, variant, ptx = match.groups()
        target = Target(int(major), int(minor), variant, ptx is not None)
        if (target.major, target.minor) < MIN_CAPABILITY:
            raise ValueError(
                f"{source}: {entry} is before sm_80, which the cuda_ext kernels need "
                "(mma.sync m16n8k16, bfloat16 arithmetic); such GPUs use the pure-PyTorch path"
            )
        targets.add(target)
    return tuple(sorted(targets))


def prebuilt_targets(environ: Mapping[str, str]) -> tuple[Target, ...]:
    """What setup.py compiles for: TORCH_CUDA_ARCH_LIST where set, else PREBUILT_TARGETS."""
    listed = environ.get(ARCH_LIST_VARIABLE, "").strip()
    if listed:
        return parse_targets(listed, ARCH_LIST_VARIABLE)
    return parse_targets(PREBUILT_TARGETS, "compress.cuda_build.PREBUILT_TARGETS")


def jit_targets(
    environ: Mapping[str, str], devices: Sequence[tuple[str, tuple[int, int]]]
) -> tuple[Target, ...]:
    """What the just-in-time build compiles for: TORCH_CUDA_ARCH_LIST where set (and not
    "native"), else the machine code of each visible device (name, capability) from sm_80
    on. ValueError, naming the devices, when none of them can run the kernels."""
    listed = environ.get(ARCH_LIST_VARIABLE, "").strip()
    if listed and listed != "native":
        return parse_targets(listed, ARCH_LIST_VARIABLE)
    capable = {capability for _, capability in devices if capability >= MIN_CAPABILITY}
    if not capable:
        seen = ", ".join(f"{name} (sm_{major}{minor})" for name, (major, minor) in devices)
        raise ValueError(
            f"no visible GPU is sm_80 or newer ({seen or 'none visible'}): the cuda_ext kernels "
            "need mma.sync m16n8k16 and bfloat16 arithmetic"
        )
    return tuple(Target(major, minor) for major, minor in sorted(capable))


def nvcc_flags(targets: Sequence[Target]) -> list[str]:
    """nvcc's flags for the kernels: optimisation, and one -gencode per target. Where there
    are several targets, nvcc compiles them in parallel (--threads), one per target."""
    gencode = [flag for target in targets for flag in target.gencode()]
    threads = [f"--threads={len(gencode)}"] if len(gencode) > 1 else []
    return [*BASE_NVCC_FLAGS, *threads, *gencode]


def targets_tag(targets: Sequence[Target]) -> str:
    """A short name for a set of targets, e.g. "sm80_sm90ptx" (the JIT cache's name has it)."""
    return "_".join(f"sm{t.name}{'ptx' if t.ptx else ''}" for t in targets)
