r"""DFER-CLIP on your own videos (the `custom` dataset): the paper's recipe (docs/method.md).

  python -m dfer_clip_jax.data.prepare --videos=labels.csv --out=data/mine
  python -m dfer_clip_jax.main --config=configs/custom.py:data=data/mine --workdir=runs/mine \
    --config.clip.checkpoint=openai/clip-vit-base-patch32

`data=DIR` is a folder written by `dfer_clip_jax.data.prepare`: its classes.txt names the
classes (label order), train.txt and test.txt are the annotation lists (frame folders relative to DIR; one
split: fold 1). The class texts are "an expression of <class>." (text type name_with_context:
your class names have no built-in descriptions); to write your own descriptions, put one per
class in a file and add `--config.model.class_texts_file=texts.txt`.

Arguments after the colon: data=DIR, and those of configs/dfew.py (fold is always 1).
"""

from dfer_clip_jax import config_lib


def get_config(arg=None):
  a = config_lib.common_args(arg, data="")
  if not a.text:
    a.text = "name_with_context"
  c = config_lib.paper_config_from_args("custom", a)
  if a.data:
    c.data.root = a.data
    c.data.classes_file = f"{a.data}/classes.txt"
    c.data.train_list = f"{a.data}/train.txt"
    c.data.test_list = f"{a.data}/test.txt"
  return c
