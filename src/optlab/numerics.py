"""The machine's numerics: what decides which floating-point kernels a run used.

The same seed and code give bitwise identical results only on the same machine and build: CPU
kernels differ by instruction set (torch's CPU capability, e.g. AVX2 vs AVX-512), BLAS and oneDNN
versions and thread counts. Every run records these (``machine_numerics``) so a number that
moved between machines can be traced to the kernels it ran on. Torch only: no MLflow or DVC.
"""

from __future__ import annotations

import os
import platform
import re
from functools import lru_cache

import torch

ENV_KNOBS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
             "OPENBLAS_CORETYPE")
"""Environment variables that change which kernels run (recorded when set)."""


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _config_version(pattern: str) -> str:
    m = re.search(pattern, torch.__config__.show())
    return m.group(1).strip() if m else "none"


def machine_numerics(device: torch.device | str | None = None) -> dict[str, str]:
    """CPU model, torch's CPU capability, threads, BLAS (MKL) and oneDNN versions, the kernel
    knobs set in the environment, and on CUDA the GPU name, driver-side CUDA version and cuDNN."""
    out = {
        "cpu_model": cpu_model(),
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "threads": str(torch.get_num_threads()),
        "mkl_version": _config_version(r"Math Kernel Library Version ([0-9.]+)") if torch.backends.mkl.is_available() else "none",
        "onednn_version": _config_version(r"(?:MKL-DNN|oneDNN) v([0-9.]+)") if torch.backends.mkldnn.is_available() else "none",
        "blas": _config_version(r"BLAS_INFO=([^,\n]+)"),
        "torch_version": torch.__version__,
    }
    for k in ENV_KNOBS:
        if os.environ.get(k):
            out[f"env_{k}"] = os.environ[k]
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        out["gpu_name"] = torch.cuda.get_device_name(dev)
        out["cuda_version"] = str(torch.version.cuda)
        out["cudnn_version"] = str(torch.backends.cudnn.version())
    return out
