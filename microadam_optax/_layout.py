"""How MicroAdam cuts one flattened parameter into Top-K and quantization blocks."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# Largest block whose block-relative indices fit int16 (indices 0 .. 32767).
INT16_MAX_BLOCK = 32768


@dataclasses.dataclass(frozen=True)
class LeafLayout:
  """Static block geometry of one parameter of ``size`` elements.

  Attributes:
    size: number of elements ``d`` of the flattened parameter.
    topk_block: elements per Top-K block ``B`` (``min(topk_block_size, d)``).
    num_topk_blocks: ``ceil(d / B)``.
    k: entries kept per full Top-K block, ``ceil(B * density)``.
    last_topk_length: elements in the last Top-K block.
    last_k: entries kept in the last block, ``ceil(last_topk_length * density)``.
    quant_block: elements per quantization block ``q`` (``min(q, d)``, rounded
      up to even for 4-bit packing).
    num_quant_blocks: ``ceil(d / q)``.
    last_quant_length: elements in the last quantization block.
    code_bytes: packed bytes per quantization block.
    index_dtype: ``int16`` while ``B <= 32768``, else ``int32``.
  """
  size: int
  topk_block: int
  num_topk_blocks: int
  k: int
  last_topk_length: int
  last_k: int
  quant_block: int
  num_quant_blocks: int
  last_quant_length: int
  code_bytes: int
  index_dtype: np.dtype

  @property
  def topk_padded(self) -> int:
    return self.topk_block * self.num_topk_blocks

  @property
  def quant_padded(self) -> int:
    return self.quant_block * self.num_quant_blocks

  @property
  def aligned(self) -> bool:
    """Whether Top-K blocks and quantization blocks coincide."""
    return (self.topk_block == self.quant_block
            and self.num_topk_blocks == self.num_quant_blocks)


def _ceil_density(n: int, density: float) -> int:
  # Guard against float noise such as 4096 * 0.01 = 40.96000000000001.
  return max(1, min(n, math.ceil(round(n * density, 9))))


def leaf_layout(size: int, *, topk_block_size: int, quant_block_size: int,
                density: float, error_bits: int) -> LeafLayout:
  """Computes the block geometry of a parameter with ``size`` elements."""
  d = max(int(size), 1)  # size-0 leaves get a one-element dummy geometry.
  b = min(topk_block_size, d)
  nb = -(-d // b)
  last_len = d - (nb - 1) * b
  q = min(quant_block_size, d)
  q += q % 2
  nq = -(-d // q)
  last_q = d - (nq - 1) * q
  return LeafLayout(
      size=int(size),
      topk_block=b,
      num_topk_blocks=nb,
      k=_ceil_density(b, density),
      last_topk_length=last_len,
      last_k=_ceil_density(last_len, density),
      quant_block=q,
      num_quant_blocks=nq,
      last_quant_length=last_q,
      code_bytes=(q * error_bits + 7) // 8,
      index_dtype=np.dtype(np.int16 if b <= INT16_MAX_BLOCK else np.int32),
  )
