"""The functions that share a name with optax take optax's calls.

A call written for ``optax.lamb``, ``optax.lars``, ``optax.scale_by_adam`` or
``optax.scale_by_trust_ratio``, positional or keyword, either means the same
thing in lamb_optax or raises a TypeError naming the argument. Every
parameter of optax's is pinned here: at optax's position with optax's name,
unless :data:`RENAMED` says otherwise, and with optax's default, unless
:data:`DEFAULTS_DIFFER` says why not (the docstrings say it too). What
lamb_optax adds is keyword-only.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lamb_optax

PAIRS = {
    "lamb": (lamb_optax.lamb, optax.lamb),
    "lars": (lamb_optax.lars, optax.lars),
    "scale_by_adam": (lamb_optax.scale_by_adam, optax.scale_by_adam),
    "scale_by_trust_ratio": (lamb_optax.scale_by_trust_ratio,
                             optax.scale_by_trust_ratio),
}
# (function, optax's name) -> ours: the vocabulary of every lamb_optax
# optimizer names the decay mask weight_decay_mask; optax's keyword is
# accepted too (ACCEPTED_KEYWORDS).
RENAMED = {("lamb", "mask"): "weight_decay_mask"}
# (function, optax's keyword) -> ours: keyword-only aliases of a renamed one.
ACCEPTED_KEYWORDS = {("lamb", "mask"): "weight_decay_mask"}
# (function, parameter) -> (optax's default, ours, why).
DEFAULTS_DIFFER = {
    ("lars", "weight_decay_mask"): (True, None, "None and True: every leaf"),
    ("lars", "trust_ratio_mask"): (True, None, "None and True: every leaf"),
    ("lars", "trust_coefficient"): (0.001, 1.0, "the paper's coefficient"),
    ("scale_by_adam", "nesterov"): (False, None, "None and False: plain Adam"),
}
# optax parameters lamb_optax refuses: (function, parameter) -> why.
REFUSED = {}
POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY,
              inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _positional(fn):
  return [p for p in inspect.signature(fn).parameters.values()
          if p.kind in POSITIONAL]


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_positional_parameters_are_optaxs(name):
  ours, theirs = PAIRS[name]
  their_positional = _positional(theirs)
  our_positional = _positional(ours)
  # No more positional parameters than optax: a longer positional call
  # raises instead of landing on a parameter of ours.
  kept = [p for p in their_positional if (name, p.name) not in REFUSED]
  assert len(our_positional) == len(kept), [p.name for p in our_positional]
  for mine, theirs_p in zip(our_positional, kept):
    assert mine.name == RENAMED.get((name, theirs_p.name), theirs_p.name)
    differ = DEFAULTS_DIFFER.get((name, theirs_p.name))
    if differ is None:
      assert mine.default == theirs_p.default, (name, mine.name)
    else:
      assert (theirs_p.default, mine.default) == differ[:2], (name, mine.name)
  # Refused parameters are the last ones: the kept ones keep optax's places.
  assert their_positional[:len(kept)] == kept


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_keyword_only_parameters_of_optax_keep_their_names(name):
  ours, theirs = PAIRS[name]
  mine = inspect.signature(ours).parameters
  for p in inspect.signature(theirs).parameters.values():
    if p.kind == inspect.Parameter.KEYWORD_ONLY:
      assert mine[p.name].kind == inspect.Parameter.KEYWORD_ONLY
      differ = DEFAULTS_DIFFER.get((name, p.name))
      assert (mine[p.name].default == p.default if differ is None
              else (p.default, mine[p.name].default) == differ[:2])


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_learning_rate_annotation_is_optaxs(name):
  """optax's tests (and tools) look for ScalarOrSchedule to pass schedules."""
  ours, theirs = PAIRS[name]
  for fn in (ours, theirs):
    params = inspect.signature(fn).parameters
    if "learning_rate" in params:
      assert params["learning_rate"].annotation is optax.ScalarOrSchedule


def test_more_positional_arguments_than_optax_raise():
  with pytest.raises(TypeError, match="positional"):
    lamb_optax.lars(0.1, 0.0, True, 1e-3, 0.0, True, 0.9, False, None)
  with pytest.raises(TypeError, match="positional"):
    lamb_optax.lamb(0.1, 0.9, 0.999, 1e-6, 0.0, 0.0, None, None)


def test_lars_nesterov_is_optaxs_eighth_positional_argument():
  _same(_steps(lamb_optax.lars(0.1, 1e-2, True, 1.0, 0.0, True, 0.8, True)),
        _steps(lamb_optax.lars(0.1, weight_decay=1e-2, momentum=0.8,
                               nesterov=True)), rtol=0)
  with pytest.raises(TypeError, match="`nesterov`"):
    lamb_optax.lars(0.1, nesterov="yes")


