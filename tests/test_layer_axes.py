"""``layer_axes``: one trust ratio per slice of a stacked leaf.

The float64 statement is reference.py applied to the *unstacked* tree: every
slice of a stacked leaf (the entries of its layer axes, in C order) becomes a
layer of its own, and the package's trajectory, unstacked the same way, is
compared with it step by step (``assert_trajectory_close``, whose tolerances
are per layer, hence here per slice). The fixture tree stacks slices whose
scales differ by six orders of magnitude, with a zero-initialised slice, so a
norm over the whole stack differs from the per-slice norms; each case checks
on the reference that its bounds bind on some slices of a leaf and not on
others, and that ``layer_axes=None`` would fail the comparison.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import lamb_optax
from lamb_optax import masks
import reference
from helpers import (assert_trajectory_close, flat_mask, jaxpr_equations,
                     run_optimizer)

NUM_STEPS = 10
LR = 0.05
# Per-slice parameter norms of the fixture span 1e-3 .. 4e3 (checked below).
PARAM_NORM_BOUNDS = (0.5, 8.0)
TRUST_RATIO_BOUNDS = (0.05, 2.0)

# Leaf -> (shape, layer axes, per-slice parameter scales, per-slice gradient
# scales); scales are given in the shape of the layer axes. A 0 scale makes a
# zero-initialised slice.
STACKED = {
    "stack/kernel": ((4, 3, 5), 0, [1e-3, 1.0, 1e3, 0.0], [1e-2, 1.0, 1e2, 0.1]),
    "quad/kernel": ((2, 3, 3, 2), (0, 2),
                    [[1e-3, 1e-2, 1e-1], [1.0, 1e1, 1e3]],
                    [[1.0, 1e2, 1e-2], [1e-1, 1e1, 1.0]]),
    "neg/w": ((3, 4, 5), -1, [1e-2, 0.3, 1.0, 30.0, 1e3],
              [1.0, 1.0, 1e-2, 1e2, 1.0]),
}
PLAIN = {
    "dense/bias": ((5,), 0.1, 1e-2),
    "dense/kernel": ((6, 5), 1.0, 1e3),
    "norm/scale": ((), 1.3, 10.0),
}
ZERO_SLICE = ("stack/kernel", 3)


def _nest(flat):
  tree = {}
  for path, value in flat.items():
    module, name = path.split("/")
    tree.setdefault(module, {})[name] = value
  return tree


def _normalised(axes, ndim):
  if axes is None:
    return ()
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(sorted(a % ndim for a in axes))


def _slice_scale(shape, axes, scales):
  """``scales`` (shaped like the layer axes) broadcast against ``shape``."""
  axes = _normalised(axes, len(shape))
  scales = np.asarray(scales, np.float64)
  return np.expand_dims(scales, [i for i in range(len(shape)) if i not in axes])


def stacked_params():
  rng = np.random.default_rng(0)
  flat = {}
  for path, (shape, axes, scales, _) in STACKED.items():
    flat[path] = (_slice_scale(shape, axes, scales)
                  * rng.standard_normal(shape)).astype(np.float32)
  for path, (shape, scale, _) in PLAIN.items():
    value = np.full(shape, scale) if shape == () else (
        scale * rng.standard_normal(shape))
    flat[path] = np.asarray(value, np.float32)
  return _nest(flat)


def stacked_grads(num_steps=NUM_STEPS):
  rng = np.random.default_rng(1)
  shapes = {p: v[0] for p, v in {**STACKED, **PLAIN}.items()}
  offsets = {p: rng.standard_normal(s) for p, s in shapes.items()}
  seq = []
  for _ in range(num_steps):
    flat = {}
    for path, shape in shapes.items():
      if path in STACKED:
        _, axes, _, gscales = STACKED[path]
        scale = _slice_scale(shape, axes, gscales)
      else:
        scale = PLAIN[path][2]
      flat[path] = np.asarray(
          scale * (offsets[path] + rng.standard_normal(shape)), np.float32)
    seq.append(_nest(flat))
  return seq


# The layer axes of the fixture, as a full per-leaf tree with None leaves.
LAYER_AXES = _nest({"dense/bias": None, "dense/kernel": None, "norm/scale": None,
                    **{p: v[1] for p, v in STACKED.items()}})
# The same as a prefix tree (one None for all of `dense`, one spec per module).
LAYER_AXES_PREFIX = {"dense": None, "neg": -1, "norm": None,
                     "quad": (0, -2), "stack": {"kernel": 0}}


def layer_axes_fn(params):
  """The same as a callable: stacked leaves are those with a known path."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: STACKED.get("/".join(k.key for k in path),
                                  (None, None))[1], params)


