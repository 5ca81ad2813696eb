"""Triton matmul baselines: C = A @ B for 2-D operands of any strides, fp32 accumulation.

`matmul` picks one of two kernels by M:
- M > 64 (prefill, training): one program per output tile, tiles visited in groups of GROUP_M rows
  so that neighbouring programs share B tiles in L2.
- M <= 64 (decode): a GEMM this short reads B once and does little else, so its time is B's bytes
  over HBM bandwidth, provided enough programs stream B. Output tiles alone give N / BLOCK_N
  programs (64 at N = 4096, half an H100's SMs), so the K loop is split across SPLIT_K programs
  too. One tile row covers all of M (BLOCK_M is M rounded up to a power of two, at least 16, the
  smallest tl.dot), so B is read once. The splits add their fp32 partial sums atomically into a
  zeroed fp32 buffer; the last split of a tile to finish (a counter per tile says which) casts
  the sum into C, so the product is one launch after the buffer's memset.

Offsets are int64: row x stride passes 2^31 elements at training sizes (the LM head's
32768 x 128256 logits and their gradient).

On a GPU the tile sizes are autotuned per M (its bucket, the decode kernel's BLOCK_M, for
M <= 64), N, K, the operands' layouts and the input precision; Triton's autotuner adds the
tensors' dtypes to every key. Configurations whose pipeline buffers exceed the device's shared
memory are pruned before any is compiled. Under TRITON_INTERPRET=1 one small configuration is
used, since autotuning the interpreter only costs time.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    A_LAYOUT: tl.constexpr, B_LAYOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # A_LAYOUT and B_LAYOUT ("N": rows contiguous, "T": columns contiguous, "S": neither) are
    # tuning keys only: which dimension of a tile loads contiguously decides the best tile shape,
    # so fwd (NT), dgrad (NN) and wgrad (TN) at one (M, N, K) are tuned apart.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # Rows and columns past the edge wrap around instead of being masked: the loads stay in bounds
    # and unmasked, and the store below drops them.
    offs_m = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
    offs_n = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    step = tl.full((), BLOCK_K, tl.int64)  # BLOCK_K x a stride can pass 2^31 too

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += step * stride_ak
        b_ptrs += step * stride_bk

    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _matmul_splitk_kernel(
    a_ptr, b_ptr, c_ptr, sum_ptr, count_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    A_LAYOUT: tl.constexpr, B_LAYOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """One program: one output tile's share of K. sum_ptr: a zeroed fp32 (M, N) buffer; count_ptr:
    a zeroed int32 counter per tile (both unused when SPLIT_K is 1)."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    tiles_n = tl.cdiv(N, BLOCK_N)
    rows = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = (rows % M).to(tl.int64)  # wrapped as in _matmul_kernel
    offs_n = (cols % N).to(tl.int64)
    # Each split takes whole BLOCK_K blocks, so only the last block of K needs a mask, and that
    # mask against K keeps the loads vectorised wherever K is a multiple of 16.
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    offs_k = tl.arange(0, BLOCK_K)
    k_first = (k_lo + offs_k).to(tl.int64)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + k_first[None, :] * stride_ak
    b_ptrs = b_ptr + k_first[:, None] * stride_bk + offs_n[None, :] * stride_bn
    step = tl.full((), BLOCK_K, tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        in_k = k + offs_k < K
        a = tl.load(a_ptrs, mask=in_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=in_k[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += step * stride_ak
        b_ptrs += step * stride_bk

    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    c_ptrs = c_ptr + rows64[:, None] * stride_cm + cols64[None, :] * stride_cn
    if SPLIT_K == 1:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)
    else:
        sum_ptrs = sum_ptr + rows64[:, None] * N + cols64[None, :]
        tl.atomic_add(sum_ptrs, acc, mask=mask, sem="relaxed")
        # The counter is bumped by one thread: the barrier puts every thread's adds before it, and
        # its release / acquire hands them to the tile's last split, which alone reads the sum.
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + tile.to(tl.int64), 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.load(sum_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(c_ptrs, total.to(c_ptr.dtype.element_ty), mask=mask)


# Launch configurations ---------------------------------------------------------------------------

def _config(bm, bn, bk, stages, warps, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_stages=stages, num_warps=warps)


def _splitk_config(bn, bk, split, stages, warps=4):
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split}, num_stages=stages, num_warps=warps)


# Large tiles for compute-bound shapes; BLOCK_K 32 variants keep fp32 / tf32 (4-byte elements)
# within shared memory at 128 x 256.
_MATMUL_CONFIGS = [
    _config(128, 256, 64, 3, 8),
    _config(256, 128, 64, 3, 8),
    _config(128, 256, 32, 3, 8),
    _config(256, 128, 32, 3, 8),
    _config(128, 128, 64, 4, 8),
    _config(128, 128, 32, 4, 4),
    _config(128, 64, 64, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(64, 256, 64, 3, 4),
    _config(64, 64, 128, 4, 4),
    _config(64, 64, 64, 4, 4),
]
# Decode: BLOCK_M is set by the wrapper (M's bucket). Splits from 1 (N alone gives enough tiles,
# as in an LM head) to 16 (N = 4096 in 32-wide tiles: 2048 programs for ~132 SMs); deep splits go
# with narrow tiles so that each program still streams several BLOCK_K blocks. BLOCK_K 64
# variants fit fp32 at BLOCK_M 64.
_SPLITK_CONFIGS = [
    _splitk_config(64, 128, 1, 4),
    _splitk_config(128, 128, 1, 4),
    _splitk_config(64, 256, 1, 3),
    _splitk_config(64, 64, 1, 4),
    _splitk_config(64, 128, 2, 4),
    _splitk_config(128, 128, 2, 4),
    _splitk_config(64, 256, 2, 3),
    _splitk_config(64, 64, 2, 4),
    _splitk_config(64, 128, 4, 4),
    _splitk_config(32, 256, 4, 3),
    _splitk_config(64, 64, 4, 4),
    _splitk_config(64, 128, 8, 4),
    _splitk_config(32, 256, 8, 3),
    _splitk_config(64, 64, 8, 4),
    _splitk_config(32, 128, 16, 4),
    _splitk_config(32, 64, 16, 4),
]
_MATMUL_KEY = ["M", "N", "K", "A_LAYOUT", "B_LAYOUT", "INPUT_PRECISION"]
_SPLITK_KEY = ["BLOCK_M", "N", "K", "A_LAYOUT", "B_LAYOUT", "INPUT_PRECISION"]

_DECODE_MAX_M = 64
_HOPPER_SHARED_MEMORY = 232448  # bytes: 227 KiB, the most one block may opt in to on H100 / H200
# Under the interpreter: tiles that do not divide the test sizes, and an uneven split of K.
_INTERPRETER_META = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}
_INTERPRETER_SPLITK_META = {"BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 3}


def _pipeline_bytes(block_m: int, config: triton.Config, element_bytes: int) -> int:
    """Shared memory of the software pipeline: an A and a B tile per stage."""
    bn, bk = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    return (block_m * bk + bk * bn) * element_bytes * config.num_stages


def _shared_memory_limit(device: torch.device) -> int:
    if device.type == "cuda":
        return triton.compiler.max_shared_mem(device.index if device.index is not None else 0)
    return _HOPPER_SHARED_MEMORY


def _fitting(configs, named_args: dict, block_m: int | None = None) -> list:
    """The configs whose pipeline fits in shared memory; if none does, the smallest."""
    a, b = named_args["a_ptr"], named_args["b_ptr"]
    element_bytes = max(a.element_size(), b.element_size())
    limit = _shared_memory_limit(a.device)

    def need(c):
        return _pipeline_bytes(block_m or c.kwargs["BLOCK_M"], c, element_bytes)
    return [c for c in configs if need(c) <= limit] or [min(configs, key=need)]


def _in_registers(configs, named_args: dict, input_precision: str, block_m: int | None = None) -> list:
    """fp32 at "ieee" precision has no tensor-core instruction: its dot runs on the FMA units with
    the operands in registers, and tiles of more than 64 accumulators a thread spill (on sm90 at
    128 a thread: 128 to 184 bytes of stack). Other inputs keep every config."""
    if input_precision != "ieee" or named_args["a_ptr"].dtype != torch.float32:
        return configs

    def per_thread(c):
        return (block_m or c.kwargs["BLOCK_M"]) * c.kwargs["BLOCK_N"] // (32 * c.num_warps)
    return [c for c in configs if per_thread(c) <= 64] or [min(configs, key=per_thread)]


def _prune_matmul(configs, named_args, **kwargs):
    return _fitting(_in_registers(configs, named_args, kwargs["INPUT_PRECISION"]), named_args)


def _prune_splitk(configs, named_args, **kwargs):
    """Fitting configs whose splits all get some of K (an empty split costs programs and atomics for
    nothing); failing those, the fitting configs with the fewest splits."""
    K, block_m = named_args["K"], kwargs["BLOCK_M"]
    fit = _fitting(_in_registers(configs, named_args, kwargs["INPUT_PRECISION"], block_m), named_args, block_m)

    def splits_used(c):
        bk, split = c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"]
        return triton.cdiv(K, triton.cdiv(triton.cdiv(K, split), bk) * bk)
    full = [c for c in fit if splits_used(c) == c.kwargs["SPLIT_K"]]
    fewest = min(c.kwargs["SPLIT_K"] for c in fit)
    return full or [c for c in fit if c.kwargs["SPLIT_K"] == fewest]


_matmul_tuned = triton.autotune(configs=_MATMUL_CONFIGS, key=_MATMUL_KEY,
                                prune_configs_by={"early_config_prune": _prune_matmul})(_matmul_kernel)
# Every benchmarked launch leaves sums and counters behind, which the next one (another config's
# tiles, or the launch after the tuning) would take for its own: they are zeroed before each.
_splitk_tuned = triton.autotune(configs=_SPLITK_CONFIGS, key=_SPLITK_KEY, reset_to_zero=["sum_ptr", "count_ptr"],
                                prune_configs_by={"early_config_prune": _prune_splitk})(_matmul_splitk_kernel)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _layout(t: torch.Tensor) -> str:
    """"N" when rows are contiguous (row-major), "T" when columns are (a transposed row-major
    tensor), "S" otherwise. A dimension of size 1 is contiguous whatever its stride."""
    if t.stride(1) == 1 or t.shape[1] == 1:
        return "N"
    if t.stride(0) == 1 or t.shape[0] == 1:
        return "T"
    return "S"


def _decode_block_m(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def matmul(a: torch.Tensor, b: torch.Tensor, *, out_dtype: torch.dtype | None = None,
           input_precision: str = "ieee") -> torch.Tensor:
    """a @ b. input_precision applies to fp32 inputs: "ieee" (true fp32) or "tf32"."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul needs (M, K) @ (K, N), got {tuple(a.shape)} @ {tuple(b.shape)}")
    (M, K), N = a.shape, b.shape[1]
    c = torch.empty((M, N), device=a.device, dtype=out_dtype or a.dtype)
    if M == 0 or N == 0 or K == 0:
        return c.zero_()
    strides = (*a.stride(), *b.stride(), *c.stride())
    meta = {"A_LAYOUT": _layout(a), "B_LAYOUT": _layout(b), "INPUT_PRECISION": input_precision}

    if M > _DECODE_MAX_M:
        def grid(m):
            return (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)

        if _interpreted():
            _matmul_kernel[grid](a, b, c, M, N, K, *strides, **meta, **_INTERPRETER_META)
        else:
            _matmul_tuned[grid](a, b, c, M, N, K, *strides, **meta)
        return c

    block_m = _decode_block_m(M)
    # One zeroed buffer holds the fp32 sums and, after them, the tile counters (zero bits read as
    # int32 zeros), so a single memset prepares both; sized for the narrowest BLOCK_N of any config.
    max_tiles = triton.cdiv(M, block_m) * triton.cdiv(N, min(cfg.kwargs["BLOCK_N"] for cfg in _SPLITK_CONFIGS))
    scratch = torch.zeros(M * N + max_tiles, device=a.device, dtype=torch.float32)
    sums, counts = scratch[:M * N], scratch[M * N:].view(torch.int32)

    def splitk_grid(m):
        return (triton.cdiv(M, block_m) * triton.cdiv(N, m["BLOCK_N"]), m["SPLIT_K"])

    args = (a, b, c, sums, counts, M, N, K, *strides)
    if _interpreted():
        _matmul_splitk_kernel[splitk_grid](*args, **meta, BLOCK_M=block_m, **_INTERPRETER_SPLITK_META)
    else:
        _splitk_tuned[splitk_grid](*args, **meta, BLOCK_M=block_m)
    return c
