"""The `@triton.jit` functions the attention kernels call besides their own tile functions: tile
arithmetic, the tiles of several conjuncts and the loops that step over other conjuncts' tiles (see
`templates/_common.py.jinja`'s `analytic_loops`), the forward's key rows in a paged cache, and the
language's floor division, modulo, division by a scalar and tanh as `codegen/emit.py` writes them. A
rendered kernel imports those its spec needs (`lower.kernel_functions`): one copy here, not one in
each kernel's source. Triton inlines each call, so the compiled code is the one the statements would
make in place.

Imported by rendered kernels only, where Triton is installed: never by attnc itself.
"""

# Triton compiles these functions, not Python: tuples grow by concatenation and branches are `if`
# statements, the forms Triton 3.6's frontend takes (not starred unpacking, not a conditional expression).
# ruff: noqa: RUF005, SIM108

import triton
import triton.language as tl


@triton.jit
def _tile_of(x, BLOCK: tl.constexpr):
    # The tile holding position x, floor(x / BLOCK), for negative x too.
    return tl.where(x < 0, -((BLOCK - 1 - x) // BLOCK), x // BLOCK)


@triton.jit
def _conjunct_tiles(
    lo,
    hi,
    full_lo,
    full_hi,
    shift,
    BLOCK: tl.constexpr,
    lowest,
    tiles,
    complete,
    CUT: tl.constexpr,
    SPLIT: tl.constexpr,
    ROUNDS: tl.constexpr,
):
    # Each conjunct's tiles [first, last] (cut to [lowest, tiles) where CUT) and FULL tiles ([last + 1,
    # last]: none), inside its core widened, in ROUNDS rounds, to its component of the cores' union.
    first, last, core_lo, core_hi, full_first, full_last = (), (), (), (), (), ()
    for j in tl.static_range(len(lo)):
        f = _tile_of(lo[j] - shift, BLOCK).to(tl.int32)
        la = _tile_of(hi[j] - shift, BLOCK).to(tl.int32)
        if CUT:
            f, la = tl.maximum(f, lowest), tl.minimum(la, tiles - 1)
        first, last = first + (f,), last + (tl.where(lo[j] > hi[j], f - 1, la),)
        core_lo, core_hi = (
            core_lo + (tl.maximum(full_lo[j], lo[j]) - shift,),
            core_hi + (tl.minimum(full_hi[j], hi[j]) - shift,),
        )
    for _ in tl.static_range(ROUNDS):  # (a core merged with itself stays as it is)
        for j in tl.static_range(len(lo)):
            for i in tl.static_range(len(lo)):
                c_lo, c_hi = core_lo[j], core_hi[j]
                touch = (
                    (core_lo[i] <= core_hi[i])
                    & (c_lo <= c_hi)
                    & (core_lo[i] <= c_hi + 1)
                    & (c_lo <= core_hi[i] + 1)
                )
                c_lo, c_hi = (
                    tl.where(touch, tl.minimum(c_lo, core_lo[i]), c_lo),
                    tl.where(touch, tl.maximum(c_hi, core_hi[i]), c_hi),
                )
                core_lo, core_hi = (
                    core_lo[:j] + (c_lo,) + core_lo[j + 1 :],
                    core_hi[:j] + (c_hi,) + core_hi[j + 1 :],
                )
    for j in tl.static_range(len(lo)):
        f = tl.maximum((-_tile_of(-core_lo[j], BLOCK)).to(tl.int32), lowest)
        la = tl.minimum((_tile_of(core_hi[j] + 1, BLOCK) - 1).to(tl.int32), complete - 1)
        if SPLIT:
            la = tl.minimum(la, tiles - 1)
        none = (core_lo[j] > core_hi[j]) | (f > la)
        full_first, full_last = (
            full_first + (tl.where(none, last[j] + 1, f),),
            full_last + (tl.where(none, last[j], la),),
        )
    return first, last, full_first, full_last


@triton.jit
def _disjoint(lo, hi):
    # Tile ranges [lo[a], hi[a]] sorted by first tile (a bubble network) and made disjoint.
    for a in tl.static_range(len(lo)):
        hi = hi[:a] + (tl.maximum(hi[a], lo[a] - 1),) + hi[a + 1 :]
    for r in tl.static_range(len(lo) - 1):
        for a in tl.static_range(len(lo) - 1 - r):
            swap = lo[a] > lo[a + 1]
            lo = lo[:a] + (tl.where(swap, lo[a + 1], lo[a]), tl.where(swap, lo[a], lo[a + 1])) + lo[a + 2 :]
            hi = hi[:a] + (tl.where(swap, hi[a + 1], hi[a]), tl.where(swap, hi[a], hi[a + 1])) + hi[a + 2 :]
    reach = hi[0]
    for a in tl.static_range(1, len(lo)):
        lo = lo[:a] + (tl.maximum(lo[a], reach + 1),) + lo[a + 1 :]
        reach = tl.maximum(reach, hi[a])
    return lo, hi


@triton.jit
def _cut(lo, hi, first, end):
    # The tiles of each `_disjoint` range in [first, end), and the end of a loop over the others.
    n = ()
    stop = end
    for a in tl.static_range(len(lo)):
        n = n + (tl.maximum(tl.minimum(hi[a], end - 1) - tl.maximum(lo[a], first) + 1, 0),)
        stop -= n[a]
    return n, stop


@triton.jit
def _step_over(i, lo, n):
    # The i-th tile left (from the loop's first): i stepped over each skipped range before it.
    tile = i
    for a in tl.static_range(len(lo)):
        tile = tl.where(tile >= lo[a], tile + n[a], tile)
    return tile


@triton.jit
def _floordiv(a, b):
    # floor(a / b) for any signs, and 0 for b == 0, whether the backend's // truncates or floors.
    d = tl.where(b == 0, 1, b)
    n = tl.abs(a) // tl.abs(d)
    rest = tl.abs(a) - n * tl.abs(d)
    negative = (a < 0) != (d < 0)
    result = tl.where(negative, -n - tl.where(rest != 0, 1, 0), n)
    return tl.where(b == 0, 0, result)


@triton.jit
def _floormod(a, b):
    # a - b * floor(a / b): the sign of b, as Python's %; a for b == 0.
    return tl.where(b == 0, a, a - b * _floordiv(a, b))


@triton.jit
def _opaque(x, PTX: tl.constexpr):
    # x (int32), but a value the compiler cannot see through (PTX: an inline `mov` on NVIDIA GPUs;
    # elsewhere x itself). The dK/dV kernel's query rows `m * BLOCK_M + offs_mb` are opaque so that
    # LLVM does not split each use of a row into a per-tile part and a per-element part hoisted out of
    # the loops, registers kept across every loop for each use (most of them those of the loads: the
    # row offsets and row masks of q, dO, lse and Delta; the rest the mask's comparisons). ptxas for
    # sm_90, 16 x 64 tiles, 3 stages, head dim 128: causal 255 registers and 12 bytes spilled -> 208
    # and none; sinks + window 116 bytes -> 245 registers, none (the loads' rows alone opaque: 253;
    # the mask's alone: still 116 bytes).
    if PTX:
        y = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1)
    else:
        y = x
    return y


@triton.jit
def _div_scalar(a, b, FAST: tl.constexpr):
    # a / b for a scalar b; FAST (float32, 16-bit inputs on NVIDIA: see `_tanh`): a times b's
    # reciprocal, computed once per program (within an ulp of the quotient), instead of a division each.
    if FAST:
        q = a * (1.0 / b)
    else:
        q = a / b
    return q


@triton.jit
def _tanh(x, FAST: tl.constexpr):
    # tanh, odd by construction, to the precision of x's dtype. From e = exp(-2|x|), which cannot
    # overflow, (1 - e) / (1 + e) loses digits to cancellation as |x| -> 0: below 0.3 an odd Taylor
    # polynomial (error < 1e-9 relative there) is used instead. Its coefficients are rounded in x's
    # dtype (a Python float would be a float32 constant, and masks compute floats in float64).
    # FAST (float32 x only): the GPU's tanh.approx.f32, one MUFU instruction instead of ~35 FP32 ones;
    # its relative error, at most 2^-10.99 (PTX ISA), is 8x below a bfloat16 or float16 rounding
    # (2^-8, 2^-11 x 2 for the dense float16 reference's own tanh and product), which the tolerance
    # rule allows for: the launcher sets it for 16-bit inputs on NVIDIA GPUs only (never under
    # Triton's interpreter, which cannot run PTX).
    if FAST:
        t = tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        a = tl.abs(x)
        e = tl.exp(-2.0 * a)
        large = (1.0 - e) / (1.0 + e)
        one = tl.full([], 1.0, x.dtype)
        x2 = a * a
        poly = one * 21844.0 / 6081075.0
        poly = x2 * poly - one * 1382.0 / 155925.0
        poly = x2 * poly + one * 62.0 / 2835.0
        poly = x2 * poly - one * 17.0 / 315.0
        poly = x2 * poly + one * 2.0 / 15.0
        poly = x2 * poly - one / 3.0
        small = a + a * x2 * poly
        t = tl.where(a < 0.3, small, large)
        t = tl.where(x < 0, -t, t)
    return t


@triton.jit
def _kv_rows(
    start_n,
    offs_n,
    b_idx,
    BlockTable,
    stride_table,
    TABLE_PAGES,
    NUM_PAGES,
    stride_kb,
    stride_kn,
    stride_vb,
    stride_vn,
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    # The offsets of the forward's key rows start_n + offs_n in K and in V (int64). PAGED: row r of the
    # cache is slot r % PAGE_SIZE of page BlockTable[b, r // PAGE_SIZE]; an entry outside the cache (the
    # caller's contract) is clamped into it, so that nothing outside it is ever read. Otherwise the
    # tile's first row's offset (a scalar) plus the rows' offsets from it, the same in every tile: one
    # 64-bit add per row where a product of each row (sm_90: 26 fewer integer instructions per tile).
    if PAGED:
        offs_kv = start_n + offs_n
        page_slot = offs_kv // PAGE_SIZE
        page = tl.load(
            BlockTable + b_idx.to(tl.int64) * stride_table + page_slot, mask=page_slot < TABLE_PAGES, other=0
        )
        page = tl.minimum(tl.maximum(page, 0), NUM_PAGES - 1).to(tl.int64)
        k_rows = page * stride_kb + (offs_kv % PAGE_SIZE).to(tl.int64) * stride_kn
        v_rows = page * stride_vb + (offs_kv % PAGE_SIZE).to(tl.int64) * stride_vn
    else:
        k_rows = start_n.to(tl.int64) * stride_kn + offs_n.to(tl.int64) * stride_kn
        v_rows = start_n.to(tl.int64) * stride_vn + offs_n.to(tl.int64) * stride_vn
    return k_rows, v_rows
