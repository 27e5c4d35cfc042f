"""lamb_optax.presets against float64 statements of the peers (peer_reference).

Every preset and every switch is run for 12 steps on the awkward fixture tree
(helpers.py) and compared step by step with the peer's algorithm: the
parameters after each step and the trust ratios read back with
``lamb_optax.trust_ratios``. Each case with a ``base`` first checks, on the
reference alone, that the switch changes the trajectory relative to ``base``
(so a preset that silently ignored it would fail the comparison).
"""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lamb_optax
from lamb_optax import presets
import peer_reference
from helpers import (assert_trajectory_close, flat_mask, leaf_paths,
                      no_bias_or_norm, run_optimizer, trajectory_distance)

LR = 0.05
# Between the global gradient norms of the fixture's steps (2e3 .. 1.6e4):
# some steps are clipped, some are not.
MAX_GRAD_NORM = 6000.0
# A prefix tree: decay (and, for apex/timm, the ratio) on the kernels only.
PREFIX_MASK = {"conv": True, "dense": {"bias": False, "kernel": True},
               "embed": True, "head": True, "norm": False}
WD = 0.1


def lr_schedule(count):
  return 0.08 / (1.0 + 0.5 * count)


def wd_schedule(count):
  return 0.02 * (1.0 + count)


def wd_on_off(count):
  """A decay schedule that is 0 every third step (apex and timm then skip the
  ratio at run time)."""
  return jnp.where(count % 3 == 0, 0.0, WD)


PEERS = {
    "nvlamb": (presets.nvlamb, peer_reference.nvlamb),
    "timm": (presets.timm, peer_reference.timm),
    "torch_optimizer": (presets.torch_optimizer,
                        peer_reference.torch_optimizer),
    "deepspeed": (presets.deepspeed, peer_reference.deepspeed),
    "tensorflow": (presets.tensorflow, peer_reference.tensorflow),
    "keras": (presets.keras, peer_reference.keras),
}

L = {"learning_rate": LR}
LW = {"learning_rate": LR, "weight_decay": WD}
LWM = {**LW, "weight_decay_mask": no_bias_or_norm}
TF_WD = ["bias$", "^norm/"]

