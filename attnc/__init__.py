"""attnc: a compiler for attention patterns.

mod = attnc.load("examples/streaming_llm.attn")
kern = mod.streaming_llm(window=256)
ref = kern.reference(q, k, v)
"""

# ruff: noqa: E402 (the backend is chosen before anything imports Triton)
from attnc.runtime import backend as _backend

_backend.choose()  # before anything imports Triton: see attnc/runtime/backend.py

from attnc.api import Kernel, Module, Pattern, load, loads, stdlib
from attnc.errors import (
    ArityError,
    AttnError,
    AttnImportError,
    AttnSyntaxError,
    AttnTypeError,
    CycleError,
    DuplicateError,
    InputError,
    InternalError,
    ParameterError,
    ProgramTooLargeError,
    UnknownNameError,
)
from attnc.version import __version__

__all__ = [
    "ArityError",
    "AttnError",
    "AttnImportError",
    "AttnSyntaxError",
    "AttnTypeError",
    "CycleError",
    "DuplicateError",
    "InputError",
    "InternalError",
    "Kernel",
    "Module",
    "ParameterError",
    "Pattern",
    "ProgramTooLargeError",
    "UnknownNameError",
    "__version__",
    "load",
    "loads",
    "stdlib",
]
