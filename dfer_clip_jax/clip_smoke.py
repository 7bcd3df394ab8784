"""Install check: builds a small random CLIP, writes it as an OpenAI-format safetensors file, loads
it back through `load_clip` (the path real checkpoints take) and prints its features.

  python -m dfer_clip_jax.clip_smoke
"""

import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from dfer_clip_jax.conversion.clip_weights import load_clip, params_to_openai
from dfer_clip_jax.models.clip import CLIP, tiny_config


def main() -> None:
  config = tiny_config()
  source = CLIP(config, rngs=nnx.Rngs(0))
  with tempfile.TemporaryDirectory() as tmp:
    path = f"{tmp}/tiny_clip.safetensors"
    save_file(params_to_openai(source), path)
    t0 = time.perf_counter()
    model, loaded = load_clip(path)
    load_s = time.perf_counter() - t0
  if loaded != config:
    raise SystemExit(f"config round trip failed: {loaded} != {config}")
  pixels = jax.random.uniform(
    jax.random.key(0), (4, config.vision.image_size, config.vision.image_size, 3)
  )
  ids = jnp.asarray(np.r_[[1, 5, 9, config.text.vocab_size - 1], np.zeros(73, int)][None])
  img = jax.jit(lambda m, x: m.encode_image(x))(model, pixels)
  txt = jax.jit(lambda m, x: m.encode_text(x))(model, ids)
  same = np.allclose(np.asarray(img), np.asarray(source.encode_image(pixels)), atol=1e-5)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; loaded in {load_s:.2f}s")
  print(
    f"image features {img.shape}, text features {txt.shape}, "
    f"round trip {'exact' if same else 'MISMATCH'}"
  )
  if not same:
    raise SystemExit(1)


if __name__ == "__main__":
  main()