# name -> (preset, keyword arguments, base: None, or the arguments whose
#          reference trajectory must differ from the case's)
CASES = {
    # apex FusedLAMB / NVIDIA BERT
    "nvlamb/defaults": ("nvlamb", {}, None),
    "nvlamb/mask": ("nvlamb", LWM, LW),
    "nvlamb/prefix_mask": (
        "nvlamb", {**LW, "weight_decay_mask": PREFIX_MASK}, LW),
    "nvlamb/use_nvlamb": ("nvlamb", {**LWM, "use_nvlamb": True}, LWM),
    "nvlamb/l2_mode": ("nvlamb", {**LWM, "adam_w_mode": False}, LWM),
    "nvlamb/no_grad_averaging": ("nvlamb", {**L, "grad_averaging": False}, L),
    "nvlamb/no_bias_correction": (
        "nvlamb", {**L, "bias_correction": False}, L),
    "nvlamb/max_grad_norm": ("nvlamb", {**L, "max_grad_norm": MAX_GRAD_NORM},
                             L),
    "nvlamb/no_clip": ("nvlamb", {**L, "max_grad_norm": None}, L),
    "nvlamb/zero_weight_decay": ("nvlamb", {**L, "weight_decay": 0.0}, L),
    "nvlamb/schedules": (
        "nvlamb", {"learning_rate": lr_schedule, "weight_decay": wd_schedule,
                   "weight_decay_mask": no_bias_or_norm}, LWM),
    "nvlamb/decay_off_every_third_step": (
        "nvlamb", {**L, "weight_decay": wd_on_off,
                   "weight_decay_mask": no_bias_or_norm}, LWM),
    # timm
    "timm/defaults": ("timm", {}, None),
    "timm/mask": ("timm", LWM, LW),
    "timm/always_adapt": ("timm", {**LWM, "always_adapt": True}, LWM),
    "timm/trust_clip": ("timm", {**L, "trust_clip": True}, L),
    "timm/no_bias_correction": ("timm", {**L, "bias_correction": False}, L),
    "timm/no_clip": ("timm", {**L, "max_grad_norm": None}, L),
    "timm/max_grad_norm": ("timm", {**L, "max_grad_norm": MAX_GRAD_NORM}, L),
    "timm/zero_weight_decay": ("timm", {**L, "weight_decay": 0.0}, L),
    "timm/decay_off_every_third_step": (
        "timm", {**L, "weight_decay": wd_on_off}, LW),
    # torch-optimizer
    "torch_optimizer/defaults": ("torch_optimizer", {}, None),
    "torch_optimizer/weight_decay": ("torch_optimizer", LW, L),
    "torch_optimizer/mask": ("torch_optimizer", LWM, LW),
    # conv/kernel's |x| (~15) is above the default clamp of 10: it binds.
    "torch_optimizer/no_clamp": (
        "torch_optimizer", {**L, "clamp_value": 1e3}, L),
    "torch_optimizer/clamp_value": (
        "torch_optimizer", {**L, "clamp_value": 1.0}, L),
    "torch_optimizer/debias": ("torch_optimizer", {**LW, "debias": True}, LW),
    "torch_optimizer/adam": ("torch_optimizer", {**LW, "adam": True}, LW),
    "torch_optimizer/schedules": (
        "torch_optimizer", {"learning_rate": lr_schedule,
                            "weight_decay": wd_schedule}, LW),
    # DeepSpeed
    "deepspeed/defaults": ("deepspeed", {}, None),
    # embed/table's ratio is below min_coeff=0.01: the default bounds bind.
    "deepspeed/no_bounds": (
        "deepspeed", {**L, "min_coeff": 0.0, "max_coeff": math.inf}, L),
    "deepspeed/bounds": (
        "deepspeed", {**L, "min_coeff": 0.5, "max_coeff": 2.0}, L),
    # The 1 of a zero norm (head/kernel at step 1) is not clipped by DeepSpeed.
    "deepspeed/bounds_exclude_one": (
        "deepspeed", {**L, "min_coeff": 1.5, "max_coeff": 3.0}, L),
    "deepspeed/eps_inside_sqrt": (
        "deepspeed", {**L, "eps_inside_sqrt": True}, L),
    "deepspeed/no_bias_correction": (
        "deepspeed", {**L, "bias_correction": False}, L),
    "deepspeed/max_grad_norm": (
        "deepspeed", {**L, "max_grad_norm": MAX_GRAD_NORM}, L),
    "deepspeed/weight_decay_mask": ("deepspeed", LWM, L),
    # TensorFlow (tfa / tf-models)
    "tensorflow/defaults": ("tensorflow", {}, None),
    "tensorflow/weight_decay": ("tensorflow", LW, L),
    # The layer-adaptation list defaults to the weight-decay list.
    "tensorflow/exclude_from_weight_decay": (
        "tensorflow", {**LW, "exclude_from_weight_decay": TF_WD},
        {**LW, "exclude_from_weight_decay": TF_WD,
         "exclude_from_layer_adaptation": ["^$"]}),
    "tensorflow/exclude_from_layer_adaptation": (
        "tensorflow", {**LW, "exclude_from_weight_decay": TF_WD,
                       "exclude_from_layer_adaptation": ["conv", "embed"]},
        {**LW, "exclude_from_weight_decay": TF_WD}),
    # As in TF, an empty list also falls back to the weight-decay list.
    "tensorflow/empty_layer_adaptation_list": (
        "tensorflow", {**LW, "exclude_from_weight_decay": TF_WD,
                       "exclude_from_layer_adaptation": []},
        {**LW, "exclude_from_weight_decay": TF_WD,
         "exclude_from_layer_adaptation": ["^$"]}),
    "tensorflow/schedules": (
        "tensorflow", {"learning_rate": lr_schedule,
                       "weight_decay": wd_schedule}, LW),
    # Keras 3
    "keras/defaults": ("keras", {}, None),
    "keras/weight_decay": ("keras", LW, L),
    "keras/weight_decay_mask": ("keras", LWM, LW),
    "keras/max_grad_norm": ("keras", {**L, "max_grad_norm": MAX_GRAD_NORM}, L),
    "keras/schedules": (
        "keras", {"learning_rate": lr_schedule, "weight_decay": wd_schedule,
                  "weight_decay_mask": PREFIX_MASK}, LW),
}


def run_reference(peer, kwargs, params, grads_seq):
  """The peer's float64 run; masks resolved to one bool per leaf."""
  kwargs = dict(kwargs)
  if kwargs.get("weight_decay_mask") is not None:
    kwargs["weight_decay_mask"] = flat_mask(kwargs["weight_decay_mask"],
                                            params)
  params64 = [np.asarray(p, np.float64) for p in jax.tree.leaves(params)]
  grads64 = [[np.asarray(g, np.float64) for g in jax.tree.leaves(gs)]
             for gs in grads_seq]
  fn = PEERS[peer][1]
  if peer == "tensorflow":
    return fn(params64, grads64, leaf_paths(params), **kwargs)
  return fn(params64, grads64, **kwargs)


