"""Pallas kernels: attention behind `qwenjax.attention.dot_product_attention`, grouped matmuls behind `gmm`.

`splash_tpu` (TPU, built on JAX's splash attention) and `flash_gpu` (GPU, Mosaic GPU); `gmm` picks `gmm_gpu`
or `gmm_tpu`; a dispatcher and its backends share helpers through a leaf module (`flash_gpu_common`,
`gmm_common`); `attention_contract` is what every attention kernel computes and accepts; `decode_gpu` is a
decode step's rotary, cache write and attention (`kv_cache.LayerCache.step`); `cross_entropy_gpu` is the loss's
two passes over a chunk of logits (`loss.py`). Import the module you need; no kernel module is imported here, so
a backend's kernel never loads on another backend.

Kernels are picked for `target_platform()`: the machine's backend, or the platform named by
`lowering_platform(...)` while a program is traced for another machine (`jax.export.export(...,
platforms=['tpu'])` on a CPU host: CI's only check that the TPU kernels lower).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax

PLATFORMS = ('cpu', 'gpu', 'tpu')
# jax.export names GPU platforms by vendor; a kernel choice only needs to know it is a GPU.
_PLATFORM_ALIASES = {'cuda': 'gpu', 'rocm': 'gpu'}
_lowering_platform: contextvars.ContextVar[str | None] = contextvars.ContextVar('lowering_platform', default=None)


def target_platform() -> str:
  """'cpu', 'gpu' or 'tpu': the platform kernels are picked for (see `lowering_platform`)."""
  return _lowering_platform.get() or jax.default_backend()


@contextlib.contextmanager
def lowering_platform(platform: str) -> Iterator[str]:
  """Picks kernels for `platform` ('tpu', 'gpu', 'cuda', 'rocm' or 'cpu') while tracing inside this block.

  For lowering on one machine what runs on another: `'auto'` and explicit kernel choices (`'pallas_tpu'`,
  `'megablox'`, ...) are resolved for `platform` instead of this machine's backend, so

      with kernels.lowering_platform('tpu'):
        exported = jax.export.export(jax.jit(step), platforms=['tpu'])(*abstract_args)

  exports a step with the TPU kernels from a CPU host. Trace a fresh `jax.jit` inside the block: jit reuses an
  earlier trace of the same function for the same argument shapes, whatever the platform was then.
  """
  name = _PLATFORM_ALIASES.get(platform, platform)
  if name not in PLATFORMS:
    raise ValueError(f'unknown platform {platform!r}; choose one of {PLATFORMS + tuple(_PLATFORM_ALIASES)}')
  token = _lowering_platform.set(name)
  try:
    yield name
  finally:
    _lowering_platform.reset(token)


def is_hopper(device: jax.Device | None = None) -> bool:
  """A Hopper GPU (compute capability 9.x: H100, H200, H800), the target of the Mosaic GPU kernels."""
  device = device or jax.devices()[0]
  if device.platform != 'gpu':
    return False
  capability = str(getattr(device, 'compute_capability', ''))
  return capability.startswith('9') or any(name in device.device_kind for name in ('H100', 'H200', 'H800'))