@pytest.fixture(scope="module")
def params():
  return stacked_params()


@pytest.fixture(scope="module")
def grads_seq():
  return stacked_grads()


def per_leaf_axes(layer_axes, params):
  """Normalised layer axes per leaf (independently of the package)."""
  tree = layer_axes(params) if callable(layer_axes) else layer_axes
  is_spec = lambda x: x is None or isinstance(x, (int, tuple))
  full = jax.tree.map(lambda a, sub: jax.tree.map(lambda _: [a], sub), tree,
                      params, is_leaf=is_spec)
  leaves = jax.tree.leaves(params)
  specs = jax.tree.leaves(full, is_leaf=lambda x: isinstance(x, list))
  return [_normalised(s[0], np.ndim(x)) for s, x in zip(specs, leaves)]


def unstack(tree, axes_per_leaf):
  """Every slice of every leaf as a float64 layer, in leaf then C order."""
  out = []
  for x, axes in zip(jax.tree.leaves(tree), axes_per_leaf):
    x = np.asarray(x, np.float64)
    if not axes:
      out.append(x)
      continue
    x = np.moveaxis(x, axes, range(len(axes)))
    x = x.reshape((-1,) + x.shape[len(axes):])
    out.extend(list(x))
  return out


def slice_mask(leaf_mask, params, axes_per_leaf):
  """A per-leaf mask repeated over each leaf's slices."""
  out = []
  for m, x, axes in zip(leaf_mask, jax.tree.leaves(params), axes_per_leaf):
    out.extend([m] * int(np.prod([np.shape(x)[i] for i in axes])))
  return out


def unstacked_ratios(ratios_tree):
  return [np.float64(r) for leaf in jax.tree.leaves(ratios_tree)
          for r in np.asarray(leaf).ravel()]