@pytest.mark.parametrize("case", list(CASES))
def test_preset_matches_peer(case, params, grads_seq):
  peer, kwargs, base = CASES[case]
  ref = run_reference(peer, kwargs, params, grads_seq)
  if base is not None:
    distance = trajectory_distance(
        ref, run_reference(peer, base, params, grads_seq))
    assert distance > 1e-3, (
        f"{case}: the switch does not change the reference trajectory "
        f"(distance {distance:.3g}), so the comparison would not test it")
  opt = PEERS[peer][0](**kwargs)
  got_params, got_ratios, _ = run_optimizer(opt, params, grads_seq)
  assert_trajectory_close(got_params, got_ratios, ref)


def test_reference_clipping_and_gating_happen(params, grads_seq):
  # The defaults clip every step (max_grad_norm=1 << G), MAX_GRAD_NORM only
  # some, and the nvlamb default leaves the zero layer with r = 1.
  ref = run_reference("nvlamb", {}, params, grads_seq)
  assert all(s.grads_clipped for s in ref)
  ref = run_reference("nvlamb", {"max_grad_norm": MAX_GRAD_NORM}, params,
                      grads_seq)
  assert 0 < sum(s.grads_clipped for s in ref) < len(ref)
  ref = run_reference("nvlamb", LWM, params, grads_seq)
  masked = [not m for m in flat_mask(no_bias_or_norm, params)]
  assert any(masked)
  for step in ref:
    assert all(r == 1.0 for r, m in zip(step.ratios, masked) if m)
    assert any(r != 1.0 for r, m in zip(step.ratios, masked) if not m)


# The peers' documented (code) defaults.
DEFAULTS = {
    "nvlamb": dict(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-6,
                   weight_decay=0.01, weight_decay_mask=None,
                   max_grad_norm=1.0, bias_correction=True,
                   grad_averaging=True, adam_w_mode=True, use_nvlamb=False),
    "timm": dict(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-6,
                 weight_decay=0.01, weight_decay_mask=None, max_grad_norm=1.0,
                 trust_clip=False, always_adapt=False, bias_correction=True),
    "torch_optimizer": dict(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-6,
                            weight_decay=0.0, weight_decay_mask=None,
                            max_grad_norm=None, clamp_value=10.0,
                            debias=False, adam=False),
    "deepspeed": dict(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8,
                      weight_decay=0.0, weight_decay_mask=None,
                      bias_correction=True, max_grad_norm=None,
                      max_coeff=10.0, min_coeff=0.01, eps_inside_sqrt=False),
    "tensorflow": dict(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-6,
                       weight_decay=0.0, weight_decay_mask=None,
                       max_grad_norm=None, exclude_from_weight_decay=None,
                       exclude_from_layer_adaptation=None),
    "keras": dict(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-7,
                  weight_decay=None, weight_decay_mask=None,
                  max_grad_norm=None),
}
# Every preset also takes the shared vocabulary of lamb_optax.lamb: the
# trust-ratio mask (None: the peer's rule), layer_axes and axis_name.
for _defaults in DEFAULTS.values():
  _defaults.update(trust_ratio_mask=None, layer_axes=None, axis_name=None)


@pytest.mark.parametrize("peer", list(PEERS))
def test_defaults_are_the_peers(peer):
  sig = inspect.signature(PEERS[peer][0])
  got = {k: p.default for k, p in sig.parameters.items()}
  assert got == DEFAULTS[peer]
  # The reference uses the same defaults, so the "defaults" cases test them.
  ref_sig = inspect.signature(PEERS[peer][1])
  for k, p in ref_sig.parameters.items():
    if k in DEFAULTS[peer]:
      assert p.default == DEFAULTS[peer][k], (peer, k)


# inject_hyperparams injects every numeric argument (b1, b2, eps,
# max_grad_norm, clamp_value, max_coeff, ...) as a traced float32 array.
# b2 = 0.999 rounded to float32 makes 1 - b2 off by 1.3e-5 relative, hence
# the looser tolerances.
INJECTED = {
    "nvlamb": {**LW, "weight_decay_mask": no_bias_or_norm,
               "adam_w_mode": False},
    "timm": {**LWM, "trust_clip": True},
    "torch_optimizer": {**LW, "debias": True},
    "deepspeed": {**LW, "max_grad_norm": MAX_GRAD_NORM,
                  "min_coeff": 0.05, "max_coeff": 2.0},
    "tensorflow": {**LW, "exclude_from_weight_decay": TF_WD},
    "keras": {**LWM, "max_grad_norm": MAX_GRAD_NORM},
}


