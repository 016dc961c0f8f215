"""Launch configurations of every Triton kernel, in one place.

Each kernel has a GPU configuration (fixed tiles + num_warps/num_stages, or an autotune list) and
an interpreter one (TRITON_INTERPRET=1, the CPU tests): 16-wide tiles, so that test sizes leave
ragged edges, and no autotuning, which the interpreter does not run. The launchers ask here and
never pick tiles themselves.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import triton


def interpreted() -> bool:
    """Whether Triton runs in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Launch:
    """Fixed constexpr tiles of one kernel and its launch options (None: Triton's default)."""
    tiles: dict[str, int] = field(default_factory=dict)
    num_warps: int | None = None
    num_stages: int | None = None

    def kwargs(self) -> dict[str, int]:
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        return {**self.tiles, **{k: v for k, v in options.items() if v is not None}}


INTERPRETER_TILE = 16


# --- ACE-HGNN (kernels/hypergraph.py) ---------------------------------------------------------

_HGNN_TOPK_GPU = Launch({"BLOCK_R": 32, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2)
_HGNN_TOPK_INTERPRETER = Launch({"BLOCK_R": 16, "BLOCK_N": 16, "BLOCK_K": 16})


def hgnn_topk() -> Launch:
    """The tiled top-k incidence kernel."""
    return _HGNN_TOPK_INTERPRETER if interpreted() else _HGNN_TOPK_GPU


def hgnn_rows_tile(rows: int) -> int:
    """BLOCK_R of gather_mm / scatter_mm / sddmm for ``rows`` rows per sample."""
    if interpreted():
        return INTERPRETER_TILE
    return 16 if rows <= 2048 else 32


def hgnn_feature_tile(d: int) -> int:
    """BLOCK_D of gather_mm / scatter_mm: the feature width, padded, within [32, 256]."""
    if interpreted():
        return INTERPRETER_TILE
    return min(256, max(32, triton.next_power_of_2(d)))


def hgnn_sddmm_feature_tile() -> int:
    """BLOCK_D of sddmm (it walks D in chunks)."""
    return INTERPRETER_TILE if interpreted() else 64


# --- label-guided InfoNCE (kernels/infonce.py) ------------------------------------------------

# The forward's row block is fixed (not tuned) so that the number of column partials is known.
INFONCE_FWD_BLOCK_M = 128
INFONCE_FWD_AUTOTUNE = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
    for bn, bk, w, st in [(64, 64, 4, 3), (64, 64, 8, 3), (128, 64, 8, 3), (128, 32, 8, 4),
                          (64, 128, 8, 2), (32, 64, 4, 4), (128, 64, 4, 3)]
]
# A column tile must never straddle two chunks (chunks are whole multiples of INFONCE_FWD_BLOCK_M).
assert all(INFONCE_FWD_BLOCK_M % c.kwargs["BLOCK_N"] == 0 for c in INFONCE_FWD_AUTOTUNE)
INFONCE_GRAD_AUTOTUNE = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd},
                  num_warps=w, num_stages=st)
    for bm, bn, bk, bd, w, st in [(64, 64, 64, 128, 4, 3), (64, 64, 64, 256, 8, 3),
                                  (128, 64, 64, 128, 8, 3), (128, 64, 64, 256, 8, 2),
                                  (64, 128, 64, 128, 8, 3), (32, 64, 64, 256, 4, 3),
                                  (64, 64, 32, 512, 8, 2), (128, 128, 64, 128, 8, 3),
                                  # BLOCK_D = D: S is recomputed once per tile, not once per D block.
                                  (32, 64, 64, 512, 4, 2), (32, 64, 32, 512, 4, 2)]
]
# Backward column chunks are whole multiples of every BLOCK_M and BLOCK_N in the configs.
INFONCE_GRAD_GRANULE = 128
assert all(INFONCE_GRAD_GRANULE % c.kwargs[k] == 0
           for c in INFONCE_GRAD_AUTOTUNE for k in ("BLOCK_M", "BLOCK_N"))
INFONCE_INTERPRETER = Launch({"BLOCK_M": INTERPRETER_TILE, "BLOCK_N": INTERPRETER_TILE,
                              "BLOCK_K": INTERPRETER_TILE, "BLOCK_D": INTERPRETER_TILE})
# In the interpreter the columns are split into this many chunks, so that test sizes exercise
# the chunked path; on a GPU the count follows the number of SMs.
INFONCE_INTERPRETER_CHUNKS = 3


def infonce_prune(configs, named_args, **kwargs):
    """Autotune pruning: drop tiles wider than the (power-of-two padded) feature dimension."""
    width = max(16, triton.next_power_of_2(named_args["D"]))
    kept = [c for c in configs if c.kwargs.get("BLOCK_K", 16) <= width
            and c.kwargs.get("BLOCK_D", 16) <= max(width, 128)]
    return kept or configs[:1]


def infonce_fwd_block_m() -> int:
    return INTERPRETER_TILE if interpreted() else INFONCE_FWD_BLOCK_M


def infonce_fwd_interpreter() -> Launch:
    """The forward's tiles in the interpreter (BLOCK_M is passed apart: it sets the partials)."""
    return Launch({k: INFONCE_INTERPRETER.tiles[k] for k in ("BLOCK_N", "BLOCK_K")})


def infonce_grad_granule() -> int:
    """Column chunks of the backward are whole multiples of this."""
    if interpreted():
        return max(INFONCE_INTERPRETER.tiles["BLOCK_M"], INFONCE_INTERPRETER.tiles["BLOCK_N"])
    return INFONCE_GRAD_GRANULE


def infonce_reduce_block() -> int:
    """BLOCK of the log-sum-exp fold over the partials."""
    return INTERPRETER_TILE if interpreted() else 256
