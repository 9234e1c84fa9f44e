"""`attnc.nn.Attention`: a compiled kernel as a `torch.nn.Module`, holding the pattern's input tensors
(learnable ones as `nn.Parameter`s, the others as buffers) so that model code can treat an attention
pattern with a bias table like any other layer: `.to()`, `state_dict`, optimisers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from attnc.api import Kernel
from attnc.errors import InputError, InputTypeError
from attnc.ir.nodes import InputDecl
from attnc.ir.results import differentiable_inputs


class Attention(nn.Module):
    """Attention by `kernel` with some of its pattern's inputs held by the module.

    `parameters` maps input names to initial tensors that become `nn.Parameter`s (float inputs the
    score reads, so that the kernel gives them gradients: a bias table, ALiBi slopes, a temperature);
    `buffers` maps input names to tensors registered as buffers (document ids, a block map: anything
    the model carries but does not learn). Each is registered under the input's own name, so
    `module.bias` is the table and `state_dict()` has the key `"bias"`. The tensors are taken as given
    (a parameter shares storage with its initial tensor, as `nn.Parameter` does); each must have the
    dtype and rank its `input` declares; after `module.to(dtype)` casts them, calls cast them back to
    the declared dtype.

    `forward(q, k, v, **extra)` is `kernel(q, k, v, **held, **extra)`: `extra` gives the inputs the
    module does not hold, runtime parameter values and the call's keywords (`scale`, `return_lse`,
    `plan`, `q_offset`). `reference(q, k, v, **extra)` is the same by the dense float64 oracle.
    """

    def __init__(
        self,
        kernel: Kernel,
        *,
        parameters: Mapping[str, torch.Tensor] | None = None,
        buffers: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(kernel, Kernel):
            raise InputTypeError(f"Attention needs an attnc.Kernel, got {type(kernel).__name__}", None)
        self.kernel = kernel
        parameters = dict(parameters or {})
        buffers = dict(buffers or {})
        declared = {decl.name: decl for decl in kernel.pattern.inputs}
        learnable = differentiable_inputs(kernel.pattern)
        if twice := sorted(parameters.keys() & buffers.keys()):
            raise InputError(
                f"input '{twice[0]}' is given both as a parameter and as a buffer", kernel.pattern.loc
            )
        held: dict[str, str] = {}
        for name, tensor in parameters.items():
            decl = self._declaration(declared, name, tensor)
            if name not in learnable:
                raise InputError(
                    f"input '{name}' cannot be an nn.Parameter: the kernel gives it no gradient (only "
                    "float inputs the score reads have one); hold it as a buffer",
                    decl.loc,
                )
            self._check_free(name, decl)
            self.register_parameter(name, nn.Parameter(tensor.detach()))
            held[name] = "parameter"
        for name, tensor in buffers.items():
            decl = self._declaration(declared, name, tensor)
            self._check_free(name, decl)
            self.register_buffer(name, tensor)
            held[name] = "buffer"
        self._held = held

    def _declaration(self, declared: Mapping[str, InputDecl], name: str, tensor: Any) -> InputDecl:
        """The declaration of input `name`, checked against the tensor the module is to hold."""
        if name not in declared:
            known = ", ".join(f"'{n}'" for n in declared) or "none"
            raise InputError(
                f"pattern '{self.kernel.name}' has no input '{name}' (its inputs: {known})",
                self.kernel.pattern.loc,
            )
        decl = declared[name]
        if not isinstance(tensor, torch.Tensor):
            raise InputTypeError(f"input '{name}' must be a tensor, got {type(tensor).__name__}", decl.loc)
        dtype, rank = self.kernel.inputs[name]
        if str(tensor.dtype).removeprefix("torch.") != dtype or tensor.dim() != rank:
            raise InputError(
                f"input '{name}' is declared {dtype} of rank {rank}, got a "
                f"{str(tensor.dtype).removeprefix('torch.')} tensor of rank {tensor.dim()}",
                decl.loc,
            )
        return decl

    def _check_free(self, name: str, decl: InputDecl) -> None:
        # Inputs are registered under their own names: one must not hide a member of nn.Module.
        if hasattr(self, name):
            raise InputError(
                f"input '{name}' cannot be held by attnc.nn.Attention: the name is taken by one of its "
                "members; rename the input",
                decl.loc,
            )

    @property
    def held(self) -> dict[str, str]:
        """The inputs the module holds: name -> "parameter" or "buffer"."""
        return dict(self._held)

    def _inputs(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        for name in extra.keys() & self._held.keys():
            raise InputError(
                f"input '{name}' is held by the module (a {self._held[name]}); do not pass it to the call",
                next(d.loc for d in self.kernel.pattern.inputs if d.name == name),
            )
        return {**{name: self._held_tensor(name) for name in self._held}, **extra}

    def _held_tensor(self, name: str) -> torch.Tensor:
        # `model.to(torch.bfloat16)` casts every float parameter and buffer, a bias table too; the kernel
        # takes inputs only in their declared dtype, so the call casts back (differentiably: the
        # gradient reaches the parameter in its own dtype).
        tensor = getattr(self, name)
        declared = getattr(torch, self.kernel.inputs[name][0])
        return tensor if tensor.dtype == declared else tensor.to(declared)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **extra: Any) -> Any:
        """`kernel(q, k, v, **held_inputs, **extra)`: the fused kernel, differentiable."""
        return self.kernel(q, k, v, **self._inputs(extra))

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **extra: Any) -> Any:
        """The same attention by the dense oracle (`kernel.reference`), with the held inputs."""
        return self.kernel.reference(q, k, v, **self._inputs(extra))

    def extra_repr(self) -> str:
        held = ", ".join(f"{name}: {kind}" for name, kind in self._held.items())
        return f"{self.kernel!r}" + (f", holds {{{held}}}" if held else "")
