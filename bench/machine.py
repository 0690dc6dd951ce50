"""One line naming the machine a benchmark ran on (CPU model, cores, threads, torch, GPU)."""

from __future__ import annotations

import os
import platform

import torch


def cpu_name() -> str:
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"machine: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), {gpu}, "
            f"torch {torch.__version__}, python {platform.python_version()}")
