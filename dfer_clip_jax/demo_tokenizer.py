"""A small CLIP-compatible byte-level BPE vocabulary, trained offline for the demo.

The demo's tiny random CLIP cannot download CLIP's 49,408-token vocabulary, so it trains its own:
the same byte-level alphabet, the same `</w>` end-of-word marker, the same text normalisation and
word splitting as `transformers.CLIPTokenizer` (we pre-tokenise with that tokenizer's own
normaliser and pre-tokeniser, so training and use cannot disagree), and the same id layout:

  0..255     the 256 byte symbols in `bytes_to_unicode` order
  256..511   the same symbols with `</w>` (a word ending in that byte)
  512..      one token per learned merge, in merge order
  V-2, V-1   `<|startoftext|>`, `<|endoftext|>`: end-of-text is the largest id, where the text
             tower pools (`models.clip.end_of_text_positions`).

Every byte has a token, so any text tokenizes; the built-in corpus of common English words keeps
arbitrary prompts short. `dfer_clip_jax.tokenizer.load_tokenizer(folder)` reads the result.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
from collections.abc import Iterable, Sequence

START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"
NUM_BASE_TOKENS = 512  # 256 byte symbols, with and without END_OF_WORD
# The given texts count this many times a corpus word, so their words become whole tokens first.
TEXT_WEIGHT = 10

# Common English words plus the vocabulary of faces, expressions and prompts: enough that prompts
# other than the demo's own texts tokenize into words or word pieces rather than single bytes.
BUILTIN_CORPUS = """
a an the this that these those it its is are was were be been being am do does did done have has
had having will would can could shall should may might must not no nor yes and or but if then
else so because as than too very just only also even still yet again ever never always often
sometimes usually already almost quite rather much many more most less least few little some any
all each every both either neither other another such same own of in on at by for with without
from to into onto over under above below between among through across along around behind before
after during until since about against toward towards up down out off away back here there where
when why how what which who whom whose while i me my mine you your yours he him his she her hers
we us our ours they them their theirs one two three four five six seven eight nine ten first
second third last next new old young good bad great small large big long short high low left
right early late hard easy strong weak open close closed full empty light dark bright soft warm
cold hot quick slow fast real true false clear simple able whole half
person people man woman men women boy girl child children baby adult face faces head hair eye
eyes eyebrow eyebrows brow brows eyelid eyelids lid lids lash lashes forehead temple cheek cheeks
cheekbone nose nostril nostrils mouth lip lips upper lower corner corners teeth tooth tongue jaw
chin neck skin muscle muscles wrinkle wrinkles wrinkled line lines furrow furrows crease creases
dimple gaze stare look looks looking glance frown frowning smile smiling smirk grin laugh
laughing cry crying tear tears blink blinking squint squinting raise raised raising lower
lowered lowering lift lifted pull pulled pulling push pushed press pressed pressing tighten
tightened tight tense tension relax relaxed drop dropped droop drooping narrow narrowed wide
widen widened stretch stretched part parted flare flared bare bared bite bitten clench clenched
furrowed arched slightly strongly gently sideways inward outward upward downward together apart
expression expressions emotion emotions emotional feeling feelings mood state facial video clip
clips frame frames photo picture image movie scene scenes sequence moment showing shows shown
appears appear seems seem express expressing expresses expressed
happy happiness joy joyful glad pleased delight cheerful content sad sadness unhappy sorrow
grief gloomy upset neutral calm blank plain indifferent angry anger rage furious annoyed
irritated mad hostile surprise surprised amazed astonished shocked startled disgust disgusted
revulsion repulsed gross fear afraid scared frightened terrified nervous worried worry anxious
anxiety uneasy contempt scorn disdain helpless helplessness hopeless powerless resigned
disappointed disappointment letdown regret confused confusion bored boredom tired sleepy shame
embarrassed pride proud love hate interest curious
make makes made making take takes took taken get gets got give gives gave given go goes went
gone come comes came see sees saw seen know knows knew think thinks thought say says said tell
told ask asked find found feel feels felt keep kept turn turned move moved show hold held bring
brought begin began start started stop stopped seem seemed become became leave left put set let
run ran walk walked talk talked speak spoke spoken listen watch watched read write wrote play
played work worked live lived try tried use used want wanted need needed like liked help helped
call called sit sat stand stood wait waited answer question
time times day days year years week night morning evening world life home house room door
window table car road city water light sound voice word words name names thing things way part
place side end kind group number point hand hands body color colour black white red green blue
yellow gray grey brown background camera
"""


def bytes_to_unicode() -> dict[int, str]:
  """CLIP/GPT-2's reversible byte -> printable character map, in vocabulary order.

  Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, ...) map to
  chr(256 + k) in byte order. Insertion order is the order of the vocabulary's first 256 ids.
  """
  printable = (
    list(range(ord("!"), ord("~") + 1))
    + list(range(ord("¡"), ord("¬") + 1))
    + list(range(ord("®"), ord("ÿ") + 1))
  )
  mapping = {b: chr(b) for b in printable}
  extra = 0
  for b in range(256):
    if b not in mapping:
      mapping[b] = chr(256 + extra)
      extra += 1
  return mapping


def _base_vocab() -> dict[str, int]:
  symbols = list(bytes_to_unicode().values())
  vocab = {s: i for i, s in enumerate(symbols)}
  vocab.update({s + END_OF_WORD: len(symbols) + i for i, s in enumerate(symbols)})
  return vocab


def _word_counts(texts: Iterable[str], weight: int, counts: collections.Counter) -> None:
  """Adds the byte-level words of `texts`, split exactly as `CLIPTokenizer` splits them."""
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top

  vocab = _base_vocab()
  vocab.update({START_OF_TEXT: len(vocab), END_OF_TEXT: len(vocab) + 1})
  backend = CLIPTokenizer(vocab=vocab, merges=[]).backend_tokenizer
  for text in texts:
    for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text)):
      if word not in (START_OF_TEXT, END_OF_TEXT):
        counts[word] += weight


def _merge_word(symbols: list[str], a: str, b: str) -> list[str]:
  out, i = [], 0
  while i < len(symbols):
    if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
      out.append(a + b)
      i += 2
    else:
      out.append(symbols[i])
      i += 1
  return out


def train_merges(word_counts: dict[str, int], num_tokens: int) -> list[tuple[str, str]]:
  """Greedy BPE: repeatedly merges the most frequent adjacent pair until `num_tokens` new tokens.

  Ties go to the lexicographically smallest pair, so the result depends only on the counts.
  Words are byte-level strings; their last symbol carries END_OF_WORD.
  """
  # (symbols, count) per distinct word, in sorted order for determinism.
  words = [([*w[:-1], w[-1] + END_OF_WORD], c) for w, c in sorted(word_counts.items()) if w]
  # Pair statistics are kept incrementally: only the words containing the merged pair change.
  pair_counts: collections.Counter = collections.Counter()
  pair_words: dict[tuple[str, str], set[int]] = collections.defaultdict(set)
  for k, (syms, c) in enumerate(words):
    for pair in zip(syms, syms[1:]):
      pair_counts[pair] += c
      pair_words[pair].add(k)
  known = set(_base_vocab())
  merges: list[tuple[str, str]] = []
  merged_pairs: set[tuple[str, str]] = set()
  new_tokens = 0
  while new_tokens < num_tokens:
    pair_counts = +pair_counts  # drop pairs whose count fell to 0
    if not pair_counts:
      raise ValueError(
        f"the texts allow only {new_tokens} new tokens, {num_tokens} were asked "
        f"for: lower vocab_size to at most {NUM_BASE_TOKENS + new_tokens + 2}"
      )
    best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
    # A pair can reappear when two merge paths build the same token: apply it again, list it once.
    if best not in merged_pairs:
      merged_pairs.add(best)
      merges.append(best)
    if best[0] + best[1] not in known:
      known.add(best[0] + best[1])
      new_tokens += 1
    for k in sorted(pair_words.pop(best)):
      syms, c = words[k]
      merged = _merge_word(syms, *best)
      if merged == syms:
        continue
      for pair in zip(syms, syms[1:]):
        pair_counts[pair] -= c
      for pair in zip(merged, merged[1:]):
        pair_counts[pair] += c
        pair_words[pair].add(k)
      words[k] = (merged, c)
    pair_counts.pop(best, None)
  return merges


def build_vocab(
  texts: Sequence[str], vocab_size: int = 1000
) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """Trains on `texts` (weighted TEXT_WEIGHT) + BUILTIN_CORPUS: (vocab token -> id, merges)."""
  if vocab_size < NUM_BASE_TOKENS + 3:
    raise ValueError(
      f"vocab_size must be at least {NUM_BASE_TOKENS + 3} (256 bytes, 256 "
      f"end-of-word bytes, one merge, two special tokens), got {vocab_size}"
    )
  counts: collections.Counter = collections.Counter()
  _word_counts([BUILTIN_CORPUS], 1, counts)
  _word_counts(texts, TEXT_WEIGHT, counts)
  merges = train_merges(dict(counts), vocab_size - NUM_BASE_TOKENS - 2)
  vocab = _base_vocab()
  for a, b in merges:
    vocab.setdefault(a + b, len(vocab))
  vocab[START_OF_TEXT] = len(vocab)
  vocab[END_OF_TEXT] = len(vocab)
  assert len(vocab) == vocab_size, (len(vocab), vocab_size)
  return vocab, merges


def _write_atomic(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text, encoding="utf-8", newline="\n")
  os.replace(tmp, path)


def build_demo_tokenizer(
  out_dir: str | os.PathLike, texts: Sequence[str], vocab_size: int = 1000
) -> pathlib.Path:
  """Trains the vocabulary and writes `vocab.json` + `merges.txt` into `out_dir`.

  Args:
    out_dir: folder to write (created if absent); `tokenizer.load_tokenizer(out_dir)` reads it.
    texts: the texts the model will see (class names, templates, descriptors); lower-cased and
      split as CLIP does. Their order does not matter.
    vocab_size: total ids including the 512 byte tokens and the 2 special tokens; the text
      tower's `vocab_size` must equal it. End-of-text gets id vocab_size - 1.

  Returns:
    `out_dir` as a Path. The bytes written depend only on the texts (as a multiset) and
    vocab_size.
  """
  vocab, merges = build_vocab(texts, vocab_size)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  _write_atomic(out / "vocab.json", json.dumps(vocab, ensure_ascii=False))
  _write_atomic(out / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  return out
