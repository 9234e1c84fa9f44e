"""Two causal attention forward kernels to compare attnc's compiled code with (`static_kernels.py`),
written for this comparison in the structure of the two designs attnc is measured against:

- `tutorial_fwd`, the structure of Triton's fused-attention tutorial on Hopper: Q, K and V read through
  TMA tensor descriptors, the causal loop split into the key tiles below the diagonal (no mask) and the
  tiles on it (masked), the scale folded into log2(e) once, the online softmax in base 2.
- `flex_fwd`, the structure of PyTorch FlexAttention's forward template: pointer loads, a block-sparse
  plan (per query tile, the count and list of PARTIAL key tiles and of FULL ones), the mask evaluated
  (a causal `mask_mod`) on PARTIAL tiles only, the next tile's position read from the list in the loop.

They are written from those designs' descriptions, not copied; both are plain fused kernels, meant as
points of comparison for registers and instructions per tile, not as production kernels.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tutorial_tile(
    acc, l_i, m_i, q, desc_k, desc_v, offset, start_n, offs_m, offs_n, qk_scale,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    k = desc_k.load([offset + start_n, 0]).T
    qk = tl.dot(q, k)
    if MASKED:
        keep = offs_m[:, None] >= (start_n + offs_n[None, :])
        qk = qk * qk_scale + tl.where(keep, 0.0, -1.0e6)
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        qk = qk - m_ij[:, None]
    else:
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        qk = qk * qk_scale - m_ij[:, None]
    p = tl.math.exp2(qk)
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = desc_v.load([offset + start_n, 0])
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_ij


@triton.jit
def tutorial_fwd(
    desc_q, desc_k, desc_v, desc_o, sm_scale, Q_LEN,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Causal attention, Q/K/V/O flattened to [BATCH * HEADS * Q_LEN, HEAD_DIM] descriptors."""
    start_m = tl.program_id(0)
    offset = tl.program_id(1) * Q_LEN
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32) + 1.0
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qk_scale = sm_scale * 1.44269504
    q = desc_q.load([offset + start_m * BLOCK_M, 0])
    for start_n in tl.range(0, start_m * BLOCK_M, BLOCK_N):  # below the diagonal: every key allowed
        acc, l_i, m_i = _tutorial_tile(
            acc, l_i, m_i, q, desc_k, desc_v, offset, start_n, offs_m, offs_n, qk_scale, BLOCK_N, False
        )
    for start_n in tl.range(start_m * BLOCK_M, (start_m + 1) * BLOCK_M, BLOCK_N):  # on it: masked
        acc, l_i, m_i = _tutorial_tile(
            acc, l_i, m_i, q, desc_k, desc_v, offset, start_n, offs_m, offs_n, qk_scale, BLOCK_N, True
        )
    acc = acc / l_i[:, None]
    desc_o.store([offset + start_m * BLOCK_M, 0], acc.to(desc_o.dtype))


@triton.jit
def _flex_tile(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, sm_scale, stride_kn, stride_vn,
    KV_LEN, MASKED: tl.constexpr,
):  # fmt: skip
    kv = start_n + offs_n
    if MASKED:
        k = tl.load(k_ptrs + start_n * stride_kn, mask=kv[None, :] < KV_LEN, other=0.0)
    else:
        k = tl.load(k_ptrs + start_n * stride_kn)
    qk = tl.dot(q, k) * sm_scale
    if MASKED:
        keep = (offs_m[:, None] >= kv[None, :]) & (kv[None, :] < KV_LEN)  # the mask_mod, and the length
        qk = tl.where(keep, qk, float("-inf"))
    qk = qk * 1.44269504  # to base 2
    m_ij = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptrs + start_n * stride_vn, mask=kv[:, None] < KV_LEN, other=0.0)
    else:
        v = tl.load(v_ptrs + start_n * stride_vn)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_ij


@triton.jit
def flex_fwd(
    Q, K, V, Out, kv_num_blocks, kv_indices, full_num_blocks, full_indices, sm_scale,
    stride_qz, stride_qh, stride_qm, stride_kz, stride_kh, stride_kn, stride_vz, stride_vh, stride_vn,
    stride_oz, stride_oh, stride_om, HEADS, Q_LEN, KV_LEN, MAX_BLOCKS,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Causal attention from a block-sparse plan: per query tile, `kv_num_blocks[m]` PARTIAL key tiles
    listed in `kv_indices[m, :]` and `full_num_blocks[m]` FULL ones in `full_indices[m, :]`."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    z, h = bh // HEADS, bh % HEADS
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + z.to(tl.int64) * stride_qz + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < Q_LEN, other=0.0)
    k_ptrs = K + z.to(tl.int64) * stride_kz + h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None]
    v_ptrs = V + z.to(tl.int64) * stride_vz + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    row = start_m * MAX_BLOCKS
    for i in range(0, tl.load(kv_num_blocks + start_m)):
        start_n = tl.load(kv_indices + row + i) * BLOCK_N
        acc, l_i, m_i = _flex_tile(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, sm_scale, stride_kn, stride_vn,
            KV_LEN, True,
        )  # fmt: skip
    for i in range(0, tl.load(full_num_blocks + start_m)):
        start_n = tl.load(full_indices + row + i) * BLOCK_N
        acc, l_i, m_i = _flex_tile(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, sm_scale, stride_kn, stride_vn,
            KV_LEN, False,
        )  # fmt: skip
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o_ptrs = Out + z.to(tl.int64) * stride_oz + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, (acc / l_safe[:, None]).to(Out.dtype.element_ty), mask=offs_m[:, None] < Q_LEN)
