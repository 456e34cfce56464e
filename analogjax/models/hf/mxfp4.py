"""MXFP4 expert weights (gpt-oss's released checkpoints), dequantized at import exactly as transformers does.

A quantized tensor W is stored as two: `W_blocks` [..., rows, groups, 16] uint8, each byte two 4-bit E2M1 values
(the low nibble first), and `W_scales` [..., rows, groups] uint8, one power-of-two exponent per group of 32 values,
biased by 127. The value of nibble n in a group with scale s is FP4[n] · 2^(s - 127). Dequantized, the rows are
[..., rows, groups · 32]; transformers then swaps the last two axes (its expert weights are [experts, in, out]), so
`W` reads as [..., groups · 32, rows]. Every value is exact in float32 (a 2-bit mantissa times a power of two), so
the dequantized weights equal transformers' bit for bit.

`QuantizedSlice` stands where a safetensors slice of `W` would (read.py): it reads only the blocks and scales under
the requested index, so each device still dequantizes just its own experts and rows.
"""

from __future__ import annotations

import math

import numpy as np

from analogjax.errors import UserError

# E2M1: sign bit, two exponent bits, one mantissa bit (the OCP microscaling FP4 table).
FP4_VALUES = np.asarray(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32
)
BLOCK_BYTES = 16  # bytes per group: 32 values
SCALE_BIAS = 127


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """[..., rows, groups, 16] uint8 blocks and [..., rows, groups] uint8 scales → float32 [..., groups · 32, rows]."""
    blocks = np.asarray(blocks, np.uint8)
    exponents = np.asarray(scales).astype(np.int32) - SCALE_BIAS
    values = np.stack([FP4_VALUES[blocks & 0x0F], FP4_VALUES[blocks >> 4]], axis=-1)  # low nibble first
    values = np.ldexp(values.reshape(blocks.shape[:-1] + (2 * BLOCK_BYTES,)), exponents[..., None])
    rows = values.reshape(blocks.shape[:-2] + (blocks.shape[-2] * 2 * BLOCK_BYTES,))
    return np.swapaxes(rows, -1, -2).astype(np.float32)


def check_shapes(name: str, blocks_shape: tuple[int, ...], scales_shape: tuple[int, ...]) -> None:
    """UserError naming the tensor unless its blocks are [..., rows, groups, 16] over scales [..., rows, groups]."""
    if len(blocks_shape) < 3 or blocks_shape[-1] != BLOCK_BYTES or blocks_shape[:-1] != scales_shape:
        raise UserError(
            f"MXFP4 tensor {name}_blocks has shape {list(blocks_shape)} beside {name}_scales "
            f"{list(scales_shape)}: expected blocks [..., rows, groups, {BLOCK_BYTES}] over scales [..., rows, groups]"
        )


class QuantizedSlice:
    """A safetensors-slice stand-in for the dequantized `name` (shape [..., groups · 32, rows])."""

    def __init__(self, name: str, blocks_slice, scales_slice):
        self.blocks, self.scales = blocks_slice, scales_slice
        blocks_shape, scales_shape = tuple(blocks_slice.get_shape()), tuple(scales_slice.get_shape())
        check_shapes(name, blocks_shape, scales_shape)
        *lead, rows, groups, _ = blocks_shape
        self.shape = (*lead, groups * 2 * BLOCK_BYTES, rows)

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(self.shape) - len(tuple(index)))
        *lead, cols, rows = (s.indices(n) for s, n in zip(index, self.shape))
        if any(step != 1 for _, _, step in (*lead, cols, rows)):
            raise ValueError("QuantizedSlice reads contiguous ranges only")
        group = 2 * BLOCK_BYTES
        first, last = cols[0] // group, math.ceil(cols[1] / group)  # the groups covering the columns asked for
        outer = tuple(slice(a, b) for a, b, _ in lead) + (slice(rows[0], rows[1]), slice(first, last))
        values = dequantize(np.asarray(self.blocks[outer]), np.asarray(self.scales[outer]))
        return values[..., cols[0] - first * group : cols[1] - first * group, :]
