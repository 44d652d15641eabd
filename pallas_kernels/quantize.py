"""Block-wise asymmetric quantization with bit packing (MicroAdam's error feedback).

The tensor is cut into blocks of ``q`` elements (rows of a ``(num_blocks, q)``
array; the last block may hold only ``last_block_length`` valid entries). Each
block keeps its minimum ``delta`` and maximum ``Delta`` and every entry is
coded on ``bits`` bits:

.. math::

  u = (\\Delta - \\delta) / (2^{bits} - 1), \\quad
  Q(x) = \\mathrm{clip}(\\lfloor (x - \\delta) / u + 1/2 \\rfloor, 0, 2^{bits} - 1),
  \\quad Q^{-1}(c) = c\\,u + \\delta.

A constant block (``Delta == delta``) codes every entry as 0 and dequantizes to
``delta`` exactly (no division by zero). With ``bits=4`` two codes share a
byte: entry ``2j`` in the low nibble, ``2j + 1`` in the high nibble.

This module holds the pure-``jnp`` reference (also the XLA path of the
optimizer). The kernels quantize inside their fused passes
(:mod:`pallas_kernels.gpu.step`, :mod:`pallas_kernels.tpu.error_feedback`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

VALID_BITS = (4, 8)


def _check_bits(bits: int) -> None:
  if bits not in VALID_BITS:
    raise ValueError(f"bits must be one of {VALID_BITS}, got {bits!r}.")


def packed_row_bytes(block_size: int, bits: int) -> int:
  """Bytes that one block of ``block_size`` codes occupies once packed."""
  _check_bits(bits)
  return (block_size * bits + 7) // 8


def pack_codes(codes: jax.Array, bits: int) -> jax.Array:
  """Packs ``uint8`` codes (values below ``2**bits``) along the last axis.

  Args:
    codes: integer array ``(..., n)`` with entries in ``[0, 2**bits)``.
    bits: 4 (two codes per byte, the first in the low nibble) or 8.

  Returns:
    ``uint8`` array ``(..., ceil(n * bits / 8))``.
  """
  _check_bits(bits)
  codes = codes.astype(jnp.uint8)
  if bits == 8:
    return codes
  n = codes.shape[-1]
  if n % 2:
    codes = jnp.concatenate(
        [codes, jnp.zeros(codes.shape[:-1] + (1,), jnp.uint8)], axis=-1)
  pairs = codes.reshape(codes.shape[:-1] + (-1, 2))
  return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_codes(packed: jax.Array, bits: int, n: int) -> jax.Array:
  """Inverse of :func:`pack_codes`: returns ``uint8`` codes ``(..., n)``."""
  _check_bits(bits)
  if bits == 8:
    return packed[..., :n]
  low = packed & jnp.uint8(0x0F)
  high = packed >> 4
  codes = jnp.stack([low, high], axis=-1).reshape(packed.shape[:-1] + (-1,))
  return codes[..., :n]


def _valid_mask(num_blocks: int, block_size: int,
                last_block_length: int) -> jax.Array:
  col = jnp.arange(block_size)[None, :]
  row = jnp.arange(num_blocks)[:, None]
  return (row < num_blocks - 1) | (col < last_block_length)


def block_min_max(x: jax.Array, last_block_length: int | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """Per-row minimum and maximum of ``x`` ``(num_blocks, q)``, float32.

  Entries of the last row at positions ``>= last_block_length`` are ignored.
  """
  num_blocks, q = x.shape
  x = x.astype(jnp.float32)
  if last_block_length is None or last_block_length == q:
    return jnp.min(x, axis=1), jnp.max(x, axis=1)
  valid = _valid_mask(num_blocks, q, last_block_length)
  lo = jnp.min(jnp.where(valid, x, jnp.inf), axis=1)
  hi = jnp.max(jnp.where(valid, x, -jnp.inf), axis=1)
  return lo, hi


def quantize_reference(x: jax.Array, bits: int = 4,
                       last_block_length: int | None = None
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Quantizes each row of ``x`` with its own min/max and packs the codes.

  Args:
    x: float array ``(num_blocks, q)``; ``q`` even when ``bits == 4``.
    bits: 4 or 8.
    last_block_length: valid entries in the last row (default: all ``q``).
      Padded entries neither count towards that row's min/max nor carry
      meaning in their codes (they are coded as 0).

  Returns:
    ``(packed_codes uint8 (num_blocks, q * bits / 8), block_min float32
    (num_blocks,), block_max float32 (num_blocks,))``.
  """
  _check_bits(bits)
  num_blocks, q = x.shape
  x = x.astype(jnp.float32)
  lo, hi = block_min_max(x, last_block_length)
  codes = quantize_codes(x, lo, hi, bits)
  if last_block_length is not None and last_block_length != q:
    codes = jnp.where(_valid_mask(num_blocks, q, last_block_length), codes, 0)
  return pack_codes(codes, bits), lo, hi


def quantize_codes(x: jax.Array, lo: jax.Array, hi: jax.Array,
                   bits: int) -> jax.Array:
  """Unpacked codes of ``x`` ``(num_blocks, q)`` given per-row min and max."""
  levels = (1 << bits) - 1
  scale = (hi - lo) / levels
  safe = jnp.where(scale > 0, scale, 1.0)[:, None]
  c = jnp.floor((x - lo[:, None]) / safe + 0.5)
  c = jnp.clip(c, 0, levels)
  c = jnp.where((scale > 0)[:, None], c, 0.0)
  return c.astype(jnp.uint8)


def dequantize_reference(packed: jax.Array, lo: jax.Array, hi: jax.Array,
                         bits: int = 4, block_size: int | None = None
                         ) -> jax.Array:
  """Dequantizes packed codes ``(num_blocks, bytes)`` to float32 ``(num_blocks, q)``.

  Args:
    packed: ``uint8`` codes from :func:`quantize_reference`.
    lo: per-block minimum ``(num_blocks,)``.
    hi: per-block maximum ``(num_blocks,)``.
    bits: 4 or 8.
    block_size: ``q`` (default: ``packed.shape[1] * 8 // bits``).

  Returns:
    ``c * (hi - lo) / (2**bits - 1) + lo`` per entry, float32.
  """
  _check_bits(bits)
  if block_size is None:
    block_size = packed.shape[-1] * 8 // bits
  codes = unpack_codes(packed, bits, block_size).astype(jnp.float32)
  lo = lo.astype(jnp.float32)
  scale = (hi.astype(jnp.float32) - lo) / ((1 << bits) - 1)
  return codes * scale[:, None] + lo[:, None]


__all__ = ["VALID_BITS", "block_min_max", "dequantize_reference", "pack_codes",
           "packed_row_bytes", "quantize_codes", "quantize_reference",
           "unpack_codes"]