def slice_index(params, axes_per_leaf, path, index):
  """Position of slice ``index`` of leaf ``path`` in the unstacked list."""
  paths = ["/".join(k.key for k in p)
           for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  start = 0
  for p, x, axes in zip(paths, jax.tree.leaves(params), axes_per_leaf):
    if p == path:
      return start + index
    start += int(np.prod([np.shape(x)[i] for i in axes]))
  raise KeyError(path)


def run_reference(algorithm, params, grads_seq, axes_per_leaf, kwargs):
  kwargs = dict(kwargs)
  for key in ("weight_decay_mask", "trust_ratio_mask"):
    if key in kwargs:
      kwargs[key] = slice_mask(flat_mask(kwargs[key], params), params,
                               axes_per_leaf)
  return algorithm(unstack(params, axes_per_leaf),
                   [unstack(g, axes_per_leaf) for g in grads_seq], **kwargs)


def compare(got_params, got_ratios, ref_steps, axes_per_leaf):
  assert_trajectory_close(
      [unstack(p, axes_per_leaf) for p in got_params],
      [unstacked_ratios(r) for r in got_ratios], ref_steps)


TRUST_MASK = {"dense": True, "neg": False, "norm": False, "quad": True,
              "stack": True}

# name -> (package kwargs == reference kwargs, what the reference must show)
LAMB_CASES = {
    "plain": ({}, None),
    "weight_decay_and_masks": (
        {"weight_decay": 0.1, "weight_decay_mask": masks.exclude_paths("bias"),
         "trust_ratio_mask": TRUST_MASK}, None),
    "param_norm_bounds": ({"param_norm_bounds": PARAM_NORM_BOUNDS},
                          "param_norm_bounds"),
    "trust_ratio_bounds": ({"trust_ratio_bounds": TRUST_RATIO_BOUNDS,
                            "weight_decay": 0.01}, "trust_ratio_bounds"),
}
LAYER_AXES_FORMS = {"tree": LAYER_AXES, "prefix": LAYER_AXES_PREFIX,
                    "callable": layer_axes_fn}


def check_bounds_bind_per_slice(what, ref_steps, params, axes_per_leaf):
  """Within one stacked leaf, the bounds bind on some slices and not on
  others, at the same step (so per-leaf bounds could not pass)."""
  if what is None:
    return
  lo, hi = PARAM_NORM_BOUNDS if what == "param_norm_bounds" else (
      TRUST_RATIO_BOUNDS)
  for path in STACKED:
    first = slice_index(params, axes_per_leaf, path, 0)
    shape, axes = STACKED[path][:2]
    n = int(np.prod([shape[i] for i in _normalised(axes, len(shape))]))
    for step in ref_steps[:1] + ref_steps[-1:]:
      values = np.array(step.param_norms if what == "param_norm_bounds"
                        else step.raw_ratios)[first:first + n]
      assert np.any(values < lo) and np.any(values > hi), (path, values)
      assert np.any((values > lo) & (values < hi)), (path, values)


# Every case in both modes with the full tree; the other forms on one case.
LAMB_RUNS = ([(mode, case, "tree") for mode in ("chain", "store_direction")
              for case in LAMB_CASES]
             + [("chain", "weight_decay_and_masks", "prefix"),
                ("store_direction", "trust_ratio_bounds", "callable")])


@pytest.mark.parametrize("mode,case,form", LAMB_RUNS,
                         ids=["-".join(r) for r in LAMB_RUNS])
def test_lamb_matches_per_slice_reference(mode, case, form, params,
                                          grads_seq):
  kwargs, what = LAMB_CASES[case]
  layer_axes = LAYER_AXES_FORMS[form]
  opt = lamb_optax.lamb(LR, layer_axes=layer_axes,
                        store_direction=mode != "chain", **kwargs)
  got_params, got_ratios, _ = run_optimizer(opt, params, grads_seq)
  axes_per_leaf = per_leaf_axes(LAYER_AXES, params)
  assert axes_per_leaf == per_leaf_axes(layer_axes, params)
  ref_steps = run_reference(reference.lamb, params, grads_seq, axes_per_leaf,
                            dict(kwargs, learning_rate=LR))
  check_bounds_bind_per_slice(what, ref_steps, params, axes_per_leaf)
  compare(got_params, got_ratios, ref_steps, axes_per_leaf)


LARS_KWARGS = {"momentum": 0.8, "weight_decay": 0.01, "trust_coefficient": 0.5,
               "eps": 1e-4, "weight_decay_mask": masks.exclude_paths("bias"),
               "trust_ratio_mask": TRUST_MASK,
               "trust_ratio_bounds": (0.01, 5.0)}


def test_lars_matches_per_slice_reference(params, grads_seq):
  opt = lamb_optax.lars(LR, layer_axes=LAYER_AXES, **LARS_KWARGS)
  got_params, got_ratios, _ = run_optimizer(opt, params, grads_seq)
  axes_per_leaf = per_leaf_axes(LAYER_AXES, params)
  ref_steps = run_reference(reference.lars, params, grads_seq, axes_per_leaf,
                            dict(LARS_KWARGS, learning_rate=LR))
  compare(got_params, got_ratios, ref_steps, axes_per_leaf)


def test_lars_param_norm_bounds_per_slice(params, grads_seq):
  kwargs = {"param_norm_bounds": PARAM_NORM_BOUNDS}
  got_params, got_ratios, _ = run_optimizer(
      lamb_optax.lars(LR, layer_axes=layer_axes_fn, **kwargs), params,
      grads_seq)
  axes_per_leaf = per_leaf_axes(LAYER_AXES, params)
  ref_steps = run_reference(reference.lars, params, grads_seq, axes_per_leaf,
                            dict(kwargs, learning_rate=LR))
  check_bounds_bind_per_slice("param_norm_bounds", ref_steps, params,
                              axes_per_leaf)
  compare(got_params, got_ratios, ref_steps, axes_per_leaf)


@pytest.mark.parametrize("opt_name", ["lamb", "store_direction", "lars"])
def test_without_layer_axes_fails_the_per_slice_reference(opt_name, params,
                                                          grads_seq):
  """The comparison can fail: one ratio per stacked leaf is far off."""
  make = {"lamb": lamb_optax.lamb, "lars": lamb_optax.lars,
          "store_direction": lambda lr: lamb_optax.lamb(lr, store_direction=True)}[opt_name]
  got_params, got_ratios, _ = run_optimizer(make(LR), params, grads_seq)
  axes_per_leaf = per_leaf_axes(LAYER_AXES, params)
  algorithm = reference.lars if opt_name == "lars" else reference.lamb
  ref_steps = run_reference(algorithm, params, grads_seq, axes_per_leaf,
                            {"learning_rate": LR})
  # Broadcast the per-leaf ratios to the slices, so only values can differ.
  broadcast = [jax.tree.map(
      lambda r, x, a: np.broadcast_to(np.asarray(r), [x.shape[i] for i in a]),
      ratios, params, jax.tree.unflatten(jax.tree.structure(params),
                                         [list(a) for a in axes_per_leaf]),
      is_leaf=lambda x: isinstance(x, list)) for ratios in got_ratios]
  with pytest.raises(AssertionError):
    compare(got_params, broadcast, ref_steps, axes_per_leaf)
  # And the parameters alone are off by far more than the tolerance.
  last = unstack(got_params[-1], axes_per_leaf)
  rel = max(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)
            for a, b in zip(last, ref_steps[-1].params))
  assert rel > 1e-2


