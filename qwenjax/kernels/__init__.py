"""Pallas attention kernels behind `qwenjax.attention.dot_product_attention`.

`splash_tpu` (TPU, built on JAX's splash attention) and `flash_gpu` (GPU, Mosaic GPU). Import the module you
need; nothing is imported here, so a backend's kernel never loads on another backend.
"""
