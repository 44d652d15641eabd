"""Where the GPU step kernel's time goes: variants timed with Triton alone.

A study, not a benchmark: it times MicroAdam's per-leaf Triton kernel
(``pallas_kernels/gpu/step_kernel.py``) and variants of it made by editing
its source text (a stage left out, another warp count), each on one
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

SEARCH = "  at_least, tie, need = _kth_search(mag, k_b, length)\n"
RANK = "  rank = _flat_exclusive_rank(above.to(RANK_T)\n"
U_WINDOW_START = "  eps = tl.load(eps_ptr)\n"

# name: list of (old, new) source edits; None as new cuts from old to the end.
# Without the search only the block's largest magnitude is selected (the
# stores stay inside the row).
EDITS = {
    "whole": [],
    "no_search": [(SEARCH, "  at_least = tl.max(mag)\n"
                           "  tie = at_least\n  need = 0\n")],
    "no_rank": [(RANK, "  rank = (above.to(RANK_T)\n")],
    "no_u_window": [(U_WINDOW_START, None)],
    "loads_stores": [(SEARCH, "  at_least = tl.max(mag)\n"
                              "  tie = at_least\n  need = 0\n"),
                     (RANK, "  rank = (above.to(RANK_T)\n"),
                     (U_WINDOW_START, None)],
}


def variant(name: str, edits, kernel: pathlib.Path = KERNEL) -> object:
  """The kernel function of ``kernel``'s source with ``edits`` applied."""
  src = kernel.read_text()
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
  return mod.microadam_step_kernel


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
  p.add_argument("--warps", default="8")
  p.add_argument("--kernel", default=str(KERNEL),
                 help="the kernel's source file (a candidate to compare)")
  p.add_argument("--groups", default=None,
                 help="comma list of blocks per program (a kernel with a G "
                 "parameter)")
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
    fn = variant(name, EDITS[name], pathlib.Path(args.kernel))
    groups = ([None] if args.groups is None
              else [int(x) for x in args.groups.split(",")])
    for warps, group in [(int(w), gr) for w in args.warps.split(",")
                         for gr in groups]:
      extra = {} if group is None else {"G": group}
      grid = (nb,) if group is None else (-(-nb // group),)

      def launch(fill: bool, warps=warps, extra=extra, grid=grid, t=[0]):
        t[0] += 1
        g = grads[t[0] % len(grads)]
        if fill:
          row.fill_(t[0] % m)
        return fn[grid](
            g, codes, lo, hi, widx, wval, w1, w2, row, eps,
            codes, lo, hi, widx, wval, u,
            num_warps=warps, num_stages=1, **constants, **extra)
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
      r = dict(variant=name, warps=warps, group=group, ms=ms, gbs=moved / ms / 1e6,
               pct_copy=100 * moved / ms / 1e6 / copy_gbs, regs=regs,
               spills=compiled.n_spills, shared=shared,
               programs_per_sm=min(by_regs, by_smem, 2048 // threads))
      rows.append(r)
      print(f"{name:14s} warps {warps:2d} G {group}: {ms:.3f} ms {r['gbs']:6.0f} GB/s "
            f"({r['pct_copy']:.1f} % of copy) regs {regs} spills "
            f"{r['spills']} smem {shared} B, {r['programs_per_sm']} "
            f"programs/SM", flush=True)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(dict(
        device=props.name, copy_gbs=copy_gbs, moved_bytes=moved, d=d,
        block=B, k=k, window=m, rows=rows), indent=1))


if __name__ == "__main__":
  main()
