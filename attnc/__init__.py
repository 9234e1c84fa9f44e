"""attnc: a compiler for attention patterns.

mod = attnc.load("examples/streaming_llm.attn")
kern = mod.streaming_llm(window=256)
ref = kern.reference(q, k, v)

Triton is imported only when a kernel is first loaded or launched (`TritonMissingError` where it is
not installed); the front end, the oracle and plans need only torch.
"""

# ruff: noqa: E402 (the backend is chosen before anything imports Triton)
from attnc.runtime import backend as _backend

_backend.choose()  # before anything imports Triton: see attnc/runtime/backend.py

from attnc.api import AttnModule, Kernel, Module, Pattern, load, loads, stdlib
from attnc.errors import (
    ArityError,
    AttnError,
    AttnImportError,
    AttnSyntaxError,
    AttnTypeError,
    ConfigError,
    CycleError,
    DuplicateError,
    InputError,
    InputTypeError,
    InternalError,
    ParameterError,
    ProgramTooLargeError,
    TritonMissingError,
    UnknownNameError,
)
from attnc.version import __version__

__all__ = [
    "ArityError",
    "AttnError",
    "AttnImportError",
    "AttnModule",
    "AttnSyntaxError",
    "AttnTypeError",
    "ConfigError",
    "CycleError",
    "DuplicateError",
    "InputError",
    "InputTypeError",
    "InternalError",
    "Kernel",
    "Module",
    "ParameterError",
    "Pattern",
    "ProgramTooLargeError",
    "TritonMissingError",
    "UnknownNameError",
    "__version__",
    "load",
    "loads",
    "stdlib",
]
