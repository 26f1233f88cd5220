"""Build hook for the one native piece: the CPU decoder (csrc/endor_cpu.c).

Everything else is declared in pyproject.toml. The library is a plain C shared object loaded with
ctypes (ctypes drops the GIL for the call, so a thread pool decodes tiles in parallel); it is
built as an extension module only so that setuptools names, places and packages it for us.
"""
import platform

from setuptools import Extension, setup

extra = ["-O3", "-std=c11", "-Wall", "-Wextra", "-Werror"]
if platform.machine().lower() in ("x86_64", "amd64"):
    # SSSE3 (pshufb) is enabled per function with a target attribute and chosen at run time, so
    # the module still loads on a CPU without it; nothing here raises the baseline ISA.
    pass

setup(
    ext_modules=[
        Extension("endor_gds._endor_cpu", sources=["csrc/endor_cpu.c"], extra_compile_args=extra)
    ]
)