def test_zero_slice_gets_ratio_one_only_there(params, grads_seq):
  """r = 1 on the zero-initialised slice (|x| = 0) and nowhere else."""
  opt = lamb_optax.lamb(LR, layer_axes=LAYER_AXES)
  got_params, got_ratios, _ = run_optimizer(opt, params, grads_seq[:2])
  path, index = ZERO_SLICE
  module, name = path.split("/")
  ratios = np.asarray(got_ratios[0][module][name])
  assert np.asarray(params[module][name])[index].max() == 0.0
  assert ratios[index] == 1.0
  assert np.all(np.delete(ratios, index) != 1.0)
  # The slice moved at step 1 and gets a proper ratio from step 2 on.
  assert np.all(np.asarray(got_params[0][module][name])[index] != 0.0)
  assert np.asarray(got_ratios[1][module][name])[index] != 1.0


def test_stack_wide_norm_differs_on_the_fixture(params, grads_seq):
  """On the reference: one layer per stacked leaf (its whole norm) gives
  another trajectory than one layer per slice (the fixture is not trivial)."""
  axes_per_leaf = per_leaf_axes(LAYER_AXES, params)
  whole = reference.lamb([np.asarray(x, np.float64)
                          for x in jax.tree.leaves(params)],
                         [[np.asarray(g, np.float64)
                           for g in jax.tree.leaves(gs)] for gs in grads_seq],
                         learning_rate=LR)
  sliced = run_reference(reference.lamb, params, grads_seq, axes_per_leaf,
                         {"learning_rate": LR})
  restacked = []
  for step in whole:
    restacked.append(unstack(jax.tree.unflatten(jax.tree.structure(params),
                                                step.params), axes_per_leaf))
  for a, b in zip(restacked[-1], sliced[-1].params):
    assert a.shape == b.shape
  diffs = [np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)
           for a, b in zip(restacked[-1], sliced[-1].params)]
  assert max(diffs) > 0.1


# ---------------------------------------------------------------------------
# scale_by_trust_ratio alone, against a direct per-slice float64 formula.


@pytest.mark.parametrize("layer_axes", [LAYER_AXES, LAYER_AXES_PREFIX,
                                        layer_axes_fn],
                         ids=["tree", "prefix", "callable"])
def test_scale_by_trust_ratio_per_slice(layer_axes, params, grads_seq):
  kwargs = {"trust_coefficient": 0.7, "eps": 1e-3,
            "param_norm_bounds": (1e-2, 50.0),
            "trust_ratio_bounds": (1e-2, 5.0)}
  mask = {"dense": True, "neg": False, "norm": True, "quad": True,
          "stack": True}
  tx = lamb_optax.scale_by_trust_ratio(trust_ratio_mask=mask, layer_axes=layer_axes,
                                       **kwargs)
  axes_per_leaf = per_leaf_axes(LAYER_AXES, params)
  xs = unstack(params, axes_per_leaf)
  adapt = slice_mask(flat_mask(mask, params), params, axes_per_leaf)
  state = tx.init(jax.tree.map(jnp.asarray, params))
  for r in jax.tree.leaves(lamb_optax.trust_ratios(state)):
    assert r.dtype == jnp.float32 and np.all(np.asarray(r) == 1.0)
  bound_lo = bound_hi = 0
  for grads in grads_seq[:3]:
    scaled, state = tx.update(jax.tree.map(jnp.asarray, grads), state,
                              jax.tree.map(jnp.asarray, params))
    us = unstack(grads, axes_per_leaf)
    got_u = unstack(scaled, axes_per_leaf)
    got_r = unstacked_ratios(lamb_optax.trust_ratios(state))
    for x, u, gu, gr, m in zip(xs, us, got_u, got_r, adapt):
      if m:
        r, raw = reference.trust_ratio(reference.norm(x), reference.norm(u),
                                       **kwargs)
        bound_lo += raw < kwargs["trust_ratio_bounds"][0]
        bound_hi += raw > kwargs["trust_ratio_bounds"][1]
      else:
        r = 1.0
      assert abs(gr - r) <= 1e-6 * r, (gr, r)
      np.testing.assert_allclose(gu, r * u, rtol=2e-6, atol=0)
  assert bound_lo and bound_hi


