"""A jitted clip -> class-probability predictor for a restored model (`restore.load_model`).

```python
from dfer_clip_jax import inference, restore
model, spec, _ = restore.load_model("runs/dfew_fold1", which="best")
probs_NxC = inference.Predictor(model, spec)(clips_uint8)  # (N, T, S, S, 3) uint8 -> (N, C)
```
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from dfer_clip_jax import state as state_lib
from dfer_clip_jax.models import dfer_clip as dfer_lib


class Predictor:
  """Class probabilities of uint8 clips, jitted for one batch shape.

  Clips are padded to a multiple of `batch_size`, so every call runs the same compiled program;
  what does not depend on the video (the class prompts' text features) is computed once.
  """

  def __init__(self, model: nnx.Module, spec: state_lib.ModelSpec, *, batch_size: int = 8):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.spec = spec
    self.batch_size = batch_size
    self.graphdef, self.state = nnx.split(model)
    constants, self._probs = dfer_lib.eval_functions(self.graphdef)
    self._constants = constants(self.state)

  @property
  def clip_shape(self) -> tuple[int, int, int, int]:
    """(T, H, W, 3) of one clip."""
    s = self.spec
    return (s.num_frames, s.image_size, s.image_size, 3)

  def __call__(self, clips_uint8: np.ndarray) -> np.ndarray:
    """(N, T, H, W, 3) uint8 clips -> (N, C) float32 probabilities."""
    clips_uint8 = np.asarray(clips_uint8)
    if clips_uint8.dtype != np.uint8 or clips_uint8.shape[1:] != self.clip_shape:
      raise ValueError(
        f"expected uint8 clips of shape (N, {', '.join(map(str, self.clip_shape))})"
        f", got {clips_uint8.dtype} {clips_uint8.shape}"
      )
    n = clips_uint8.shape[0]
    out = []
    for start in range(0, n, self.batch_size):
      batch = clips_uint8[start : start + self.batch_size]
      pad = self.batch_size - batch.shape[0]
      if pad:
        batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], np.uint8)])
      out.append(
        np.asarray(self._probs(self.state, batch, self._constants))[: self.batch_size - pad]
      )
    if not out:
      return np.zeros((0, len(self.spec.class_names)), np.float32)
    return np.concatenate(out)


def model_description(spec: state_lib.ModelSpec) -> dict[str, Any]:
  """What a prediction file records about the model: classes, their texts, input and frames."""
  try:
    texts = spec.model.texts() if spec.model.head == "prompt" else None
  except (OSError, ValueError):
    # A user class-texts file of the training machine may be absent here; the prompts
    # themselves are model state, so prediction does not need it.
    texts = None
  return {
    "class_names": list(spec.class_names),
    "class_texts": texts,
    "image_size": spec.image_size,
    "num_frames": spec.num_frames,
    "normalize": spec.model.normalize,
    "head": spec.model.head,
    "text_type": spec.model.text_type,
  }
