"""A host-memory stand-in for the parts of CuPy the benchmarks' GPU branches use, so that their
code runs for real on a machine without a GPU: arrays are numpy arrays that present a CUDA array
interface, copies are memmoves, every event advances a clock by 1 ms (the ratios a benchmark
computes are then exactly known). Only the device is pretended."""

from __future__ import annotations

import ctypes
import types

import numpy as np


class HostArray(np.ndarray):
    """A numpy array that presents itself as device memory, as CuPy arrays do."""

    @property
    def __cuda_array_interface__(self):
        i = self.__array_interface__
        return {"shape": i["shape"], "typestr": i["typestr"], "data": i["data"],
                "strides": i["strides"], "version": 3}

    @property
    def data(self):  # cupy: arr.data.ptr
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])


def fake_cupy() -> types.ModuleType:
    """A module ``cupy`` whose arrays are host memory and whose events advance a clock by 1 ms each."""
    class Event:
        clock = 0.0

        def __init__(self, *args, **kwargs):
            self.at = 0.0

        def record(self, stream=None):
            Event.clock += 1e-3  # every timed span is 1 ms: the ratios are then exactly known
            self.at = Event.clock

        def synchronize(self):
            pass

    class Stream:
        ptr = 0

        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class ExternalStream(Stream):
        def __init__(self, handle, device=None):
            self.ptr = handle

    def memcpy_async(dst, src, nbytes, kind, stream):
        ctypes.memmove(dst, src, nbytes)

    def memset_async(ptr, value, nbytes, stream):
        ctypes.memset(ptr, value, nbytes)

    runtime = types.SimpleNamespace(
        getDeviceCount=lambda: 1, memcpyAsync=memcpy_async, memsetAsync=memset_async,
        memcpyDeviceToDevice=3, memcpyDeviceToHost=2, deviceSynchronize=lambda: None,
        getDeviceProperties=lambda device: {"name": b"host stand-in", "l2CacheSize": 1 << 16})
    cp = types.ModuleType("cupy")
    cp.uint8 = np.uint8
    cp.asarray = lambda a: np.array(a, copy=True).view(HostArray)
    cp.empty = lambda n, dtype: np.empty(n, dtype).view(HostArray)
    cp.zeros = lambda n, dtype: np.zeros(n, dtype).view(HostArray)
    cp.asnumpy = lambda a: np.array(a).view(np.ndarray)
    cp.cuda = types.SimpleNamespace(Event=Event, Stream=Stream, ExternalStream=ExternalStream, runtime=runtime,
                                    Device=lambda device=0: Stream(),  # a context manager, as cupy's
                                    alloc_pinned_memory=lambda n: bytearray(n),
                                    get_elapsed_time=lambda a, b: (b.at - a.at) * 1e3)
    return cp