# ---------------------------------------------------------------------------
# Forms that apply to every leaf: an int, a tuple, a negative int.


def _stacked_tree(shape):
  rng = np.random.default_rng(3)
  scales = np.geomspace(1e-3, 1e3, shape[0]).reshape((-1,) + (1,) * (
      len(shape) - 1))
  return {"a": jnp.asarray(scales * rng.standard_normal(shape), jnp.float32),
          "b": jnp.asarray(rng.standard_normal(shape) * scales[::-1],
                           jnp.float32)}


@pytest.mark.parametrize("layer_axes,shape", [
    (0, (4, 3, 2)), (-3, (4, 3, 2)), ((0, 2), (3, 2, 2, 3)),
    ((-4, -2), (3, 2, 2, 3)), ([2, 0], (3, 2, 2, 3))],
                         ids=["int", "negative_int", "tuple", "negative_tuple",
                              "list_unsorted"])
def test_one_spec_for_every_leaf(layer_axes, shape):
  params = _stacked_tree(shape)
  rng = np.random.default_rng(4)
  grads_seq = [jax.tree.map(lambda x: np.asarray(
      rng.standard_normal(x.shape), np.float32), params) for _ in range(4)]
  opt = lamb_optax.lamb(LR, weight_decay=0.05, layer_axes=layer_axes)
  got_params, got_ratios, states = run_optimizer(opt, params, grads_seq)
  axes = _normalised(layer_axes, len(shape))
  layer_shape = tuple(shape[i] for i in axes)
  for r in jax.tree.leaves(got_ratios[0]):
    assert r.shape == layer_shape and r.dtype == jnp.float32
  axes_per_leaf = [axes, axes]
  ref_steps = run_reference(reference.lamb, params, grads_seq, axes_per_leaf,
                            {"learning_rate": LR, "weight_decay": 0.05})
  compare(got_params, got_ratios, ref_steps, axes_per_leaf)


# ---------------------------------------------------------------------------
# State.


@pytest.mark.parametrize("opt_name", ["lamb", "store_direction", "lars", "trust_ratio"])
def test_state_ratio_shapes_and_init(opt_name, params, grads_seq):
  make = {
      "lamb": lambda **kw: lamb_optax.lamb(LR, **kw),
      "store_direction": lambda **kw: lamb_optax.lamb(LR, store_direction=True, **kw),
      "lars": lambda **kw: lamb_optax.lars(LR, **kw),
      "trust_ratio": lamb_optax.scale_by_trust_ratio,
  }[opt_name]
  opt = make(layer_axes=LAYER_AXES_PREFIX, trust_ratio_mask=TRUST_MASK)
  p = jax.tree.map(jnp.asarray, params)
  state = opt.init(p)
  want_shapes = {"dense": {"bias": (), "kernel": ()}, "neg": {"w": (5,)},
                 "norm": {"scale": ()}, "quad": {"kernel": (2, 3)},
                 "stack": {"kernel": (4,)}}
  ratios = lamb_optax.trust_ratios(state)
  assert jax.tree.map(lambda r: r.shape, ratios) == want_shapes
  for r in jax.tree.leaves(ratios):
    assert r.dtype == jnp.float32 and np.all(np.asarray(r) == 1.0)
  structure = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  for grads in grads_seq[:2]:
    _, state = opt.update(jax.tree.map(jnp.asarray, grads), state, p)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == structure
  ratios = lamb_optax.trust_ratios(state)
  # The masked-out stacked leaf keeps r = 1 on every slice; others moved.
  assert np.all(np.asarray(ratios["neg"]["w"]) == 1.0)
  assert np.all(np.asarray(ratios["quad"]["kernel"]) != 1.0)


# ---------------------------------------------------------------------------
# Errors.

BAD_LAYER_AXES = {
    "out_of_range": ({"dense": None, "neg": 3, "norm": None, "quad": 0,
                      "stack": 0}, ValueError),
    "out_of_range_negative": ({"dense": None, "neg": -4, "norm": None,
                               "quad": 0, "stack": 0}, ValueError),
    "out_of_range_on_scalar": (0, ValueError),
    "repeated": ({"dense": None, "neg": (0, 0), "norm": None, "quad": 0,
                  "stack": 0}, ValueError),
    "repeated_after_normalising": ({"dense": None, "neg": 0, "norm": None,
                                    "quad": (1, -3), "stack": 0}, ValueError),
    "missing_key": ({"dense": None, "neg": 0, "quad": 0, "stack": 0},
                    ValueError),
    "extra_key": ({"dense": None, "neg": 0, "norm": None, "quad": 0,
                   "stack": 0, "head": 0}, ValueError),
    "deeper_than_params": ({"dense": None, "neg": {"w": {"x": 0}},
                            "norm": None, "quad": 0, "stack": 0}, ValueError),
    "float_leaf": ({"dense": None, "neg": 0.5, "norm": None, "quad": 0,
                    "stack": 0}, TypeError),
    "str_leaf": ({"dense": None, "neg": "0", "norm": None, "quad": 0,
                  "stack": 0}, TypeError),
    "bool_leaf": ({"dense": None, "neg": True, "norm": None, "quad": 0,
                   "stack": 0}, TypeError),
    "callable_returning_bad_tree": (lambda p: {"neg": 0}, ValueError),
}


