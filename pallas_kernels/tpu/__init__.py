"""MicroAdam's Mosaic TPU kernels: error feedback, and the window's update."""
