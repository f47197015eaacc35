"""Only the compiled block cipher helper needs setup.py; the rest is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["piccolofs/format/_gcm_runs_build.py:ffi"])