@pytest.mark.parametrize("case", list(BAD_LAYER_AXES))
@pytest.mark.parametrize("opt_name", ["lamb", "store_direction", "lars", "trust_ratio"])
def test_bad_layer_axes_raise(opt_name, case, params, grads_seq):
  bad, error = BAD_LAYER_AXES[case]
  make = {
      "lamb": lambda **kw: lamb_optax.lamb(LR, **kw),
      "store_direction": lambda **kw: lamb_optax.lamb(LR, store_direction=True, **kw),
      "lars": lambda **kw: lamb_optax.lars(LR, **kw),
      "trust_ratio": lamb_optax.scale_by_trust_ratio,
  }[opt_name]
  opt = make(layer_axes=bad)
  p = jax.tree.map(jnp.asarray, params)
  with pytest.raises(error, match="layer_axes"):
    opt.init(p)
  # The same check guards update (a state built for other params).
  good_state = make(layer_axes=LAYER_AXES).init(p)
  with pytest.raises(error, match="layer_axes"):
    opt.update(jax.tree.map(jnp.asarray, grads_seq[0]), good_state, p)


# ---------------------------------------------------------------------------
# No Python loop over layers: the traced update does not grow with L.


def _update_size(opt, params):
  state = opt.init(params)
  jaxpr = jax.make_jaxpr(opt.update)(params, state, params)
  return sum(1 for _ in jaxpr_equations(jaxpr.jaxpr))


@pytest.mark.parametrize("opt_name", ["lamb", "store_direction", "lars"])
def test_traced_update_does_not_grow_with_number_of_layers(opt_name):
  kwargs = {"param_norm_bounds": (0.1, 10.0),
            "trust_ratio_bounds": (0.0, 5.0), "weight_decay": 0.01}
  make = {"lamb": lambda **kw: lamb_optax.lamb(LR, **kw),
          "store_direction": lambda **kw: lamb_optax.lamb(LR, store_direction=True, **kw),
          "lars": lambda **kw: lamb_optax.lars(LR, **kw)}[opt_name]

  def stacked(num_layers):
    return {"kernel": jnp.ones((num_layers, 4, 4)),
            "bias": jnp.ones((num_layers, 4))}

  sizes = [_update_size(make(layer_axes=0, **kwargs), stacked(n))
           for n in (2, 16)]
  assert sizes[0] == sizes[1], sizes
  # The count does see per-layer work: the same layers as separate leaves.
  unrolled = [_update_size(make(**kwargs), [stacked(1)] * n) for n in (2, 16)]
  assert unrolled[1] > unrolled[0]


# ---------------------------------------------------------------------------
# layer_axes_from_metadata.


def test_from_partition_specs():
  specs = {
      "blocks": {"kernel": P("layers", None, "model"), "bias": P("layers"),
                 "norm": P()},
      "pipeline": {"kernel": P("stage", "layers", "embed", None)},
      "multi_name": {"kernel": P(None, ("layers", "data"))},
      "head": {"kernel": P(None, "model"), "bias": None},
      "logical": {"kernel": ("layers", "embed", "mlp")},
  }
  got = lamb_optax.layer_axes_from_metadata(specs)
  assert got == {
      "blocks": {"kernel": (0,), "bias": (0,), "norm": None},
      "pipeline": {"kernel": (1,)},
      "multi_name": {"kernel": (1,)},
      "head": {"kernel": None, "bias": None},
      "logical": {"kernel": (0,)},
  }
  two_names = lamb_optax.layer_axes_from_metadata(specs,
                                                  layer_names=("stage", "layers"))
  assert two_names["pipeline"]["kernel"] == (0, 1)
  assert two_names["blocks"]["kernel"] == (0,)
  with pytest.raises(TypeError, match="layer_names"):
    lamb_optax.layer_axes_from_metadata(specs, layer_names=0)


