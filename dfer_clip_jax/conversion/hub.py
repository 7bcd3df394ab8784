"""Hugging Face Hub ids as checkpoint names: `clip.checkpoint=openai/clip-vit-base-patch32`.

`resolve` is the one place where a checkpoint name becomes a local path, for every entry point
(the CLIP loader and the tokenizer, through which training and evaluation load CLIP): an existing
file or folder is used as it is; otherwise a name of the form `owner/name` (optionally
`@revision`) is fetched through `huggingface_hub` into its cache (only the files we read:
config, weights, tokenizer), or found there without network access when `HF_HUB_OFFLINE=1`.
`HF_HOME` / `HF_HUB_CACHE` choose the cache as usual.
"""

from __future__ import annotations

import os
import pathlib
import re

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
# What we read from a CLIP repository; the weights in one format only (safetensors first).
_COMMON = ["config.json", "vocab.json", "merges.txt"]
_WEIGHTS = (["model.safetensors", "model-*-of-*.safetensors"], ["pytorch_model.bin"])


def is_hub_id(source: str | os.PathLike) -> bool:
  """Whether `source` names no local file or folder but looks like `owner/name[@revision]`."""
  text = os.fspath(source)
  return not pathlib.Path(text).expanduser().exists() and bool(_HUB_ID.fullmatch(text))


def resolve(source: str | os.PathLike, what: str = "CLIP checkpoint") -> pathlib.Path:
  """A local path for `source`: the file or folder itself, or a Hub id's snapshot folder.

  Raises:
    FileNotFoundError: neither a local path nor a Hub id; or the id cannot be had (offline and
      not cached, unknown repository, no network), saying which id and what to run.
  """
  path = pathlib.Path(os.fspath(source)).expanduser()
  if path.exists():
    return path
  text = os.fspath(source)
  if not _HUB_ID.fullmatch(text):
    raise FileNotFoundError(f"{what} {text} does not exist")
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import errors  # pylint: disable=g-import-not-at-top

  repo_id, _, revision = text.partition("@")
  fetch = f"hf download {repo_id}{f' --revision {revision}' if revision else ''}"
  try:
    for weights in _WEIGHTS:
      folder = pathlib.Path(
        huggingface_hub.snapshot_download(
          repo_id, revision=revision or None, allow_patterns=_COMMON + weights
        )
      )
      if any(folder.glob(w) for w in weights):
        return folder
  except errors.RepositoryNotFoundError as e:
    raise FileNotFoundError(
      f"{what} {text}: no such local path, and no Hugging Face Hub repository {repo_id} "
      f"(or it is private: log in with `hf auth login`)"
    ) from e
  except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, OSError) as e:
    offline = huggingface_hub.constants.HF_HUB_OFFLINE
    raise FileNotFoundError(
      f"{what} {text}: no such local path, and the Hugging Face Hub id {repo_id} is not in "
      f"the cache {huggingface_hub.constants.HF_HUB_CACHE}"
      + (" (HF_HUB_OFFLINE is set)" if offline else " and could not be downloaded")
      + f". On a machine with network access run `{fetch} --include {' '.join(_COMMON)} "
      f"model.safetensors` with the same HF_HOME and copy that cache here, or download the "
      f"folder and give its path ({type(e).__name__}: {e})"
    ) from e
  raise FileNotFoundError(
    f"{what} {text}: the Hugging Face Hub repository {repo_id} holds no model.safetensors or "
    "pytorch_model.bin"
  )
