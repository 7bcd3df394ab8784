"""The offline demo tokenizer: CLIP's layout, round trips, end-of-text as the largest id."""

import json

import numpy as np
import pytest

from dfer_clip_jax import demo_tokenizer
from dfer_clip_jax import tokenizer as tok_lib
from dfer_clip_jax.data.datasets import MAFW_CLASSES
from dfer_clip_jax.models.class_texts import DESCRIPTIONS

VOCAB_SIZE = 1000
TEXTS = (
  [f"{n}." for n in MAFW_CLASSES]
  + [f"an expression of {n}." for n in MAFW_CLASSES]
  + [DESCRIPTIONS[n] for n in MAFW_CLASSES]
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return demo_tokenizer.build_demo_tokenizer(tmp_path_factory.mktemp("demo_tok"), TEXTS, VOCAB_SIZE)


@pytest.fixture(scope="module")
def tok(folder):
  return tok_lib.load_tokenizer(folder)


def _squash(text):
  return "".join(text.lower().split())


def test_layout_and_special_ids(folder, tok):
  vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
  assert len(vocab) == VOCAB_SIZE == len(tok)
  assert sorted(vocab.values()) == list(range(VOCAB_SIZE))
  assert vocab["<|startoftext|>"] == VOCAB_SIZE - 2 == tok.bos_token_id
  assert vocab["<|endoftext|>"] == VOCAB_SIZE - 1 == tok.eos_token_id
  byte_symbols = list(demo_tokenizer.bytes_to_unicode().values())
  assert len(set(byte_symbols)) == 256
  for i, s in enumerate(byte_symbols):
    assert vocab[s] == i and vocab[s + "</w>"] == 256 + i
  merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
  assert merges[0] == "#version: 0.2"
  # Every merge result is a token, numbered in merge order after the 512 byte tokens.
  ids = [vocab["".join(m.split(" "))] for m in merges[1:]]
  assert all(i >= 512 for i in ids)
  assert sorted(set(ids)) == list(range(512, VOCAB_SIZE - 2))


def test_byte_layout_matches_clip(tokenizer_dir):
  """The first 512 ids are exactly CLIP's (needs ../shared/clip_tokenizer)."""
  clip_vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
  ours = demo_tokenizer._base_vocab()
  assert {t: i for t, i in clip_vocab.items() if i < 512} == ours


def test_class_texts_round_trip(tok):
  for name in MAFW_CLASSES:
    # Class names are whole tokens (they are trained with extra weight).
    assert tok_lib.count_tokens(tok, name) == 1, tok.tokenize(name)
  for text in TEXTS + ["A Zebra-crossing at 42 km/h, naïve café!"]:
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.eos_token_id not in ids[1:-1]  # no unknown tokens (unk is end-of-text)
    assert _squash(tok.decode(ids, skip_special_tokens=True)) == _squash(text)


def test_end_of_text_is_largest_and_fits_context(tok):
  # The longest prompts: 16 context placeholders before each descriptor.
  texts = ["X " * 16 + DESCRIPTIONS[n] for n in MAFW_CLASSES]
  for text in texts:
    ids = tok(text)["input_ids"]
    assert len(ids) < 77
    # The text tower pools at argmax(ids): the first largest id must be the end-of-text token.
    assert int(np.argmax(ids)) == len(ids) - 1 == ids.index(tok.eos_token_id)
  _, eot_K = tok_lib.tokenize(tok, texts)
  assert eot_K.max() < 76


def test_deterministic_bytes(folder, tmp_path):
  again = demo_tokenizer.build_demo_tokenizer(tmp_path / "again", list(reversed(TEXTS)), VOCAB_SIZE)
  for name in ("vocab.json", "merges.txt"):
    assert (again / name).read_bytes() == (folder / name).read_bytes()


def test_bad_vocab_sizes(tmp_path):
  with pytest.raises(ValueError, match="at least 515"):
    demo_tokenizer.build_demo_tokenizer(tmp_path, ["x"], vocab_size=514)
  with pytest.raises(ValueError, match="lower vocab_size to at most"):
    demo_tokenizer.build_vocab(["x"], vocab_size=100_000)