def first_step_ratios(x, g, layer_axes, eps, wd):
  """First LAMB step: r = |x| / |g / (|g| + eps) + wd x| per slice, float64."""
  x = np.asarray(x, np.float64)
  g = np.asarray(g, np.float64)
  u = g / (np.abs(g) + eps) + wd * x
  reduce = tuple(i for i in range(x.ndim) if i not in layer_axes)
  return (np.sqrt(np.sum(x * x, axis=reduce))
          / np.sqrt(np.sum(u * u, axis=reduce)))


NUM_LAYERS = 3


def _linen_scanned_params():
  import flax.linen as nn

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      h = nn.Dense(8, kernel_init=nn.with_partitioning(
          nn.initializers.lecun_normal(), ("embed", "mlp")))(x)
      return x + nn.LayerNorm()(h), None

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      stack = nn.scan(Block, variable_axes={"params": 0},
                      split_rngs={"params": True}, length=NUM_LAYERS,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(name="blocks")(x, None)
      return nn.Dense(1)(x)

  model = Model()
  variables = jax.jit(model.init)(jax.random.key(0), jnp.ones((2, 8)))
  return model, variables


def test_from_linen_scan_boxed_params():
  import flax.linen as nn
  model, variables = _linen_scanned_params()
  boxed = variables["params"]
  kernel = boxed["blocks"]["Dense_0"]["kernel"]
  assert isinstance(kernel, nn.Partitioned)
  assert kernel.names == ("layers", "embed", "mlp")
  layer_axes = lamb_optax.layer_axes_from_metadata(boxed)
  assert layer_axes == {
      "Dense_0": {"bias": None, "kernel": None},
      "blocks": {"Dense_0": {"bias": None, "kernel": (0,)},
                 # Unannotated stacked leaves carry no name: one layer each.
                 "LayerNorm_0": {"bias": None, "scale": None}}}
  # The same from the PartitionSpecs linen derives.
  specs = nn.get_partition_spec(variables)["params"]
  assert lamb_optax.layer_axes_from_metadata(specs) == layer_axes

  params = nn.unbox(boxed)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8)),
                  jnp.float32)
  opt = lamb_optax.lamb(LR, weight_decay=0.01, layer_axes=layer_axes)

  @jax.jit
  def first_step(params):
    grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2))(
        params)
    return grads, opt.update(grads, opt.init(params), params)[1]

  grads, state = first_step(params)
  ratios = lamb_optax.trust_ratios(state)
  got = np.asarray(ratios["blocks"]["Dense_0"]["kernel"])
  assert got.shape == (NUM_LAYERS,)
  want = first_step_ratios(params["blocks"]["Dense_0"]["kernel"],
                           grads["blocks"]["Dense_0"]["kernel"], (0,), 1e-6,
                           0.01)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert np.ptp(want) > 1e-3 * np.max(want)  # per-layer values differ
  assert ratios["blocks"]["LayerNorm_0"]["scale"].shape == ()


def _nnx_scanned_model(create):
  from flax import nnx

  class Layer(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(
          8, 8, kernel_init=nnx.with_partitioning(
              nnx.initializers.lecun_normal(), ("embed", "mlp")),
          bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(),
                                          ("mlp",)), rngs=rngs)
      self.norm = nnx.LayerNorm(8, rngs=rngs)

    def __call__(self, x):
      return x + self.norm(self.linear(x))

  class Model(nnx.Module):
    def __init__(self, rngs):
      transform = {"vmap": nnx.vmap, "scan": nnx.scan}[create]
      kwargs = {"in_axes": (0,), "out_axes": 0} if create == "vmap" else {
          "in_axes": (0,), "out_axes": 0, "length": NUM_LAYERS}

      @nnx.split_rngs(splits=NUM_LAYERS)
      @transform(transform_metadata={nnx.PARTITION_NAME: "layers"}, **kwargs)
      def make(rngs):
        return Layer(rngs)

      self.layers = make(rngs)
      self.head = nnx.Linear(8, 1, rngs=rngs)  # no sharding metadata

    def __call__(self, x):
      @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
      def forward(layer, x):
        return layer(x)
      return self.head(forward(self.layers, x))

  # Flax 0.12 shards annotated variables eagerly, which needs a mesh; the
  # metadata is all this test needs.
  with nnx.use_eager_sharding(False):
    return Model(nnx.Rngs(0))


