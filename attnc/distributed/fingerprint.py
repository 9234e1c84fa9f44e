"""Fingerprints of arguments that must be equal on every rank (the dispatch's and `cp(...)`'s checks):
plain comparable data, tensors reduced to checksums, so that ranks compare them without moving tensors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from attnc.ir.nodes import Op, PatternIR

# Odd 64-bit multipliers of the input checksums (golden-ratio and splitmix64 constants, as signed int64).
_MIXERS = (-7046029254386353131, -4658895280553007687, -7723592293110705685)


def checksum(tensor: torch.Tensor) -> tuple[Any, ...]:
    """A tensor's dtype, shape and three weighted sums of its bits (wrapping int64): equal on every
    rank for equal tensors, different for almost any difference; O(size) tensor operations."""
    bits = tensor.detach().contiguous()
    if bits.dtype.is_floating_point:
        bits = bits.view(
            {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[bits.element_size()]
        )
    bits = bits.reshape(-1).to(torch.int64)
    position = torch.arange(1, len(bits) + 1, dtype=torch.int64, device=bits.device)
    sums = tuple(int(((bits + position) * (position * mixer)).sum()) for mixer in _MIXERS)
    return (str(tensor.dtype), tuple(tensor.shape), *sums)


def fingerprint(value: Any) -> Any:
    """What must be equal on every rank for the layouts to be, as plain comparable data: tensors by
    `checksum`, containers item by item, anything else (kernels, parameter values) by its repr."""
    if isinstance(value, torch.Tensor):
        return checksum(value)
    if isinstance(value, Mapping):
        return tuple((repr(k), fingerprint(v)) for k, v in sorted(value.items(), key=lambda kv: repr(kv[0])))
    if isinstance(value, list | tuple):
        return tuple(fingerprint(v) for v in value)
    return repr(value)


def mask_reads(pattern: PatternIR) -> tuple[str, ...]:
    """The inputs and runtime parameters the pattern's mask reads (through its lets), sorted: what
    decides which keys a query visits, and so which chunks a layout exchanges."""
    if pattern.mask is None:
        return ()
    lets = dict(pattern.lets)
    names: set[str] = set()
    roots, seen = [pattern.mask], set()
    while roots:
        for node in roots.pop().walk():
            if node.op in (Op.LOAD, Op.PARAM):
                names.add(str(node.attr))
            elif node.op is Op.REF and str(node.attr) in lets and node.attr not in seen:
                seen.add(node.attr)
                roots.append(lets[str(node.attr)])
    return tuple(sorted(names))


def mask_key(pattern: PatternIR, inputs: Mapping[str, Any], params: Mapping[str, Any]) -> Any:
    """What a layout's chunk exchange depends on for one kernel: its mask (an interned node, equal
    for equal masks within a process) and the fingerprints of the inputs and runtime parameter values
    the mask reads (not those read by the score alone: a learnable bias may change between the
    dispatch and the call). Compared on one rank only, between `dispatch` and `cp(...)`."""
    values = {**params, **inputs}
    return (pattern.mask, tuple((name, fingerprint(values.get(name))) for name in mask_reads(pattern)))