@pytest.mark.parametrize("peer", list(PEERS))
def test_inject_hyperparams_under_jit(peer, params, grads_seq):
  kwargs = INJECTED[peer]
  static = ("weight_decay_mask",) if "weight_decay_mask" in kwargs else ()
  opt = optax.inject_hyperparams(PEERS[peer][0], static_args=static)(**kwargs)
  got_params, got_ratios, states = run_optimizer(opt, params, grads_seq,
                                                 jit=True)
  assert set(states[-1].hyperparams) >= {"learning_rate", "b1", "b2", "eps"}
  ref = run_reference(peer, kwargs, params, grads_seq)
  assert_trajectory_close(got_params, got_ratios, ref, step_rtol=1e-4,
                          ratio_rtol=3e-5)


@pytest.mark.parametrize("peer", ["nvlamb", "keras"])
def test_injected_learning_rate_change_takes_effect(peer, params, grads_seq):
  kwargs = {**LW, "weight_decay_mask": PREFIX_MASK}
  opt = optax.inject_hyperparams(PEERS[peer][0])(**kwargs)
  update = jax.jit(opt.update)
  p = jax.tree.map(jnp.asarray, params)
  state = opt.init(p)
  grads = jax.tree.map(jnp.asarray, grads_seq[0])
  u1, _ = update(grads, state, p)
  hyper = dict(state.hyperparams)
  hyper["learning_rate"] = jnp.asarray(LR / 2, jnp.float32)
  u2, _ = update(grads, state._replace(hyperparams=hyper), p)
  ref1 = run_reference(peer, kwargs, params, grads_seq[:1])[0]
  ref2 = run_reference(peer, {**kwargs, "learning_rate": LR / 2}, params,
                       grads_seq[:1])[0]
  for got, want in ((u1, ref1), (u2, ref2)):
    for g, w in zip(jax.tree.leaves(got), want.updates):
      np.testing.assert_allclose(g, w, rtol=1e-4,
                                 atol=1e-6 * np.max(np.abs(w)))


def test_jit_equals_eager(params, grads_seq):
  opt = presets.timm(**LWM)
  eager, _, _ = run_optimizer(opt, params, grads_seq[:3])
  jitted, _, states = run_optimizer(opt, params, grads_seq[:3], jit=True)
  for a, b in zip(eager, jitted):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  # The state keeps its dtypes and shapes, so jit does not recompile.
  first, last = opt.init(jax.tree.map(jnp.asarray, params)), states[-1]
  assert (jax.tree.map(lambda x: (x.shape, x.dtype), first)
          == jax.tree.map(lambda x: (x.shape, x.dtype), last))


def test_trust_ratios_are_readable_and_masked(params, grads_seq):
  opt = presets.nvlamb(**LWM)
  _, ratios, _ = run_optimizer(opt, params, grads_seq[:2])
  last = ratios[-1]
  assert float(last["dense"]["bias"]) == 1.0
  assert float(last["norm"]["scale"]) == 1.0
  assert float(last["embed"]["table"]) != 1.0
  assert lamb_optax.trust_ratios(opt.init(params))["conv"]["kernel"] == 1.0


def test_bf16_params_keep_their_dtype(params, grads_seq):
  # The presets' own transforms: run-time gate (nvlamb), clip, bias factor and
  # bounds (deepspeed), decoupled decay (keras).
  bf = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
  g = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), grads_seq[0])
  for peer in ("nvlamb", "deepspeed", "keras"):
    opt = PEERS[peer][0](**INJECTED[peer])
    updates, _ = opt.update(g, opt.init(bf), bf)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates)), peer
    assert all(bool(jnp.all(jnp.isfinite(u)))
               for u in jax.tree.leaves(updates)), peer


