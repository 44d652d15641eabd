"""An independent float64 NumPy implementation of MicroAdam (Algorithm 1).

Written from the paper and ALGORITHMS.md, not from the library: plain loops
over blocks, ``np.argpartition`` for Top-K, explicit nibble packing left out
(codes are kept as integers, which is what packing must preserve).
"""

from __future__ import annotations

import math

import numpy as np


class MicroAdamReference:
  """MicroAdam for one tensor, in float64."""

  def __init__(self, shape, *, b1=0.9, b2=0.999, eps=1e-8, window=10,
               density=0.01, topk_block=4096, quant_block=None, bits=4,
               alpha=0.0, values_round=None):
    self.shape = tuple(shape)
    self.d = int(np.prod(self.shape))
    self.b1, self.b2, self.eps = b1, b2, eps
    self.m = window
    self.density = density
    self.B = min(topk_block, self.d)
    q = topk_block if quant_block is None else quant_block
    q = min(q, self.d)
    self.q = q + (q % 2)
    self.bits = bits
    self.alpha = alpha
    self.values_round = values_round or (lambda v: v)
    self.t = 0
    self.rows = []  # list of (global indices, values), newest last
    self.codes = np.zeros(self.d, np.int64)
    nq = math.ceil(self.d / self.q)
    self.lo = np.zeros(nq)
    self.hi = np.zeros(nq)

  def _k(self, n):
    return max(1, min(n, math.ceil(round(n * self.density, 9))))

  def _quant_blocks(self):
    for j, start in enumerate(range(0, self.d, self.q)):
      yield j, slice(start, min(start + self.q, self.d))

  def dequantize(self):
    out = np.empty(self.d)
    levels = 2**self.bits - 1
    for j, sl in self._quant_blocks():
      u = (self.hi[j] - self.lo[j]) / levels
      out[sl] = self.codes[sl] * u + self.lo[j]
    return out

  def quantize(self, x):
    levels = 2**self.bits - 1
    for j, sl in self._quant_blocks():
      lo, hi = x[sl].min(), x[sl].max()
      self.lo[j], self.hi[j] = lo, hi
      if hi == lo:
        self.codes[sl] = 0
      else:
        u = (hi - lo) / levels
        self.codes[sl] = np.clip(np.floor((x[sl] - lo) / u + 0.5), 0, levels)

  def step(self, grad):
    self.t += 1
    t = self.t
    a = np.asarray(grad, np.float64).reshape(-1) + self.dequantize()
    idx_all, val_all = [], []
    for start in range(0, self.d, self.B):
      block = a[start:start + self.B]
      k = self._k(block.size)
      sel = np.argpartition(-np.abs(block), k - 1)[:k]
      idx_all.append(start + sel)
      val_all.append(block[sel].copy())
    idx = np.concatenate(idx_all)
    val = self.values_round(np.concatenate(val_all))
    a[idx] = 0.0
    self.quantize(a)
    self.rows.append((idx, val))
    self.rows = self.rows[-self.m:]
    m_hat = np.zeros(self.d)
    v_hat = np.zeros(self.d)
    for age, (ri, rv) in enumerate(reversed(self.rows)):
      np.add.at(m_hat, ri, (1 - self.b1) * self.b1**age * rv)
      np.add.at(v_hat, ri, (1 - self.b2) * self.b2**age * rv * rv)
    m_hat /= 1 - self.b1**t
    v_hat /= 1 - self.b2**t
    u = m_hat / (np.sqrt(v_hat) + self.eps)
    if self.alpha > 0:
      err = self.dequantize()
      u = u + self.alpha * err
      self.quantize((1 - self.alpha) * err)
    return u.reshape(self.shape)
