"""NVIDIA GPU telemetry through NVML (the nvidia-ml-py package, imported as pynvml).

Used by `python -m fastlm.profile`: the GPU's name, driver and clocks, and a background thread
that samples power, utilisation and clocks while training steps run, plus the driver's energy
counter (millijoules since the driver loaded; Volta and newer) for the energy of the run. When
the samples are all there is (older GPUs), energy is the integral of the sampled power.

Everything degrades to a clear reason instead of an exception: unavailable_reason() says why
NVML cannot be used here (package missing, no driver, no GPU), and NVMLSampler refuses to start
with that reason. Nothing here imports torch.
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

INSTALL_HINT = "pip install nvidia-ml-py"
NEEDS_GPU = "NVML metrics (power, energy, clocks, utilisation) need an NVIDIA GPU and its driver"


class NVMLUnavailable(RuntimeError):
    """NVML cannot be used on this machine; the message says why and what would fix it."""


def _pynvml():
    try:
        import pynvml
    except ImportError:
        raise NVMLUnavailable(f"nvidia-ml-py is not installed ({INSTALL_HINT}); "
                              f"{NEEDS_GPU}") from None
    return pynvml


def _init():
    """pynvml, initialised (nvmlInit is reference-counted: every call is paired with a
    shutdown)."""
    nv = _pynvml()
    try:
        nv.nvmlInit()
    except nv.NVMLError as exc:
        raise NVMLUnavailable(f"NVML could not start ({exc}); {NEEDS_GPU}") from None
    return nv


def unavailable_reason() -> str | None:
    """None when NVML works and sees at least one GPU, else the reason it cannot be used."""
    try:
        nv = _init()
    except NVMLUnavailable as exc:
        return str(exc)
    try:
        if nv.nvmlDeviceGetCount() == 0:
            return f"NVML sees no GPU; {NEEDS_GPU}"
    finally:
        nv.nvmlShutdown()
    return None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _handle(nv, index: int = 0, pci_bus_id: str | None = None):
    """The NVML handle of a GPU: by PCI bus id when known (CUDA's and NVML's numbering differ
    under CUDA_VISIBLE_DEVICES), else by index."""
    if pci_bus_id:
        try:
            return nv.nvmlDeviceGetHandleByPciBusId(pci_bus_id)
        except nv.NVMLError:
            pass
    return nv.nvmlDeviceGetHandleByIndex(index)


def _optional(nv, fn, *args):
    """An NVML query that some GPUs or drivers do not support: None instead of an error."""
    try:
        return fn(*args)
    except nv.NVMLError:  # NVMLError_NotSupported and friends: never fatal for a report
        return None


def device_info(index: int = 0, pci_bus_id: str | None = None) -> dict:
    """Static facts: name, driver, power limit (W), maximum SM and memory clocks (MHz)."""
    nv = _init()
    try:
        h = _handle(nv, index, pci_bus_id)
        limit = _optional(nv, nv.nvmlDeviceGetEnforcedPowerLimit, h)
        return {
            "name": _text(nv.nvmlDeviceGetName(h)),
            "driver": _text(nv.nvmlSystemGetDriverVersion()),
            "power_limit_w": None if limit is None else limit / 1e3,
            "max_sm_clock_mhz": _optional(nv, nv.nvmlDeviceGetMaxClockInfo, h, nv.NVML_CLOCK_SM),
            "max_mem_clock_mhz": _optional(nv, nv.nvmlDeviceGetMaxClockInfo, h, nv.NVML_CLOCK_MEM),
        }
    finally:
        nv.nvmlShutdown()


@dataclass
class Sample:
    t: float  # perf_counter seconds
    power_w: float | None
    gpu_util_pct: float | None
    mem_util_pct: float | None
    sm_clock_mhz: float | None
    mem_clock_mhz: float | None


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


@dataclass
class NVMLSampler:
    """Samples one GPU every interval_s in a daemon thread between start() and stop().

        with NVMLSampler(pci_bus_id=...) as s:
            run_steps()
        s.summary()  # power_w, energy_j, clocks, utilisation over the run
    """
    index: int = 0
    pci_bus_id: str | None = None
    interval_s: float = 0.05
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._energy0 = self._energy1 = None
        self._t0 = self._t1 = None

    def start(self) -> NVMLSampler:
        self._nv = _init()  # raises NVMLUnavailable with the reason
        self._h = _handle(self._nv, self.index, self.pci_bus_id)
        self.samples.clear()
        self._stop.clear()
        self._energy0 = _optional(self._nv, self._nv.nvmlDeviceGetTotalEnergyConsumption, self._h)
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._t1 = time.perf_counter()
        self._energy1 = _optional(self._nv, self._nv.nvmlDeviceGetTotalEnergyConsumption, self._h)
        self._nv.nvmlShutdown()

    def __enter__(self) -> NVMLSampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _read(self) -> Sample:
        nv, h = self._nv, self._h
        power = _optional(nv, nv.nvmlDeviceGetPowerUsage, h)  # milliwatts
        util = _optional(nv, nv.nvmlDeviceGetUtilizationRates, h)
        return Sample(time.perf_counter(), None if power is None else power / 1e3,
                      None if util is None else util.gpu, None if util is None else util.memory,
                      _optional(nv, nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_SM),
                      _optional(nv, nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_MEM))

    def _loop(self) -> None:
        while True:
            self.samples.append(self._read())
            if self._stop.wait(self.interval_s):
                self.samples.append(self._read())  # one at the very end
                return

    def energy_j(self) -> float | None:
        """Joules used between start() and stop(): the driver's counter when it has one, else
        the trapezoid integral of the sampled power."""
        if self._energy0 is not None and self._energy1 is not None:
            return (self._energy1 - self._energy0) / 1e3
        pts = [(s.t, s.power_w) for s in self.samples if s.power_w is not None]
        if len(pts) < 2:
            return None
        return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in itertools.pairwise(pts))

    def summary(self) -> dict:
        powers = [s.power_w for s in self.samples if s.power_w is not None]
        return {
            "samples": len(self.samples),
            "seconds": None if self._t1 is None else self._t1 - self._t0,
            "power_w": _mean(powers),
            "power_w_max": max(powers) if powers else None,
            "energy_j": self.energy_j(),
            "energy_source": ("driver counter" if self._energy0 is not None
                              and self._energy1 is not None else "sampled power"),
            "gpu_util_pct": _mean(s.gpu_util_pct for s in self.samples),
            "mem_util_pct": _mean(s.mem_util_pct for s in self.samples),
            "sm_clock_mhz": _mean(s.sm_clock_mhz for s in self.samples),
            "mem_clock_mhz": _mean(s.mem_clock_mhz for s in self.samples),
        }