@pytest.mark.parametrize("create", ["vmap", "scan"])
def test_from_nnx_state(create):
  from flax import nnx
  model = _nnx_scanned_model(create)
  state = nnx.state(model, nnx.Param)
  assert state["layers"]["linear"]["kernel"].get_metadata()[
      "out_sharding"] == ("layers", "embed", "mlp")
  layer_axes = lamb_optax.layer_axes_from_metadata(state)
  want = {"head": {"bias": None, "kernel": None},
          "layers": {"linear": {"bias": (0,), "kernel": (0,)},
                     "norm": {"bias": None, "scale": None}}}
  # Plain None / tuple leaves, no Variable boxes left around unannotated
  # params (those made the tree fit neither nnx.as_pure(state) nor a dict).
  assert nnx.to_pure_dict(layer_axes) == want
  assert not any(isinstance(leaf, nnx.Variable) for leaf in jax.tree.leaves(
      layer_axes, is_leaf=lambda x: isinstance(x, nnx.Variable)))
  spec_axes = lamb_optax.layer_axes_from_metadata(nnx.get_partition_spec(state))
  assert nnx.to_pure_dict(spec_axes) == want

  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8)),
                  jnp.float32)
  loss = lambda m: jnp.sum(m(x) ** 2)
  grads = nnx.grad(loss)(model)
  kernel0 = np.asarray(model.layers.linear.kernel[...])
  grad0 = np.asarray(grads["layers"]["linear"]["kernel"][...])
  want_ratios = first_step_ratios(kernel0, grad0, (0,), 1e-6, 0.0)
  pure = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
  pure_grads = jax.tree.map(np.asarray, nnx.to_pure_dict(grads))

  # nnx.Optimizer: init sees Param variables, update sees nnx.as_pure state.
  optimizer = nnx.Optimizer(model, lamb_optax.lamb(LR, layer_axes=layer_axes),
                            wrt=nnx.Param)
  optimizer.update(model, grads)
  ratios = lamb_optax.trust_ratios(nnx.as_pure(optimizer.opt_state))
  got = np.asarray(ratios["layers"]["linear"]["kernel"])
  assert got.shape == (NUM_LAYERS,)
  np.testing.assert_allclose(got, want_ratios, rtol=1e-5)
  assert np.ptp(want_ratios) > 1e-3 * np.max(want_ratios)

  # Pure-dict params take the tree as a pure dict.
  opt = lamb_optax.lamb(LR, layer_axes=nnx.to_pure_dict(layer_axes))
  _, opt_state = opt.update(pure_grads, opt.init(pure), pure)
  np.testing.assert_allclose(
      np.asarray(lamb_optax.trust_ratios(opt_state)["layers"]["linear"]
                 ["kernel"]), want_ratios, rtol=1e-5)


# --------------------------------------------------------------------------
# axis_names_from_specs: the mesh axes a layer's squared norm is summed over.
# --------------------------------------------------------------------------


def test_names_the_axes_that_split_each_leaf_and_nothing_else():
  specs = {"fsdp_tp": P("data", "model"), "replicated": P(),
           "tuple_entry": P(("data", "model"), None), "short": P(None, "model")}
  assert lamb_optax.axis_names_from_specs(specs) == {
      "fsdp_tp": ("data", "model"), "replicated": None,
      "tuple_entry": ("data", "model"), "short": ("model",)}


def test_axes_that_split_layers_are_left_out():
  # Devices along "stage" hold different layers: their norms must not add.
  specs = {"stack": P("stage", None, "model"), "head": P("stage")}
  names = lamb_optax.axis_names_from_specs(
      specs, layer_axes={"stack": 0, "head": None})
  assert names == {"stack": ("model",), "head": ("stage",)}
  # A layer axis past the spec's length is unsplit: nothing to leave out.
  assert lamb_optax.axis_names_from_specs(
      {"w": P("model")}, layer_axes=2) == {"w": ("model",)}


def test_negative_layer_axes_are_refused_because_specs_omit_trailing_dims():
  # P(None, "model") fits a (L, d, d) leaf: -1 would be read as dim 1.
  with pytest.raises(ValueError, match="`layer_axes`.*non-negative"):
    lamb_optax.axis_names_from_specs({"w": P(None, "model")}, layer_axes=-1)


def test_bad_inputs_name_the_argument():
  with pytest.raises(TypeError, match="`specs`.*PartitionSpec"):
    lamb_optax.axis_names_from_specs({"w": ("data",)})
  with pytest.raises(TypeError, match="`layer_axes`.*callable"):
    lamb_optax.axis_names_from_specs({"w": P("data")}, layer_axes=lambda p: 0)
  with pytest.raises(ValueError, match="`layer_axes` does not fit"):
    lamb_optax.axis_names_from_specs({"w": P("data")},
                                     layer_axes={"v": 0})