BAD_ARGS = [
    ("nvlamb", {"b1": 1.0}, ValueError, "`b1`"),
    ("nvlamb", {"eps": -1e-6}, ValueError, "`eps`"),
    ("nvlamb", {"weight_decay": -0.1}, ValueError, "`weight_decay`"),
    ("nvlamb", {"weight_decay": True}, TypeError, "`weight_decay`"),
    ("nvlamb", {"max_grad_norm": 0.0}, ValueError, "`max_grad_norm`"),
    ("nvlamb", {"use_nvlamb": 1}, TypeError, "`use_nvlamb`"),
    ("nvlamb", {"adam_w_mode": "yes"}, TypeError, "`adam_w_mode`"),
    ("nvlamb", {"grad_averaging": None}, TypeError, "`grad_averaging`"),
    ("timm", {"learning_rate": -1.0}, ValueError, "`learning_rate`"),
    ("timm", {"trust_clip": None}, TypeError, "`trust_clip`"),
    ("timm", {"always_adapt": 0}, TypeError, "`always_adapt`"),
    ("timm", {"b2": 1.5}, ValueError, "`b2`"),
    ("torch_optimizer", {"clamp_value": -1.0}, ValueError, "`clamp_value`"),
    ("torch_optimizer", {"debias": "no"}, TypeError, "`debias`"),
    ("torch_optimizer", {"adam": 0}, TypeError, "`adam`"),
    ("deepspeed", {"min_coeff": 2.0, "max_coeff": 1.0}, ValueError,
     "`min_coeff` must be <= `max_coeff`"),
    ("deepspeed", {"max_coeff": -1.0}, ValueError, "`max_coeff`"),
    ("deepspeed", {"eps": -1.0, "eps_inside_sqrt": True}, ValueError,
     "`eps` must"),
    ("deepspeed", {"eps_inside_sqrt": "x"}, TypeError, "`eps_inside_sqrt`"),
    ("deepspeed", {"max_grad_norm": -1.0}, ValueError, "`max_grad_norm`"),
    ("tensorflow", {"exclude_from_weight_decay": "bias"}, TypeError,
     "`exclude_from_weight_decay` must be None or a list"),
    ("tensorflow", {"exclude_from_layer_adaptation": ["("]}, ValueError,
     "`exclude_from_layer_adaptation`: invalid regex"),
    ("tensorflow", {"exclude_from_weight_decay": [1]}, TypeError,
     "`exclude_from_weight_decay` must hold regex strings"),
    ("keras", {"weight_decay": -1.0}, ValueError, "`weight_decay`"),
    ("keras", {"max_grad_norm": -1.0}, ValueError, "`max_grad_norm`"),
    ("keras", {"eps": float("nan")}, ValueError, "`eps`"),
]


@pytest.mark.parametrize("peer, kwargs, error, match", BAD_ARGS)
def test_bad_arguments(peer, kwargs, error, match):
  with pytest.raises(error, match=match):
    PEERS[peer][0](**kwargs)


@pytest.mark.parametrize("peer", ["nvlamb", "timm", "torch_optimizer",
                                  "deepspeed", "keras"])
def test_mask_that_does_not_fit_is_rejected_at_init(peer, params):
  opt = PEERS[peer][0](weight_decay=WD, weight_decay_mask={"conv": True})
  with pytest.raises(ValueError, match="`weight_decay_mask`"):
    opt.init(params)


@pytest.mark.parametrize("peer", list(PEERS))
def test_update_needs_params(peer, params, grads_seq):
  opt = PEERS[peer][0]()
  state = opt.init(params)
  with pytest.raises(ValueError, match="needs the current parameters"):
    opt.update(grads_seq[0], state)


def test_public_face():
  assert set(presets.__all__) == {
      "deepspeed", "keras", "nvlamb",
      "tensorflow", "timm", "torch_optimizer"}
  for name in presets.__all__:
    assert getattr(presets, name).__doc__


# --------------------------------------------------------------------------
# layer_axes and axis_name: a stacked leaf trained with layer_axes is the
# preset run on its slices as separate leaves.
# --------------------------------------------------------------------------

# 'stack' stacks 3 layers along axis 0 with scales 1e-2, 1 and 1e2 (a norm of
# the whole stack would be the last slice's); 'kern' stacks 2 along its last
# axis, the second one zero (r = 1 there only).
STACK_SCALES = (1e-2, 1.0, 1e2)
STACK_AXES = {"stack": 0, "kern": -1, "b": None}
STACK_MASK = {"stack": True, "kern": True, "b": False}
STACK_STEPS = 6
STACK_CASES = {
    # Default clip to 1.0 (every step) and the decay-gated ratio.
    "nvlamb": {**LW, "weight_decay_mask": STACK_MASK},
    "timm": {**LW, "weight_decay_mask": STACK_MASK, "max_grad_norm": 3.0},
    # clamp_value binds on the 1e2 slice only; debias after the ratio.
    "torch_optimizer": {**LW, "clamp_value": 50.0, "debias": True},
    # DeepSpeed's own clip; the bounds bind on the 1e-2 / 1e2 slices.
    "deepspeed": {**LW, "max_grad_norm": 3.0, "min_coeff": 0.05,
                  "max_coeff": 5.0},
    "tensorflow": {**LW, "exclude_from_weight_decay": ["^b$"]},
    # Decoupled decay before the ratio, and Keras' global clipnorm.
    "keras": {**LW, "weight_decay_mask": STACK_MASK, "max_grad_norm": 3.0},
}


