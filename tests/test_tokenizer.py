"""CLIP tokenization equals the reference implementation's token ids."""

import json

import numpy as np
import pytest

from dfer_clip_jax import tokenizer as tok_lib

NAMES = [
  "happiness",
  "sadness",
  "neutral",
  "anger",
  "surprise",
  "disgust",
  "fear",
  "contempt",
  "anxiety",
  "helplessness",
  "disappointment",
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
  return tok_lib.load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def reference_tokens(reference_dir):
  return json.loads((reference_dir / "sampling_and_tokens.json").read_text())["tokens"]


def _compare(ids, eot, ref):
  ref_ids, ref_eot = np.asarray(ref["ids"]), np.asarray(ref["eot_index"])
  np.testing.assert_array_equal(eot, ref_eot)
  for row, ref_row, e in zip(ids, ref_ids, ref_eot):
    # The reference pads with 0, HF with the end-of-text id: compare up to and including eot.
    np.testing.assert_array_equal(row[: e + 1], ref_row[: e + 1])


@pytest.mark.parametrize(
  "text_type,template",
  [("class_names", "{}."), ("class_names_with_context", "an expression of {}.")],
)
def test_prompt_ids_equal_reference(tok, reference_tokens, text_type, template):
  for dataset, by_type in reference_tokens.items():
    for n_ctx, ref in by_type[text_type].items():
      num_classes = len(ref["ids"])
      texts = ["X " * int(n_ctx) + template.format(n) for n in NAMES[:num_classes]]
      ids, eot = tok_lib.tokenize(tok, texts)
      _compare(ids, eot, ref)
      lens = [tok_lib.count_tokens(tok, template.format(n)) for n in NAMES[:num_classes]]
      np.testing.assert_array_equal(lens, ref["name_lens"], err_msg=f"{dataset} {n_ctx}")


def test_descriptor_ids_round_trip(tok, reference_tokens):
  """Descriptor texts are the paper's (not ours): decode the reference ids at test time only and
  check that tokenizing them again gives the same ids."""
  for by_type in reference_tokens.values():
    for ref in by_type["class_descriptor"].values():
      texts = [tok.decode(row[1:e]) for row, e in zip(ref["ids"], ref["eot_index"])]
      ids, eot = tok_lib.tokenize(tok, texts)
      _compare(ids, eot, ref)


def test_too_long_text_raises(tok):
  with pytest.raises(ValueError, match="context length"):
    tok_lib.tokenize(tok, ["word " * 100])


def test_missing_vocabulary(tmp_path):
  with pytest.raises(FileNotFoundError, match="vocab.json"):
    tok_lib.load_tokenizer(tmp_path)
