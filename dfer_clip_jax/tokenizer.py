"""CLIP BPE tokenization for prompts: ids (K, L) and end-of-text positions (K,).

Uses `transformers.CLIPTokenizer` (offline). Hugging Face checkpoint folders carry the vocabulary;
OpenAI/OpenCLIP checkpoints don't, so configs name a tokenizer folder for them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from dfer_clip_jax.conversion import hub

START_OF_TEXT = 49406
END_OF_TEXT = 49407


def load_tokenizer(folder: str | os.PathLike):
  """A CLIPTokenizer from a folder holding `vocab.json` + `merges.txt` (any HF CLIP folder, or
  its Hugging Face Hub id)."""
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top

  folder = hub.resolve(folder, what="tokenizer")
  vocab, merges = folder / "vocab.json", folder / "merges.txt"
  for f in (vocab, merges):
    if not f.is_file():
      raise FileNotFoundError(
        f"tokenizer folder {folder} has no {f.name}: point the config's "
        "tokenizer path at a Hugging Face CLIP folder (vocab.json + merges.txt)"
      )
  # Pass the parsed vocabulary: `CLIPTokenizer(vocab_file=...)` silently builds an empty one in
  # transformers 5.
  with open(vocab, encoding="utf-8") as fh:
    vocab_dict = json.load(fh)
  with open(merges, encoding="utf-8") as fh:
    merge_lines = [
      tuple(ln.split()) for ln in fh.read().split("\n") if ln and not ln.startswith("#version")
    ]
  return CLIPTokenizer(vocab=vocab_dict, merges=merge_lines)


def tokenize(
  tokenizer, texts: Sequence[str], context_length: int = 77
) -> tuple[np.ndarray, np.ndarray]:
  """Texts -> (ids (K, context_length) int32, eot positions (K,) int32).

  Padding uses the end-of-text id (as HF does); the towers pool at the *first* end-of-text token,
  so this equals OpenAI's zero padding. Texts that don't fit raise instead of being truncated
  (truncation would cut the end-of-text token and pool at the wrong place).
  """
  # The tokenizer's own end-of-text id (49407 for CLIP's vocabulary, smaller for the demo's).
  ids_KxL = np.full((len(texts), context_length), tokenizer.eos_token_id, np.int32)
  eot_K = np.zeros((len(texts),), np.int32)
  for i, text in enumerate(texts):
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if len(ids) > context_length:
      raise ValueError(
        f"text {i} is {len(ids)} tokens long, more than the context length "
        f"{context_length}: {text[:80]!r}"
      )
    ids_KxL[i, : len(ids)] = ids
    eot_K[i] = len(ids) - 1
  return ids_KxL, eot_K


def count_tokens(tokenizer, text: str) -> int:
  """BPE tokens of `text` without start/end tokens (the reference's `name_lens`)."""
  return len(tokenizer(text, add_special_tokens=False)["input_ids"])
