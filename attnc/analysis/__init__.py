"""Analyses of IR expressions, shared by the passes, the code generator, the runtime and the oracle.

- `value_ranges`: the range of every int value over every launch (overflow proofs, int32 vs int64).
- `normal_form`: `canonicalize`, the normal form of expressions (affine comparisons, constant folding).
- `intervals`: the three-valued interval analysis of a mask over a tile box.
- `summaries`: per-chunk min/max tables of an input, for range summaries of loads.
- `derivative`: symbolic derivatives of score functions.

This package lies below `passes/` and above `ir/`: it imports only `ir` and `errors` (the import floors
are checked by `tests/test_layers.py`).
"""
