"""The optimizer, built from config data: regex groups -> learning rate / frozen.

Each parameter (`nnx.Param`, by its dotted path such as `clip.visual.conv1.kernel`) belongs to the
first group whose regex matches the whole path; every parameter must match some group (end the
list with a catch-all frozen group). Frozen parameters get no gradient (the train step
differentiates with respect to `optimizer.wrt` only), no update and no optimizer state.

SGD follows PyTorch (the reference's recipe, docs/method.md "Training"):
  g = grad + weight_decay * p          (coupled decay, on every trained parameter)
  buf = momentum * buf + g             (buf starts at 0, so the first buf is g, as in PyTorch)
  p = p - lr_group * schedule(step) * buf
AdamW (optax.adamw) has decoupled decay: p -= lr * (adam_update + weight_decay * p).

`schedule` maps the step (number of updates done so far) to a multiplier of each group's base
lr, e.g. an epoch-wise multistep schedule:
  optax.piecewise_constant_schedule(1.0, {30 * steps_per_epoch: 0.1, 40 * steps_per_epoch: 0.1})
It is one callable for all groups or a mapping group name -> callable.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

Schedule = Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class ParamGroup:
  """Parameters whose dotted path fully matches `regex` train with base learning rate `lr`."""

  name: str
  regex: str
  lr: float = 0.0
  trainable: bool = True

  @classmethod
  def from_config(cls, d: Mapping[str, Any] | ParamGroup) -> ParamGroup:
    if isinstance(d, ParamGroup):
      return d
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown or "name" not in d or "regex" not in d:
      raise ValueError(
        f"parameter group {dict(d)!r}: needs 'name' and 'regex', may have 'lr' "
        f"and 'trainable'; unknown keys {unknown}"
      )
    group = cls(**dict(d))
    try:
      re.compile(group.regex)
    except re.error as err:
      raise ValueError(
        f"parameter group {group.name!r}: invalid regex {group.regex!r}: {err}"
      ) from err
    if group.trainable and not group.lr > 0:
      raise ValueError(
        f"parameter group {group.name!r} is trainable but has lr={group.lr}: "
        "give a positive lr or set trainable=False"
      )
    return group


def path_name(path: Sequence[Any]) -> str:
  """Dotted name of an NNX state path or a jax key path ('clip.visual.conv1.kernel')."""
  parts = []
  for p in path:
    if isinstance(p, jax.tree_util.GetAttrKey):
      continue  # the `.value` of a Variable
    if isinstance(p, jax.tree_util.DictKey):
      p = p.key
    elif isinstance(p, jax.tree_util.SequenceKey):
      p = p.idx
    parts.append(str(p))
  return ".".join(parts)


def param_names(model: nnx.Module) -> list[str]:
  """Dotted paths of all `nnx.Param`s of the model."""
  return [path_name(path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def groups_from_config(optim_config) -> list[ParamGroup]:
  """The parameter groups of a run config's `optim` section: `optim.groups` (name -> regex over
  dotted parameter paths) with `optim.lr` (name -> base learning rate, 0 = frozen); every
  parameter no group matches is frozen. Groups whose model part is absent (the head group of a
  prompt model) match nothing: `present_groups` leaves them out."""
  regexes, lrs = dict(optim_config.groups), dict(optim_config.lr)
  if set(regexes) != set(lrs):
    raise ValueError(
      f"optim.groups {sorted(regexes)} and optim.lr {sorted(lrs)} must name the same groups"
    )
  groups = [
    ParamGroup(name, regex, float(lrs[name]), trainable=lrs[name] > 0)
    for name, regex in regexes.items()
  ]
  return groups + [ParamGroup(FROZEN, r".*", trainable=False)]


FROZEN = "frozen"  # the catch-all group of `groups_from_config`


def _first_match(groups: Sequence[ParamGroup], name: str) -> ParamGroup | None:
  return next((g for g in groups if re.fullmatch(g.regex, name)), None)


def present_groups(
  model: nnx.Module, groups: Sequence[Mapping[str, Any] | ParamGroup]
) -> list[ParamGroup]:
  """The groups that some parameter of `model` falls in (first match wins), in order."""
  parsed = [ParamGroup.from_config(g) for g in groups]
  used = {g.name for n in param_names(model) if (g := _first_match(parsed, n)) is not None}
  return [g for g in parsed if g.name in used]


def partition(
  model: nnx.Module, groups: Sequence[Mapping[str, Any] | ParamGroup]
) -> dict[str, ParamGroup]:
  """Dotted parameter path -> its group (the first whose regex matches the whole path).

  Raises if a parameter matches no group or a trainable group matches no parameter (a misspelled
  regex must not silently freeze or drop anything).
  """
  parsed = [ParamGroup.from_config(g) for g in groups]
  names = [g.name for g in parsed]
  if len(set(names)) != len(names):
    raise ValueError(f"parameter group names repeat: {names}")
  assignment: dict[str, ParamGroup] = {}
  unmatched = []
  for name in param_names(model):
    group = _first_match(parsed, name)
    if group is None:
      unmatched.append(name)
    else:
      assignment[name] = group
  if unmatched:
    shown = ", ".join(unmatched[:10]) + (
      f", ... ({len(unmatched)} in all)" if len(unmatched) > 10 else ""
    )
    raise ValueError(
      f"parameters match no group regex {[g.regex for g in parsed]}: {shown}; "
      "end the groups with a frozen catch-all "
      "{'name': 'frozen', 'regex': '.*', 'trainable': False}"
    )
  used = {g.name for g in assignment.values()}
  empty = [g.name for g in parsed if g.trainable and g.name not in used]
  if empty:
    raise ValueError(
      f"trainable parameter groups {empty} match no parameter (regexes "
      f"{[g.regex for g in parsed if g.name in empty]})"
    )
  return assignment


@dataclasses.dataclass(frozen=True)
class TrainableFilter:
  """NNX filter: the `nnx.Param`s whose dotted path is in `names` (hashable, for jit caching)."""

  names: frozenset[str]

  def __call__(self, path, value) -> bool:
    return isinstance(value, nnx.Param) and path_name(path) in self.names


def _multiplier(schedule: Schedule | Mapping[str, Schedule] | None, group: str) -> Schedule:
  if schedule is None:
    return lambda step: 1.0
  if isinstance(schedule, Mapping):
    if group not in schedule:
      raise ValueError(
        f"schedule mapping has no entry for group {group!r} (has {sorted(schedule)})"
      )
    return schedule[group]
  return schedule


def make_optimizer(
  model: nnx.Module,
  groups: Sequence[Mapping[str, Any] | ParamGroup],
  *,
  optimizer: str = "sgd",
  momentum: float = 0.9,
  nesterov: bool = False,
  weight_decay: float = 1e-4,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  schedule: Schedule | Mapping[str, Schedule] | None = None,
  clip_grad_norm: float | None = None,
) -> nnx.Optimizer:
  """An `nnx.Optimizer` over the trainable groups' parameters.

  Args:
    model: the model (its `nnx.Param`s are partitioned by `groups`).
    groups: dicts {name, regex, lr, trainable=True} or `ParamGroup`s, first match wins.
    optimizer: "sgd" (PyTorch form, coupled weight decay) or "adamw" (decoupled).
    momentum, nesterov: SGD momentum (0 = plain SGD).
    weight_decay: SGD: added to the gradient; AdamW: decoupled, scaled by the lr.
    b1, b2, eps: AdamW moments.
    schedule: multiplier of the base lrs as a function of the step, for all groups or per group.
    clip_grad_norm: clip the raw gradients (all trained parameters together) to this global norm
      before weight decay, as torch.nn.utils.clip_grad_norm_ before optimizer.step().

  Returns:
    The optimizer; `optimizer.wrt` is the trainable-parameter filter to differentiate with:
    `nnx.value_and_grad(loss, argnums=nnx.DiffState(0, optimizer.wrt))`.
  """
  assignment = partition(model, groups)
  trained = {g.name: g for g in assignment.values() if g.trainable}
  if not trained:
    raise ValueError(
      "no trainable parameters: every group is frozen (an evaluation-only model needs no optimizer)"
    )
  if optimizer not in ("sgd", "adamw"):
    raise ValueError(f"unknown optimizer {optimizer!r}: expected 'sgd' or 'adamw'")

  transforms = {}
  for name, group in trained.items():
    mult = _multiplier(schedule, name)
    lr_fn = (lambda lr, m: lambda step: lr * m(step))(group.lr, mult)
    if optimizer == "sgd":
      parts = []
      if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
      if momentum:
        parts.append(optax.trace(decay=momentum, nesterov=nesterov))
      parts.append(optax.scale_by_learning_rate(lr_fn))
      transforms[name] = optax.chain(*parts)
    else:
      transforms[name] = optax.adamw(lr_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)

  def labels(params):
    return jax.tree_util.tree_map_with_path(lambda p, _: assignment[path_name(p)].name, params)

  tx = optax.multi_transform(transforms, labels)
  if clip_grad_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(clip_grad_norm), tx)
  wrt = TrainableFilter(frozenset(n for n, g in assignment.items() if g.trainable))
  return nnx.Optimizer(model, tx, wrt=wrt)


def group_learning_rates(
  groups: Sequence[Mapping[str, Any] | ParamGroup],
  step: int,
  schedule: Schedule | Mapping[str, Schedule] | None = None,
) -> dict[str, float]:
  """The learning rate of each trainable group at `step` (for logging)."""
  out = {}
  for g in map(ParamGroup.from_config, groups):
    if g.trainable:
      out[g.name] = float(g.lr * np.asarray(_multiplier(schedule, g.name)(step)))
  return out


def momentum_buffers(optimizer: nnx.Optimizer) -> dict[str, np.ndarray]:
  """SGD momentum buffers by dotted parameter path (empty for AdamW or momentum 0)."""
  out: dict[str, np.ndarray] = {}
  state = nnx.as_pure(optimizer.opt_state)
  for node in jax.tree_util.tree_leaves(state, is_leaf=lambda n: isinstance(n, optax.TraceState)):
    if isinstance(node, optax.TraceState):
      # Other groups' parameters appear as empty MaskedNodes, which have no leaves.
      for path, leaf in jax.tree_util.tree_flatten_with_path(node.trace)[0]:
        out[path_name(path)] = np.asarray(leaf)
  return out