def _stacked_problem():
  rng = np.random.default_rng(7)
  scales = np.asarray(STACK_SCALES, np.float32)[:, None, None]
  stack = (rng.normal(size=(3, 4, 5)) * scales).astype(np.float32)
  kern = np.stack([rng.normal(size=4), np.zeros(4)], axis=-1).astype(
      np.float32)
  params = {"stack": stack, "kern": kern,
            "b": rng.normal(size=5).astype(np.float32)}
  grads_seq = []
  for t in range(STACK_STEPS):
    # Gradient scales opposite to the parameters', and changing over steps.
    gscales = (np.asarray(STACK_SCALES[::-1], np.float32)[:, None, None]
               * (1.0 + 0.3 * t))
    grads_seq.append({
        "stack": (rng.normal(size=(3, 4, 5)) * gscales).astype(np.float32),
        "kern": rng.normal(size=(4, 2)).astype(np.float32),
        "b": rng.normal(size=5).astype(np.float32)})
  return params, grads_seq


def _unstack(tree):
  """The stacked leaves as separate leaves: {'stack': {'0': ..., ...}}."""
  return {"stack": {str(i): tree["stack"][i] for i in range(3)},
          "kern": {str(i): tree["kern"][..., i] for i in range(2)},
          "b": tree["b"]}


def _restack(tree):
  return {"stack": jnp.stack([tree["stack"][str(i)] for i in range(3)]),
          "kern": jnp.stack([tree["kern"][str(i)] for i in range(2)], -1),
          "b": tree["b"]}


def _assert_tree_close(got, want, what):
  for path, g in jax.tree_util.tree_leaves_with_path(got):
    w = functools.reduce(lambda t, k: t[k.key], path, want)
    g, w = np.asarray(g), np.asarray(w)
    assert g.shape == w.shape, (what, path)
    np.testing.assert_allclose(
        g, w, rtol=2e-5, atol=1e-6 * float(np.max(np.abs(w)) or 1.0),
        err_msg=f"{what} {jax.tree_util.keystr(path)}")


@pytest.fixture(scope="module")
def stacked_problem():
  return _stacked_problem()


@pytest.mark.parametrize("peer", list(PEERS))
def test_layer_axes_equal_unstacked_slices(peer, stacked_problem):
  params, grads_seq = stacked_problem
  kwargs = STACK_CASES[peer]
  unstacked_kwargs = dict(kwargs)
  if "weight_decay_mask" in kwargs:  # The prefix mask fits both trees.
    unstacked_kwargs["weight_decay_mask"] = STACK_MASK
  got, got_ratios, _ = run_optimizer(
      PEERS[peer][0](**kwargs, layer_axes=STACK_AXES), params, grads_seq)
  want, want_ratios, _ = run_optimizer(
      PEERS[peer][0](**unstacked_kwargs), _unstack(params),
      [_unstack(g) for g in grads_seq])
  for t in range(STACK_STEPS):
    _assert_tree_close(got[t], _restack(want[t]), f"{peer} step {t}: params")
    _assert_tree_close(got_ratios[t], _restack(want_ratios[t]),
                       f"{peer} step {t}: ratios")
  # The zero slice of 'kern' gets r = 1, the other one not (at step 1).
  assert float(got_ratios[0]["kern"][1]) == 1.0
  assert float(got_ratios[0]["kern"][0]) != 1.0
  # Without layer_axes the whole stack is one layer: another trajectory.
  whole, _, _ = run_optimizer(PEERS[peer][0](**kwargs), params, grads_seq)
  small = np.asarray(want[-1]["stack"]["0"])
  diff = np.max(np.abs(np.asarray(whole[-1]["stack"][0]) - small))
  assert diff > 1e-2 * np.max(np.abs(small)), (peer, diff)


