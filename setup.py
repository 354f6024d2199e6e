"""The one compiled part: the AMX kernel of the exact nearest-word search (privtext/mechanisms/
amx_search.py). Optional: without a C compiler, or on another platform, the install still
succeeds and the search uses its numpy path (same answers, slower)."""

import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(Extension(
        "privtext.mechanisms._amx_kernel",
        ["privtext/mechanisms/_amx_kernel.c"],
        extra_compile_args=["-O2", "-std=gnu11"],
        libraries=["m"],
        optional=True,
    ))

setup(ext_modules=ext_modules)
