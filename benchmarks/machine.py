"""One line describing the machine a benchmark ran on (CPU model, logical CPUs, OS), for the records."""

from __future__ import annotations

import os
import platform


def machine_description() -> str:
    """``"<CPU model>, <n> logical CPUs, <OS> <release>"`` (CPU model from /proc/cpuinfo on Linux)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"
