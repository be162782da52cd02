"""What the CPU can do, where it decides int8 accuracy and speed: its x86 instruction sets."""

from __future__ import annotations

import functools
import platform
import subprocess
import sys

# The sets that decide int8 and float32 speed; the VNNI ones also decide int8 accuracy (see `int8_saturates`).
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")
# Intel Macs' sysctl names for the same sets; Apple silicon lists none.
MAC = {"AVX2": "avx2", "FMA": "fma", "AVX512F": "avx512f", "AVX512VNNI": "avx512_vnni", "AVXVNNI": "avx_vnni",
       "AVX512BF16": "avx512_bf16", "AMX": "amx_int8"}


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's instruction-set flags, as Linux's /proc/cpuinfo names them; None where they cannot be read."""
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"],
                                 capture_output=True, text=True, timeout=5).stdout.upper().split()
        except (OSError, subprocess.SubprocessError):
            return None
        return frozenset(MAC[x] for x in out if x in MAC) if out or platform.machine() == "arm64" else None
    try:
        with open("/proc/cpuinfo") as f:
            line = next(line for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return None
    return frozenset(line.split(":", 1)[1].split())


def cpu_model() -> str:
    """The CPU's name ("AMD EPYC 9B14"), or what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def describe() -> str:
    """The instruction sets of FLAGS this CPU has, as one line ("unknown" where they cannot be read)."""
    flags = cpu_flags()
    if flags is None:
        return "unknown"
    return " ".join(x for x in FLAGS if x in flags) or "none of " + " ".join(FLAGS)


def int8_saturates() -> bool:
    """Whether onnxruntime's u8s8 int8 kernels saturate here: an x86 CPU known to lack every VNNI set.

    Without VNNI they multiply through `vpmaddubsw`, whose 16-bit pair sums overflow for full 8-bit weights; 7-bit
    weights (`reduce_range`) keep them exact. ARM CPUs and CPUs whose flags cannot be read are not flagged.
    """
    flags = cpu_flags()
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    return x86 and flags is not None and "avx2" in flags and not any(v in flags for v in VNNI)
