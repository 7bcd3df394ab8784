"""Class names and label ids of the supported datasets.

The label id of a class is its position in these tuples. The order is the one of the
reference's annotation lists (SPEC section 4); for MAFW it is *not* MAFW's native order:
the reference remapped MAFW so that its first seven classes coincide with DFEW's.
"""

DFEW_CLASSES: tuple[str, ...] = (
    'happiness', 'sadness', 'neutral', 'anger', 'surprise', 'disgust', 'fear')

MAFW_CLASSES: tuple[str, ...] = DFEW_CLASSES + (
    'contempt', 'anxiety', 'helplessness', 'disappointment')

# FERV39k shares DFEW's seven classes and order; the synthetic datasets reuse the real
# class names so that prompts built from class names stay meaningful.
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    'dfew': DFEW_CLASSES,
    'ferv39k': DFEW_CLASSES,
    'mafw': MAFW_CLASSES,
    'synthetic7': DFEW_CLASSES,
    'synthetic11': MAFW_CLASSES,
}


def class_names(dataset: str) -> tuple[str, ...]:
  """Returns the class names of `dataset` (a key of `CLASS_NAMES`) in label order."""
  try:
    return CLASS_NAMES[dataset]
  except KeyError:
    raise ValueError(
        f'unknown dataset {dataset!r}: expected one of {sorted(CLASS_NAMES)}') from None
