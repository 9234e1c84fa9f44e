"""An attnc kernel as an attention implementation of Hugging Face transformers.

`register("attnc", kern)` adds the kernel to transformers' `AttentionInterface` (and a mask function
of the same name to its `AttentionMaskInterface`), so that a model made with
`attn_implementation="attnc"` runs its attention layers through the kernel. The kernel's pattern is the
attention mask: it replaces the model's plain causal (or bidirectional) mask, so a decoder needs a
causal pattern (`attnc.stdlib().causal()`, StreamingLLM, a window, ...). What transformers says beside
the mask is honoured or refused, never dropped:

- **Positions.** The new queries are the last `Lq` of the `Lk` keys (prefill: Lq == Lk; decoding with a
  cache: the keys include the past), so query i sits at position `Lk - Lq + i`: the kernel is called
  with `q_offset=Lk - Lq`. A cache whose keys do not start at position 0 or do not end with the
  queries (sliding-window and static caches) is refused by the mask function.
- **Padding.** A batch with padded keys (a 2-D `attention_mask` with zeros) needs a pattern that
  declares the key validity, `input NAME: bool[BATCH, KV_LEN]` (True for a real token) and reads it in
  its mask, named at registration: `register("attnc", kern, key_mask="NAME")`. Without one, padded
  keys are an error. Positions are cache slots: with left padding a row's first token is not at
  position 0 (what `causal` and windows mean is unchanged; sinks or a prefix see the slots).
- **GQA** comes as keys and values with fewer heads, which the kernel reads natively; `scaling` is the
  kernel's `scale`. Attention dropout (a model in training mode with `attention_dropout > 0`), logit
  soft-capping, sliding windows, position biases and attention sinks given by the model, the masks
  of sliding-window, chunked or packed-sequence layers, and sequences packed in one row
  (`cu_seq_lens_q`) are errors: write them in the pattern.
- The attention weights are not returned (`None`, as for `sdpa`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import AttentionInterface, masking_utils

from attnc.api import Kernel
from attnc.errors import InputError, InputTypeError

# The model's own mask functions that the kernel's pattern replaces; any other (a sliding window, a
# chunk, packed sequences, an image-token overlay) carries a mask the kernel would not see.
_PLAIN_MASKS = tuple(
    f
    for f in (
        getattr(masking_utils, "causal_mask_function", None),
        getattr(masking_utils, "bidirectional_mask_function", None),
    )
    if f is not None
)
# Arguments that some models pass to their attention function and that change its result.
_REFUSED_KWARGS = {
    "softcap": "logit soft-capping (write `score = cap * tanh(s / cap)` in the pattern)",
    "sliding_window": "a sliding window (write it in the pattern: `mask = sliding_window(window=...)`)",
    "position_bias": "a position bias (make it an input of the pattern's score)",
    "s_aux": "attention sinks (learned per-head logits)",
    "sinks": "attention sinks (learned per-head logits)",
    # Several sequences packed in one row (continuous batching, a flattening data collator): kern.varlen's
    # layout, which this integration does not map yet.
    "cu_seq_lens_q": "sequences packed in one row",
    "cu_seq_lens_k": "sequences packed in one row",
}
# transformers' own implementations, which a registration must not replace.
_BUILTIN = frozenset(AttentionInterface()) | {"eager"}


class KernelAttention:
    """The attention function `register` installs: `self(module, query, key, value, attention_mask,
    dropout=0.0, scaling=None, **kwargs) -> (attn_output [B, Lq, Hq, Dv], None)`, transformers'
    `AttentionInterface` convention; `self.mask` is its mask function (`AttentionMaskInterface`)."""

    def __init__(self, kernel: Kernel, key_mask: str | None = None) -> None:
        if not isinstance(kernel, Kernel):
            raise InputTypeError(f"register needs an attnc.Kernel, got {type(kernel).__name__}", None)
        self.kernel = kernel
        self.key_mask = key_mask
        decls = {decl.name: decl for decl in kernel.pattern.inputs}
        if key_mask is not None:
            decl = decls.get(key_mask)
            dims = tuple(getattr(d, "attr", None) for d in decl.dims) if decl is not None else ()
            if decl is None or decl.dtype != "bool" or dims != ("BATCH", "KV_LEN"):
                raise InputError(
                    f"key_mask='{key_mask}' must name an input of pattern '{kernel.name}' declared "
                    f"`input {key_mask}: bool[BATCH, KV_LEN]`",
                    kernel.pattern.loc if decl is None else decl.loc,
                )
        others = [decl for name, decl in decls.items() if name != key_mask]
        if others:
            raise InputError(
                f"input '{others[0].name}' has no value in a transformers model: the integration passes "
                "only the key mask (key_mask=...); hold other inputs in the pattern's parameters",
                others[0].loc,
            )

    def _refuse(self, reason: str) -> InputError:
        return InputError(f"transformers integration: {reason}", self.kernel.pattern.loc)

    def __call__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if dropout:
            raise self._refuse(
                f"attnc kernels have no attention dropout, got dropout={dropout} (a model in training "
                "mode with attention_dropout > 0): call model.eval() or set attention_dropout=0"
            )
        for name, what in _REFUSED_KWARGS.items():
            if kwargs.get(name) is not None:
                raise self._refuse(f"the model passes {name}=..., {what}, which the kernel would ignore")
        q_len, kv_len = query.shape[2], key.shape[2]
        if q_len > kv_len:
            raise self._refuse(f"{q_len} queries and {kv_len} keys: the queries must be the last of the keys")
        inputs: dict[str, torch.Tensor] = {}
        valid = None if attention_mask is None else self._key_validity(attention_mask, query.shape[0], kv_len)
        if self.key_mask is not None:
            inputs[self.key_mask] = (
                torch.ones(query.shape[0], kv_len, dtype=torch.bool, device=query.device)
                if valid is None
                else valid
            )
        elif valid is not None:
            raise self._refuse(
                "the batch has padded keys (attention_mask has zeros), which this kernel cannot see: "
                "declare `input valid: bool[BATCH, KV_LEN]`, read it in the mask "
                "(`mask = causal and valid[b, kv]`) and register with key_mask='valid'"
            )
        out = self.kernel(query, key, value, scale=scaling, q_offset=kv_len - q_len, **inputs)
        return out.transpose(1, 2).contiguous(), None

    def _key_validity(self, mask: torch.Tensor, batch: int, kv_len: int) -> torch.Tensor | None:
        """The keys a 4-D mask lets every query see, bool [B, Lk], or None if it hides none. Only a
        mask that is one row per batch row ([B or 1, 1, 1, Lk]: what `self.mask` makes, or a decoding
        step's mask) says which keys are padding; a mask of whole rows would have to be compared with
        the pattern's, so it is refused."""
        if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[3] != kv_len:
            raise self._refuse(
                f"an attention mask of shape {list(mask.shape)} cannot be mapped to the kernel, whose "
                f"pattern is the mask; only key padding ([batch, 1, 1, {kv_len}]) can be"
            )
        if mask.dtype == torch.bool:
            valid = mask[:, 0, 0, :]
        else:
            # An additive mask: 0 keeps a key; transformers hides one with the dtype's minimum or -inf.
            hidden = mask[:, 0, 0, :] <= torch.finfo(mask.dtype).min / 2
            if not torch.all(hidden | (mask[:, 0, 0, :] == 0)):
                raise self._refuse("an additive attention mask with values other than 0 and -inf (a bias)")
            valid = ~hidden
        if bool(valid.all()):
            return None
        return valid.expand(batch, kv_len).contiguous()

    def mask(
        self,
        batch_size: int,
        q_length: int | None = None,
        kv_length: int | None = None,
        q_offset: int | torch.Tensor = 0,
        kv_offset: int = 0,
        mask_function: Callable[..., Any] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache_position: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | None:
        """The mask function of the `AttentionMaskInterface`: None when no key is padding, else the key
        validity as a bool mask [B, 1, 1, kv_length] (which `__call__` reads back). It checks what the
        kernel cannot see: a mask other than the plain causal or bidirectional one, keys that do not
        start at position 0, queries that are not the last keys."""
        if cache_position is not None:  # transformers before q_length / q_offset
            q_length, q_offset = cache_position.shape[0], cache_position[0]
        if mask_function is not None and mask_function not in _PLAIN_MASKS:
            raise self._refuse(
                f"the model asks for a mask other than its plain causal one ({mask_function.__qualname__}: "
                "a sliding-window, chunked or packed-sequence layer, or an overlay); the kernel's pattern "
                "would replace it: write that mask in the pattern"
            )
        if kv_offset != 0:
            raise self._refuse(
                f"the cache's keys start at position {kv_offset} (a sliding-window cache), not 0"
            )
        if int(q_offset) + q_length != kv_length:
            raise self._refuse(
                f"queries at positions {int(q_offset)}..{int(q_offset) + q_length - 1} are not the last "
                f"of {kv_length} keys (a static cache): use the default dynamic cache"
            )
        if attention_mask is None:
            return None
        # As transformers reads a 2-D mask shorter than the keys: the keys past its end are padding.
        padding = attention_mask.to(torch.bool)[:, :kv_length]
        padding = torch.nn.functional.pad(padding, (0, kv_length - padding.shape[-1]), value=False)
        if bool(padding.all()):
            return None
        return padding.expand(batch_size, kv_length)[:, None, None, :]


def register(name: str, kernel: Kernel, *, key_mask: str | None = None) -> KernelAttention:
    """Make `attn_implementation=name` run `kernel` in transformers models (`from_config`,
    `from_pretrained`, `model.set_attn_implementation(name)`). `key_mask` names the pattern's input
    `bool[BATCH, KV_LEN]` that receives which keys are real tokens (needed for padded batches). A name
    registered before is replaced; transformers' own implementations cannot be. Returns the attention
    function."""
    if not isinstance(name, str) or not name or "/" in name or name in _BUILTIN:
        raise InputTypeError(
            f"cannot register attention implementation {name!r}: a name without '/' that is not one "
            f"of transformers' own ({', '.join(sorted(_BUILTIN))})",
            None,
        )
    attention = KernelAttention(kernel, key_mask)
    AttentionInterface.register(name, attention)
    masking_utils.AttentionMaskInterface.register(name, attention.mask)
    return attention
