"""The machine a benchmark ran on, in one place: every tool's header names the same things.

The CPU is named with its family and model numbers: the 2-core VMs of this project have been both
AMD Zen 1 (family 23) and Zen 3 (family 25) under the same "AMD EPYC" name.
"""

from __future__ import annotations

import os
import platform

import torch

from endor_gds._version import __version__
from endor_gds.benchmarks import telemetry
from endor_gds.benchmarks.fio import fio_version

__all__ = ["read_text", "cpu_model", "mem_bytes", "fs_info", "system_info", "system_header", "header_line",
           "reset_peak_rss", "peak_rss"]


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def cpu_model() -> str:
    """``model name (family F, model M)`` from /proc/cpuinfo; the platform's name elsewhere."""
    fields = {}
    for line in read_text("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        if not line.strip():
            break  # the first processor is enough
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields:
        return f"{name} (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return name


def mem_bytes() -> int:
    for line in read_text("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def _virtualization() -> str:
    flags = next((line for line in read_text("/proc/cpuinfo").splitlines()
                  if line.startswith("flags")), "")
    vendor = read_text("/sys/class/dmi/id/sys_vendor")
    if " hypervisor" in flags:
        return f"virtual machine ({vendor})" if vendor else "virtual machine"
    return "bare metal"


def fs_info(path) -> dict:
    """File system type, source device and mount point holding ``path`` (/proc/self/mountinfo)."""
    real = os.path.realpath(path)
    best: dict = {}
    for line in read_text("/proc/self/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        parts, rparts = left.split(), right.split()
        if len(parts) < 5 or len(rparts) < 2:
            continue
        mount = parts[4].replace("\\040", " ")
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best.get("mount", "")):
            best = {"mount": mount, "fstype": rparts[0], "source": rparts[1]}
    dev = os.path.basename(best.get("source", ""))
    block = f"/sys/class/block/{dev}"
    if dev and os.path.exists(block):
        disk = os.path.basename(os.path.realpath(os.path.join(block, "..")))
        queue = f"/sys/block/{dev}/queue" if os.path.exists(f"/sys/block/{dev}") else \
            f"/sys/block/{disk}/queue"
        driver = os.path.realpath(os.path.join(os.path.dirname(queue), "device", "driver"))
        model = read_text(os.path.join(os.path.dirname(queue), "device", "model"))
        best.update(
            driver=os.path.basename(driver) if os.path.exists(driver) else "",
            model=model,
            rotational=read_text(f"{queue}/rotational"),
            scheduler=next((w.strip("[]") for w in read_text(f"{queue}/scheduler").split()
                            if w.startswith("[")), ""),
            max_sectors_kb=read_text(f"{queue}/max_sectors_kb"),
        )
    return best


def reset_peak_rss() -> int:
    """Start a new peak-RSS window for this process (Linux: ``clear_refs`` 5); the RSS now."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak then counts from the process's start
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """This process's peak RSS in bytes since the last :func:`reset_peak_rss` (0 where unknown)."""
    return _status_kib("VmHWM") * 1024


def _status_kib(field: str) -> int:
    for line in read_text("/proc/self/status").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def system_info(path, fio: str | None = None) -> dict:
    """Machine, CPU, memory, GPU (NVML), file system and fio version, for the report header."""
    gpu = telemetry.probe()
    return {
        "host": platform.node(),
        "machine": f"{platform.machine()}, Linux {platform.release()}, {_virtualization()}",
        "cpu": f"{cpu_model()}, {os.cpu_count()} logical CPUs",
        "memory_bytes": mem_bytes(),
        "gpu": ", ".join(f"{n} (PCIe {link})" for n, link in zip(gpu.devices, gpu.pcie))
        if gpu.available else f"none ({gpu.reason})",
        "gpu_driver": gpu.driver,
        "file_system": fs_info(path),
        "python": platform.python_version(),
        "endor_gds": __version__,
        "fio": fio_version(fio),
    }


def system_header(device: str) -> dict:
    """The short header of an end-to-end run: machine, CPU, GPU in use, torch and Python."""
    gpu = None
    if device.startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device))
    return {"machine": platform.node(), "cpu": cpu_model(), "cpus": os.cpu_count(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version()}


def header_line(tool: str) -> str:
    """One comment line for a benchmark's text output: tool, version, machine, CPU, Python."""
    return (f"# {tool}: endor_gds {__version__}, {platform.node()}, {platform.system()} {platform.machine()}, "
            f"{cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
