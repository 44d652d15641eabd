"""Where the GPU step kernel's time goes: variants timed with Triton alone.

A study, not a benchmark: it times MicroAdam's per-leaf Triton kernels
(``pallas_kernels/gpu/step_kernel.py``: the Top-K kernel, then the ``u``
kernel) and variants of them made by editing
their source text (a stage left out, another warp count), each on one
4096 x 11008 leaf (4096-entry blocks, density 1 %: 41 entries kept per
block, as the optimizer keeps; window 10), launched
from PyTorch with ``triton.testing.do_bench`` (no JAX in the loop), and
prints for each: time, GB/s of the bytes the real kernel must move, the
compiler's registers per thread and spills, shared memory, and how many
programs fit on one SM by registers. A left-out stage's cost is the
difference to the whole kernel (the variants compute wrong results; only
the whole kernel is checked, elsewhere: ``benchmarks/step_kernel.py``).

  PYTHONPATH=. python3 experiments/step_kernel_variants.py --json variants.json

Needs a CUDA GPU, PyTorch and Triton; JAX only for the optimizer's block
geometry and the kernel's constants (``leaf_layout``,
``pallas_kernels.gpu.step.kernel_constants``), not in the timed loop.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import tempfile

from microadam_optax._layout import leaf_layout
from pallas_kernels.gpu import step as gpu_step

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL = ROOT / "pallas_kernels" / "gpu" / "step_kernel.py"

SEARCH = "  at_least, tie, need = _kth_search(a, k_b, length)\n"
SCATTER = ("    tl.store(widx_ptr + row_base + slot, "
           "pos_t.to(widx_ptr.dtype.element_ty),\n")
SCATTER_END = "             mask=sel)\n    rest = "

# name: list of (old, new) source edits. Without the search only the
# entries at the block's largest magnitude are selected (the stores stay
# inside the row).
EDITS = {
    "whole": [],
    "no_u": [],
    "no_search": [(SEARCH, "  at_least = tl.max(bits & 0x7FFFFFFF)\n"
                           "  tie = at_least\n  need = at_least * 0\n")],
    "no_scatter": [],
}


def _cut(src: str, start: str, end: str) -> str:
  """``src`` without the text from ``start`` up to (not including) the
  ``rest = `` that follows ``end``."""
  i = src.index(start)
  j = src.index(end, i) + len("             mask=sel)\n")
  return src[:i] + src[j:]


#: Variants that launch the Top-K kernel alone (no ``u`` kernel).
NO_U = frozenset({"no_u", "no_search", "no_scatter"})


def variant(name: str, edits, kernel: pathlib.Path = KERNEL) -> tuple:
  """The two kernel functions of ``kernel``'s source with ``edits``
  applied."""
  src = kernel.read_text()
  if name == "no_scatter":
    src = _cut(src, SCATTER, SCATTER_END)
  for old, new in edits:
    assert src.count(old) == 1, (name, old)
    if new is None:
      src = src[:src.index(old)]
    else:
      src = src.replace(old, new)
  path = pathlib.Path(tempfile.mkdtemp()) / f"step_kernel_{name}.py"
  path.write_text(src)
  spec = importlib.util.spec_from_file_location(path.stem, path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[path.stem] = mod
  spec.loader.exec_module(mod)
  return mod.microadam_topk_kernel, mod.microadam_u_kernel


def main() -> None:
  import torch  # pylint: disable=g-import-not-at-top
  import triton  # pylint: disable=g-import-not-at-top

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", type=int, default=4096)
  p.add_argument("--cols", type=int, default=11008)
  p.add_argument("--block", type=int, default=4096)
  p.add_argument("--density", type=float, default=0.01)
  p.add_argument("--window", type=int, default=10)
  p.add_argument("--variants", default=",".join(EDITS))
  p.add_argument("--warps", default="1",
                 help="comma list of the Top-K kernel's warps")
  p.add_argument("--sub", default=str(gpu_step.SUB_PER_THREAD),
                 help="comma list of the Top-K kernel's entries per thread "
                 "in its sub-tiles")
  p.add_argument("--u-warps", default=None,
                 help="comma list of the u kernel's warps (default: its "
                 "default)")
  p.add_argument("--kernel", default=str(KERNEL),
                 help="the kernel's source file (a candidate to compare)")
  p.add_argument("--json", default=None)
  args = p.parse_args()

  dev = "cuda"
  d = args.rows * args.cols
  m = args.window
  # The optimizer's own block geometry and kernel constants.
  lay = leaf_layout(d, topk_block_size=args.block,
                    quant_block_size=args.block, density=args.density,
                    error_bits=4)
  B, nb, k = lay.topk_block, lay.num_topk_blocks, lay.k
  constants = gpu_step.kernel_constants(d, block_size=B, k=k,
                                        last_block_k=lay.last_k, window=m)
  # Three gradients in turn (one gradient again and again makes the error
  # feedback grow and the blocks' distributions drift).
  grads = [torch.randn(d, device=dev, dtype=torch.bfloat16) for _ in range(3)]
  codes = torch.zeros((nb, B // 2), device=dev, dtype=torch.uint8)
  lo = torch.zeros(nb, device=dev, dtype=torch.float32)
  hi = torch.zeros(nb, device=dev, dtype=torch.float32)
  widx = torch.zeros((m, nb, k), device=dev,
                     dtype=getattr(torch, lay.index_dtype.name))
  wval = torch.zeros((m, nb, k), device=dev, dtype=torch.bfloat16)
  w1 = torch.full((m,), 0.1, device=dev, dtype=torch.float32)
  w2 = torch.full((m,), 0.001, device=dev, dtype=torch.float32)
  row = torch.zeros(1, device=dev, dtype=torch.int32)
  eps = torch.full((1,), 1e-8, device=dev, dtype=torch.float32)
  u = torch.empty(d, device=dev, dtype=torch.bfloat16)
  moved = (2 * d + 2 * codes.numel() + 8 * nb * 2 + 2 * d
           + (m + 1) * nb * k * 4)

  x = torch.empty(256 * 2**20, device=dev, dtype=torch.uint8)
  y = torch.empty_like(x)
  copy_ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
  copy_gbs = 2 * x.numel() / copy_ms / 1e6
  print(f"copy bandwidth {copy_gbs:.0f} GB/s; the kernel moves "
        f"{moved / 1e6:.0f} MB ({moved / copy_gbs / 1e6 * 1e3:.3f} ms floor)")

  props = torch.cuda.get_device_properties(0)
  regs_per_sm = 65536
  rows = []
  for name in args.variants.split(","):
    topk_fn, u_fn = variant(name, EDITS[name], pathlib.Path(args.kernel))
    u_constants = gpu_step.constants_of(u_fn, constants)
    u_warps_list = ([gpu_step.default_u_num_warps(constants["EP"])]
                    if args.u_warps is None
                    else [int(w) for w in args.u_warps.split(",")])
    configs = [(int(w), int(sp), int(uw)) for w in args.warps.split(",")
               for sp in args.sub.split(",") for uw in u_warps_list]
    for warps, sub, u_warps in configs:
      topk_constants = gpu_step.constants_of(topk_fn, gpu_step.kernel_constants(
          d, block_size=B, k=k, last_block_k=lay.last_k, window=m,
          num_warps=warps, sub_per_thread=sub))

      def launch(fill: bool, warps=warps, with_u=name not in NO_U, t=[0],
                 topk_constants=topk_constants, u_warps=u_warps):
        t[0] += 1
        g = grads[t[0] % len(grads)]
        if fill:
          row.fill_(t[0] % m)
        compiled = topk_fn[(nb,)](
            g, codes, lo, hi, widx, wval, row, codes, lo, hi, widx, wval,
            num_warps=warps, num_stages=1, **topk_constants)
        if with_u:
          u_fn[(nb,)](widx, wval, w1, w2, row, eps, u, num_warps=u_warps,
                      num_stages=1, **u_constants)
        return compiled
      for _ in range(m + 3):  # fill the window with real entries
        compiled = launch(True)
      torch.cuda.synchronize()
      ms = triton.testing.do_bench(lambda: launch(False),
                                   return_mode="median")
      regs = compiled.n_regs
      threads = 32 * warps
      by_regs = regs_per_sm // max(1, regs * threads)
      shared = compiled.metadata.shared
      by_smem = (props.shared_memory_per_multiprocessor // shared
                 if shared else 32)
      r = dict(variant=name, warps=warps, sub_per_thread=sub,
               u_warps=u_warps, ms=ms,
               gbs=moved / ms / 1e6,
               pct_copy=100 * moved / ms / 1e6 / copy_gbs, regs=regs,
               spills=compiled.n_spills, shared=shared,
               programs_per_sm=min(by_regs, by_smem, 2048 // threads, 32))
      rows.append(r)
      print(f"{name:14s} warps {warps:2d} sub {sub:2d} u_warps {u_warps}: "
            f"{ms:.3f} ms {r['gbs']:6.0f} GB/s "
            f"({r['pct_copy']:.1f} % of copy) Top-K kernel: regs {regs} "
            f"spills {r['spills']} smem {shared} B, "
            f"{r['programs_per_sm']} programs/SM", flush=True)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(dict(
        device=props.name, copy_gbs=copy_gbs, moved_bytes=moved, d=d,
        block=B, k=k, window=m, rows=rows), indent=1))


if __name__ == "__main__":
  main()
