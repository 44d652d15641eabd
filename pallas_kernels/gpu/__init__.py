"""MicroAdam's GPU kernels: the per-leaf step in two Triton kernels (jax-triton)."""