@pytest.mark.parametrize("name, optax_name", sorted(
    (fn, theirs) for (fn, theirs) in ACCEPTED_KEYWORDS))
def test_renamed_parameters_accept_optaxs_keyword(name, optax_name):
  ours = inspect.signature(PAIRS[name][0]).parameters
  assert ours[optax_name].kind == inspect.Parameter.KEYWORD_ONLY
  assert ours[optax_name].default is None


@pytest.mark.parametrize("mask", [{"w": True, "b": False},
                                  lambda p: {"w": True, "b": False}],
                         ids=["tree", "callable"])
def test_lamb_mask_keyword_is_weight_decay_mask(mask):
  kw = dict(weight_decay=0.1)
  by_optax_name = _steps(lamb_optax.lamb(1e-2, mask=mask, **kw))
  _same(by_optax_name,
        _steps(lamb_optax.lamb(1e-2, weight_decay_mask=mask, **kw)), rtol=0)
  _same(by_optax_name, _steps(optax.lamb(1e-2, mask=mask, **kw)))
  # The mask matters here: without it the bias is decayed too.
  unmasked = _steps(lamb_optax.lamb(1e-2, **kw))
  assert not np.allclose(by_optax_name[-1]["b"], unmasked[-1]["b"])
  np.testing.assert_array_equal(by_optax_name[-1]["w"], unmasked[-1]["w"])


def test_lamb_mask_and_weight_decay_mask_together_are_refused():
  mask = {"w": True, "b": False}
  with pytest.raises(ValueError, match=r"`mask`.*`weight_decay_mask`"):
    lamb_optax.lamb(1e-2, mask=mask, weight_decay_mask=mask)
  with pytest.raises(ValueError, match=r"`mask`.*`weight_decay_mask`"):
    lamb_optax.lamb(1e-2, 0.9, 0.999, 1e-6, 0.0, 0.1, mask, mask=mask)


def _params():
  return {"w": jnp.array([[0.5, -1.0], [2.0, 0.25]]),
          "b": jnp.array([0.1, -0.3])}


def _grads():
  return {"w": jnp.array([[0.3, 0.2], [-0.1, 0.4]]),
          "b": jnp.array([0.05, -0.2])}


def _steps(tx, n=3):
  params, state, out = _params(), tx.init(_params()), []
  for _ in range(n):
    updates, state = tx.update(_grads(), state, params)
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return out


def _same(a, b, rtol=2e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=1e-8)


def test_positional_calls_mean_what_they_mean_in_optax():
  mask = {"w": True, "b": False}
  # lamb: learning_rate, b1, b2, eps, eps_root, weight_decay, mask.
  args = (1e-2, 0.8, 0.99, 1e-5, 1e-9, 0.1, mask)
  _same(_steps(lamb_optax.lamb(*args)), _steps(optax.lamb(*args)))
  _same(_steps(lamb_optax.lamb(*args)), _steps(lamb_optax.lamb(
      learning_rate=1e-2, b1=0.8, b2=0.99, eps=1e-5, eps_root=1e-9,
      weight_decay=0.1, weight_decay_mask=mask)), rtol=0)
  # lars: the second argument is the weight decay, as in optax.
  _same(_steps(lamb_optax.lars(0.1, 1e-2, mask, 0.5, 1e-3, mask, 0.8)),
        _steps(lamb_optax.lars(0.1, weight_decay=1e-2, weight_decay_mask=mask,
                               trust_coefficient=0.5, eps=1e-3,
                               trust_ratio_mask=mask, momentum=0.8)), rtol=0)
  # scale_by_adam: mu_dtype is the fifth.
  tx = lamb_optax.scale_by_adam(0.8, 0.99, 1e-8, 0.0, jnp.bfloat16)
  assert tx.init(_params()).mu["w"].dtype == jnp.bfloat16
  _same(_steps(lamb_optax.scale_by_adam(0.8, 0.99, 1e-7, 1e-9)),
        _steps(optax.scale_by_adam(0.8, 0.99, 1e-7, 1e-9)))
  # scale_by_trust_ratio: min_norm, trust_coefficient, eps.
  _same(_steps(lamb_optax.scale_by_trust_ratio(0.5, 0.3, 1e-3)),
        _steps(optax.scale_by_trust_ratio(0.5, 0.3, 1e-3)))


def _default(fn):
  takes_lr = "learning_rate" in inspect.signature(fn).parameters
  return fn(0.1) if takes_lr else fn()


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_building_blocks_and_aliases_return_what_optax_returns(name):
  mine, optaxs = (_default(fn) for fn in PAIRS[name])
  assert isinstance(mine, type(optaxs))
  if isinstance(optaxs, optax.GradientTransformationExtraArgs):
    updates, _ = mine.update(_grads(), mine.init(_params()), _params(),
                             loss=jnp.float32(1.0))
    assert jax.tree.structure(updates) == jax.tree.structure(_params())