@pytest.mark.parametrize("peer", list(PEERS))
def test_layer_axes_ratio_shapes(peer, stacked_problem):
  params, grads_seq = stacked_problem
  opt = PEERS[peer][0](**STACK_CASES[peer], layer_axes=lambda p: STACK_AXES)
  p = jax.tree.map(jnp.asarray, params)
  state = opt.init(p)
  shapes = {"stack": (3,), "kern": (2,), "b": ()}
  for s in (state, opt.update(jax.tree.map(jnp.asarray, grads_seq[0]), state,
                              p)[1]):
    ratios = lamb_optax.trust_ratios(s)
    assert jax.tree.map(lambda r: r.shape, ratios) == shapes
    assert all(r.dtype == jnp.float32 for r in jax.tree.leaves(ratios))
  assert np.all(np.asarray(lamb_optax.trust_ratios(state)["stack"]) == 1.0)


@pytest.mark.parametrize("peer", list(PEERS))
def test_bad_layer_axes_and_axis_name_name_the_argument(peer,
                                                        stacked_problem):
  params, grads_seq = stacked_problem
  p = jax.tree.map(jnp.asarray, params)
  g = jax.tree.map(jnp.asarray, grads_seq[0])
  kwargs = STACK_CASES[peer]
  with pytest.raises(ValueError, match="`layer_axes`"):
    PEERS[peer][0](**kwargs, layer_axes={"stack": 3, "kern": None,
                                         "b": None}).init(p)
  with pytest.raises((ValueError, TypeError), match="`axis_name`"):
    PEERS[peer][0](**kwargs, axis_name={"stack": 1, "kern": None,
                                        "b": None}).init(p)
  # A mesh axis that is not bound (no shard_map around the update).
  opt = PEERS[peer][0](**kwargs, axis_name="model")
  with pytest.raises(ValueError, match="`axis_name`.*not bound"):
    opt.update(g, opt.init(p), p)


# --------------------------------------------------------------------------
# One vocabulary for every preset.
# --------------------------------------------------------------------------

ALL_FACTORIES = {"lamb": lamb_optax.lamb, "lars": lamb_optax.lars,
                 **{peer: factory for peer, (factory, _) in PEERS.items()}}


def _first_step(opt, params, grads):
  params = jax.tree.map(jnp.asarray, params)
  updates, state = opt.update(jax.tree.map(jnp.asarray, grads),
                              opt.init(params), params)
  return updates, lamb_optax.trust_ratios(state)


@pytest.mark.parametrize("name", sorted(ALL_FACTORIES))
def test_plain_name_to_factory_mapping_takes_one_call(name, params,
                                                      grads_seq):
  """The BERT example's table: every optimizer called the same way."""
  opt = ALL_FACTORIES[name](
      LR, weight_decay=WD, weight_decay_mask=no_bias_or_norm,
      trust_ratio_mask=no_bias_or_norm, max_grad_norm=MAX_GRAD_NORM,
      layer_axes=None, axis_name=None)
  assert isinstance(opt, optax.GradientTransformationExtraArgs)
  updates, ratios = _first_step(opt, params, grads_seq[0])
  # Extra keyword arguments of update are accepted and change nothing.
  again, _ = opt.update(jax.tree.map(jnp.asarray, grads_seq[0]),
                        opt.init(jax.tree.map(jnp.asarray, params)),
                        jax.tree.map(jnp.asarray, params), value=1.0)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # BERT's masks: no ratio on the biases and the norm scale.
  for path, ratio in zip(leaf_paths(params), jax.tree.leaves(ratios)):
    if path.endswith(("bias", "scale")):
      assert float(ratio) == 1.0, (name, path)


@pytest.mark.parametrize("peer", list(PEERS))
def test_trust_ratio_mask_takes_leaves_out_of_the_ratio(peer, params,
                                                        grads_seq):
  """A leaf outside trust_ratio_mask gets r = 1 and its update divided by
  the ratio it had (Keras: the part of it the ratio scales, not the
  decoupled decay -lr wd x); the other leaves are untouched (a layer's
  update depends on its own gradient only: no clip here)."""
  kwargs = dict(learning_rate=LR, weight_decay=WD, max_grad_norm=None)
  if peer == "tensorflow":
    del kwargs["max_grad_norm"]
    kwargs["weight_decay_mask"] = None
  out = "dense/kernel"
  mask = lambda p: jax.tree_util.tree_map_with_path(
      lambda path, _: jax.tree_util.keystr(path, simple=True,
                                           separator="/") != out, p)
  factory = PEERS[peer][0]
  plain, plain_ratios = _first_step(factory(**kwargs), params, grads_seq[0])
  masked, masked_ratios = _first_step(factory(**kwargs, trust_ratio_mask=mask),
                                      params, grads_seq[0])
  paths = leaf_paths(params)
  for path, a, b, ra, rb in zip(
      paths, jax.tree.leaves(plain), jax.tree.leaves(masked),
      jax.tree.leaves(plain_ratios), jax.tree.leaves(masked_ratios)):
    if path == out:
      assert float(rb) == 1.0 and float(ra) != 1.0
      decay = 0.0
      if peer == "keras":
        decay = -LR * WD * np.asarray(params["dense"]["kernel"], np.float64)
      np.testing.assert_allclose((np.asarray(b) - decay) * float(ra),
                                 np.asarray(a) - decay, rtol=1e-5)
    else:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      assert float(ra) == float(rb)


