"""GPU telemetry from NVML (package ``nvidia-ml-py``, module ``pynvml``): PCIe RX/TX, memory, clocks.

Used by the benchmarks to show that bytes really cross the link while a read runs (PCIe RX is
what a GDS or host-to-device transfer moves into the GPU). ``pynvml`` is imported on first use;
on a machine without it, or without an NVIDIA driver, :func:`probe` and :meth:`Sampler.summary`
return an "unavailable" result with the reason, and nothing raises::

    with telemetry.Sampler(interval_s=0.05) as s:
        run_the_reads()
    s.summary()   # {"available": True, "pcie_rx_gbps_mean": 11.8, ...} or
                  # {"available": False, "reason": "nvidia-ml-py is not installed ..."}

NVML reports PCIe throughput in KB/s over a 20 ms window per call; KB is taken as 1024 bytes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

__all__ = ["Probe", "Sample", "Sampler", "probe"]

_KB = 1024


@dataclass(frozen=True)
class Probe:
    """What NVML can see: ``available`` with ``devices`` (names), or the ``reason`` it cannot."""

    available: bool
    reason: str = ""
    devices: tuple[str, ...] = ()
    driver: str = ""
    pcie: tuple[str, ...] = ()  # per device, e.g. "gen4 x16"


@dataclass(frozen=True)
class Sample:
    t: float                 # seconds, time.perf_counter()
    pcie_rx_bps: float       # bytes/s into the GPU
    pcie_tx_bps: float       # bytes/s out of the GPU
    mem_used_bytes: int
    sm_clock_mhz: int
    mem_clock_mhz: int


def _load():
    """``(pynvml, None)`` after ``nvmlInit``, or ``(None, reason)``."""
    try:
        import pynvml  # noqa: PLC0415 - optional, GPU hosts only
    except ImportError:
        return None, "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:  # no driver, no libnvidia-ml.so, no device
        return None, f"NVML unavailable: {exc}"
    return pynvml, None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def probe() -> Probe:
    """Device names, driver version and PCIe link of every GPU NVML sees, or why it sees none."""
    nvml, reason = _load()
    if nvml is None:
        return Probe(False, reason)
    try:
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            return Probe(False, "NVML sees no GPU")
        names, links = [], []
        for i in range(count):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            names.append(_text(nvml.nvmlDeviceGetName(h)))
            try:
                links.append(f"gen{nvml.nvmlDeviceGetCurrPcieLinkGeneration(h)} "
                             f"x{nvml.nvmlDeviceGetCurrPcieLinkWidth(h)}")
            except nvml.NVMLError:  # not supported on some virtual GPUs
                links.append("unknown")
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        return Probe(True, "", tuple(names), driver, tuple(links))
    except nvml.NVMLError as exc:
        return Probe(False, f"NVML query failed: {exc}")
    finally:
        nvml.nvmlShutdown()


class Sampler:
    """Background thread sampling one GPU every ``interval_s`` seconds while it runs.

    Each PCIe query itself spans 20 ms inside NVML, so the effective period is at least ~40 ms.
    Without NVML the sampler records nothing and :meth:`summary` says why.
    """

    def __init__(self, device_index: int = 0, interval_s: float = 0.05):
        self.device_index = device_index
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self.reason = ""
        self.error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = None
        self._handle = None
        self._t0 = self._t1 = 0.0

    def start(self) -> Sampler:
        nvml, reason = _load()
        if nvml is None:
            self.reason = reason
        else:
            try:
                self._handle = nvml.nvmlDeviceGetHandleByIndex(self.device_index)
                self._nvml = nvml
            except nvml.NVMLError as exc:
                nvml.nvmlShutdown()
                self.reason = f"GPU {self.device_index}: {exc}"
        self._t0 = time.perf_counter()
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._run, name="endor-nvml", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> Sampler:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml = None
        self._t1 = time.perf_counter()
        return self

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    def _sample(self) -> Sample:
        n, h = self._nvml, self._handle
        rx = n.nvmlDeviceGetPcieThroughput(h, n.NVML_PCIE_UTIL_RX_BYTES) * _KB
        tx = n.nvmlDeviceGetPcieThroughput(h, n.NVML_PCIE_UTIL_TX_BYTES) * _KB
        mem = n.nvmlDeviceGetMemoryInfo(h).used
        sm = n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM)
        mc = n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM)
        return Sample(time.perf_counter(), float(rx), float(tx), int(mem), int(sm), int(mc))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self._sample())
            except self._nvml.NVMLError as exc:  # e.g. PCIe counters unsupported on vGPU
                self.error = str(exc)
                return
            self._stop.wait(self.interval_s)

    def summary(self) -> dict:
        """Means and peaks over the samples (GB/s = 1e9 bytes/s), or ``available: False`` + reason."""
        if self.reason:
            return {"available": False, "reason": self.reason}
        out = {"available": True, "device_index": self.device_index, "samples": len(self.samples),
               "seconds": round(self._t1 - self._t0, 3)}
        if self.error:
            out["error"] = self.error
        if self.samples:
            rx = [s.pcie_rx_bps for s in self.samples]
            tx = [s.pcie_tx_bps for s in self.samples]
            out.update(
                pcie_rx_gbps_mean=sum(rx) / len(rx) / 1e9, pcie_rx_gbps_max=max(rx) / 1e9,
                pcie_tx_gbps_mean=sum(tx) / len(tx) / 1e9, pcie_tx_gbps_max=max(tx) / 1e9,
                mem_used_bytes_max=max(s.mem_used_bytes for s in self.samples),
                sm_clock_mhz_max=max(s.sm_clock_mhz for s in self.samples),
                mem_clock_mhz_max=max(s.mem_clock_mhz for s in self.samples),
            )
        return out

    def as_records(self) -> list[dict]:
        return [asdict(s) for s in self.samples]
