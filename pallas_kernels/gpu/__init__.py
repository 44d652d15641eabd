"""MicroAdam's GPU kernel: the per-leaf step in one Triton kernel (jax-triton)."""