@pytest.mark.parametrize("peer", ["tensorflow", "torch_optimizer"])
def test_max_grad_norm_is_a_global_clip_in_front(peer, params, grads_seq):
  """Where the peer has no clip of its own, max_grad_norm is
  optax.clip_by_global_norm in front of the preset."""
  factory = PEERS[peer][0]
  clipped = factory(**LW, max_grad_norm=MAX_GRAD_NORM)
  by_hand = optax.chain(optax.clip_by_global_norm(MAX_GRAD_NORM),
                        factory(**LW))
  got, _, _ = run_optimizer(clipped, params, grads_seq[:4])
  want, _, _ = run_optimizer(by_hand, params, grads_seq[:4])
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  unclipped, _, _ = run_optimizer(factory(**LW), params, grads_seq[:4])
  assert not all(np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(got), jax.tree.leaves(unclipped)))


def test_tensorflow_masks_and_regexes():
  """TF's regex lists are its way of giving the masks: the same numbers,
  the layer-adaptation mask defaults to the weight-decay one, and giving a
  list and a mask for the same thing is refused."""
  params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
            "norm": {"scale": jnp.full(2, 2.0)}}
  grads = jax.tree.map(lambda x: 0.1 * jnp.arange(x.size).reshape(x.shape)
                       - 0.2, params)
  mask = lamb_optax.masks.exclude_paths(TF_WD)
  by_regex = presets.tensorflow(**LW, exclude_from_weight_decay=TF_WD)
  by_mask = presets.tensorflow(**LW, weight_decay_mask=mask)
  both = presets.tensorflow(**LW, weight_decay_mask=mask,
                            trust_ratio_mask=mask)
  results = [_first_step(tx, params, grads) for tx in (by_regex, by_mask,
                                                       both)]
  for updates, ratios in results[1:]:
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(
        (updates, ratios))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(results[0][1]["dense"]["bias"]) == 1.0
  assert float(results[0][1]["dense"]["kernel"]) != 1.0
  with pytest.raises(ValueError, match="`exclude_from_weight_decay`.*"
                     "`weight_decay_mask`"):
    presets.tensorflow(exclude_from_weight_decay=TF_WD,
                       weight_decay_mask=mask)
  with pytest.raises(ValueError, match="`exclude_from_layer_adaptation`.*"
                     "`trust_ratio_mask`"):
    presets.tensorflow(exclude_from_layer_adaptation=TF_WD,
                       trust_ratio_mask=mask)


@pytest.mark.parametrize("peer, kwargs", [
    ("nvlamb", {"weight_decay": wd_schedule}),
    ("timm", {"weight_decay": wd_schedule}),
    ("keras", {"learning_rate": lr_schedule, "weight_decay": WD}),
    ("keras", {"weight_decay": wd_schedule}),
])
def test_the_trust_ratio_state_is_one_type_whatever_the_options(
    peer, kwargs, params):
  """A scheduled rule of the ratio and a constant one keep the same state,
  under the same name, with a count that follows the steps."""
  p = jax.tree.map(jnp.asarray, params)
  scheduled_opt = PEERS[peer][0](**kwargs)
  scheduled = scheduled_opt.init(p)
  constant = PEERS[peer][0](learning_rate=LR, weight_decay=WD).init(p)
  for state in (scheduled, constant):
    assert type(state["trust_ratio"]) is lamb_optax.ScaleByTrustRatioState
    assert state["trust_ratio"].count.dtype == jnp.int32
  assert (jax.tree.structure(scheduled["trust_ratio"])
          == jax.tree.structure(constant["trust_ratio"]))
  grads = jax.tree.map(jnp.ones_like, p)
  _, scheduled = scheduled_opt.update(grads, scheduled, p)
  assert int(scheduled["trust_ratio"].count) == 1
