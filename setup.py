"""Build hook for the one native piece: the CPU decoder (csrc/endor_cpu.c).

Everything else is declared in pyproject.toml. The library is a plain C shared object loaded with
ctypes (ctypes drops the GIL for the call, so a thread pool decodes tiles in parallel); it is
built as an extension module only so that setuptools names, places and packages it for us.
"""
from setuptools import Extension, setup

# No -m flags: SSSE3 (pshufb), AVX2 and BMI2 (pdep) are enabled per function with target
# attributes and chosen at run time, so the module still loads on an x86-64 CPU without them.
extra = ["-O3", "-std=c11", "-Wall", "-Wextra", "-Werror"]

setup(
    ext_modules=[
        Extension("endor_gds.decode._endor_cpu", sources=["csrc/endor_cpu.c"], extra_compile_args=extra)
    ]
)
