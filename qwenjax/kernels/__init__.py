"""Pallas kernels: attention behind `qwenjax.attention.dot_product_attention`, grouped matmuls behind `gmm`.

`splash_tpu` (TPU, built on JAX's splash attention) and `flash_gpu` (GPU, Mosaic GPU); `gmm` picks `gmm_gpu`
or `gmm_tpu`. Import the module you need; no kernel module is imported here, so a backend's kernel never loads
on another backend.
"""

import jax


def is_hopper(device: jax.Device | None = None) -> bool:
  """A Hopper GPU (compute capability 9.x: H100, H200, H800), the target of the Mosaic GPU kernels."""
  device = device or jax.devices()[0]
  if device.platform != 'gpu':
    return False
  capability = str(getattr(device, 'compute_capability', ''))
  return capability.startswith('9') or any(name in device.device_kind for name in ('H100', 'H200', 'H800'))
