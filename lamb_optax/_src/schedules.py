r"""The paper's learning-rate recipe: warmup, polynomial decay, LEGW, phases.

You et al. (2020) train BERT with LAMB under a linear warmup from zero and a
polynomial decay to zero; across batch sizes they scale the peak by the square
root of the batch ratio at fixed warmup iterations and fixed epochs (LEGW,
Table 4); their fastest runs train in two phases, each warmed up from zero.

Every schedule is an :data:`optax.Schedule`: step count (an int, or optax's
int32 count under ``jit``) to a float32 learning rate (float64 under
``jax_enable_x64``). Step counts must be Python or NumPy ints. Fractions and
epochs given as floats are read as the decimals they print as (``0.9`` is
9/10), so budgets that divide evenly give whole steps.
"""

from __future__ import annotations

from fractions import Fraction
import math
import numbers
from typing import Any, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lamb_optax._src import validation

_FRACTION_TOLERANCE = 1e-6


def _check_int(name: str, value: Any, minimum: int) -> int:
  """A number of steps, examples or tokens: an int >= ``minimum``."""
  return validation.check_int(
      name, value, minimum,
      expected="an int (a number of steps, examples or tokens)")


def _check_ints(name: str, values: Any) -> list[int]:
  """One int >= 1 per phase (batch sizes, sequence lengths)."""
  return [_check_int(f"{name}[{i}]", v, 1)
          for i, v in enumerate(validation.check_sequence(name, values))]


def _exact(value: Any) -> Fraction:
  """An int exactly; a float as the shortest decimal that prints as it."""
  if isinstance(value, numbers.Integral):
    return Fraction(int(value))
  return Fraction(repr(float(value)))


def _check_fractions(value: Any) -> list[Fraction]:
  """Positive fractions summing to 1, as exact weights summing to exactly 1."""
  items = validation.check_sequence("fractions", value)
  for i, f in enumerate(items):
    validation.check_real(f"fractions[{i}]", f, positive=True)
  weights = [_exact(f) for f in items]
  total = sum(weights)
  if abs(float(total) - 1.0) > _FRACTION_TOLERANCE:
    raise ValueError(
        f"`fractions` must sum to 1 (within {_FRACTION_TOLERANCE}), got "
        f"{value!r} summing to {float(total)!r}.")
  return [w / total for w in weights]


# ---------------------------------------------------------------------------
# Schedules: two pieces joined by optax.join_schedules.
#
# Why not optax.linear_schedule and optax.polynomial_schedule: they compute
# init + (end - init) * (1 - t / T)**p, and in float32 the 1 - t / T cancels at
# the start of a warmup from 0 and at the end of a decay; under jit XLA also
# turns t / T into t * (1 / T), so eager and jit disagree there. Measured
# against float64 over 306 random schedules of up to 2e6 steps, eager and jit:
# up to 11% relative error in the warmup and 16% in the decay (Table 4 at batch
# size 512: 1.0% at t = T - 1), NaN at t = T under jit for power 0.5 with
# end_value > 0, and eager and jit apart by more than tests/test_schedules.py
# allows. The pieces below state the same formulas without the cancellation:
# within 4e-7 of float64.


def _warmup(peak_value: float, warmup_steps: int) -> optax.Schedule:
  """``optax.linear_schedule(0, peak, W)`` as ``peak * (t / W)``."""
  return lambda count: peak_value * (count / warmup_steps)


def _decay(peak_value: float, end_value: float, power: float,
           decay_steps: int) -> optax.Schedule:
  """``optax.polynomial_schedule(peak, end, power, D)`` from the steps left.

  ``(D - t) / D`` is exactly 0 from ``t = D`` on: the end needs no wrapper.
  The peak at ``t = 0`` does: jit's ``D * (1 / D)`` need not be 1, nor
  ``end + (peak - end)`` be ``peak`` in float32 (measured: 1223 of 4000
  random decays, eager and jit, missed it; 204 with ``end_value=0``).
  """
  def schedule(count):
    remaining = jnp.clip((decay_steps - count) / decay_steps, 0.0, 1.0)
    value = end_value + (peak_value - end_value) * remaining**power
    return jnp.where(count == 0, peak_value, value)
  return schedule


def _checked_schedule(peak_value, warmup_steps, total_steps, power, end_value,
                      *, phase="", power_name="power"):
  """Checks the arguments (a phase's named ``name[i]``), then builds."""
  peak_name = f"peak_values{phase}" if phase else "peak_value"
  total_name = f"phase_steps{phase}" if phase else "total_steps"
  peak_value = validation.check_real(peak_name, peak_value, positive=False)
  end_value = validation.check_real("end_value", end_value, positive=False)
  power = validation.check_real(power_name, power, positive=True)
  warmup_steps = _check_int(f"warmup_steps{phase}", warmup_steps, 0)
  total_steps = _check_int(total_name, total_steps, 1)
  if warmup_steps > total_steps:
    raise ValueError(
        f"`warmup_steps{phase}` ({warmup_steps}) must be <= `{total_name}` "
        f"({total_steps}).")
  if end_value > peak_value:
    raise ValueError(
        f"`end_value` ({end_value!r}) must be <= `{peak_name}` "
        f"({peak_value!r}): the schedule decays from the peak to the end.")
  decay = (_decay(peak_value, end_value, power, total_steps - warmup_steps)
           if warmup_steps < total_steps
           else optax.constant_schedule(end_value))
  joined = decay
  if warmup_steps:
    joined = optax.join_schedules(
        [_warmup(peak_value, warmup_steps), decay], [warmup_steps])

  def schedule(count: jax.typing.ArrayLike) -> jax.Array:
    value = joined(jnp.maximum(count, 0))  # Counts below zero read as zero.
    return jnp.asarray(value).astype(jnp.result_type(float))

  return schedule


def warmup_polynomial_decay(
    peak_value: float,
    warmup_steps: int,
    total_steps: int,
    power: float = 1.0,
    end_value: float = 0.0,
) -> optax.Schedule:
  r"""Linear warmup from zero, then polynomial decay: BERT's schedule.

  With :math:`\eta` the ``peak_value``, :math:`\eta_{end}` the ``end_value``,
  :math:`W` the ``warmup_steps``, :math:`T` the ``total_steps`` and :math:`p`
  the ``power``, the learning rate at step count :math:`t` is

  .. math::

    \eta_t = \begin{cases}
      \eta \, t / W, & 0 \le t < W, \\
      \eta_{end} + (\eta - \eta_{end})
        \left(1 - \frac{t - W}{T - W}\right)^{p}, & W \le t < T, \\
      \eta_{end}, & t \ge T,
    \end{cases}

  with :math:`\eta_0 = 0`, :math:`\eta_W = \eta` and :math:`\eta_T =
  \eta_{end}` exactly; :math:`t` is optax's count (0 for the first update),
  and counts below zero read as zero. This is
  ``optax.join_schedules([optax.linear_schedule(0, peak, W),
  optax.polynomial_schedule(peak, end, p, T - W)], [W])``, with pieces that
  keep float32 precision at the ends of each stage (optax's lose up to 16%
  there). Google's BERT uses ``power=1.0``, ``end_value=0.0``.

  Args:
    peak_value: :math:`\eta \ge 0`, the learning rate at the end of warmup.
    warmup_steps: :math:`W`, an int with ``0 <= W <= total_steps``.
    total_steps: :math:`T \ge 1`, an int: where ``end_value`` is reached.
    power: :math:`p > 0`, the power of the decay (1 is linear).
    end_value: :math:`\eta_{end}`, with ``0 <= end_value <= peak_value``.

  Returns:
    An :data:`optax.Schedule`.

  Examples:
    >>> from lamb_optax import schedules
    >>> lr = schedules.warmup_polynomial_decay(
    ...     peak_value=1e-3, warmup_steps=10, total_steps=110)
    >>> print(*[f"{float(lr(t)):.5f}" for t in (0, 5, 10, 60, 110, 200)])
    0.00000 0.00050 0.00100 0.00050 0.00000 0.00000
    >>> import lamb_optax, optax
    >>> opt = lamb_optax.lamb(learning_rate=lr)  # also optax.inject_hyperparams

  References:
    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020.

    Devlin et al., `BERT: Pre-training of Deep Bidirectional Transformers for
    Language Understanding <https://arxiv.org/abs/1810.04805>`_, NAACL 2019.
  """
  return _checked_schedule(peak_value, warmup_steps, total_steps, power,
                           end_value)


class LEGWConfig(NamedTuple):
  """The numbers :func:`legw` derives for one batch size.

  Attributes:
    peak_value: The base peak times ``sqrt(batch_size / base_batch_size)``.
    warmup_steps: The base warmup iterations, at every batch size.
    total_steps: ``ceil(base_total_steps * base_batch_size / batch_size)``.
  """
  peak_value: float
  warmup_steps: int
  total_steps: int


def legw_config(
    base_learning_rate: float,
    base_batch_size: int,
    base_warmup_steps: int,
    base_total_steps: int,
    batch_size: int,
) -> LEGWConfig:
  r"""The peak, warmup and length of the LEGW recipe at one batch size.

  See :func:`legw`, which builds the schedule from these numbers.

  Args:
    base_learning_rate: Peak learning rate at ``base_batch_size``, > 0.
    base_batch_size: Batch size the base recipe was tuned for, an int >= 1.
    base_warmup_steps: Warmup iterations of the base recipe, an int >= 0.
    base_total_steps: Iterations of the base recipe, an int >= 1.
    batch_size: The batch size to scale to, an int >= 1.

  Returns:
    A :class:`LEGWConfig` ``(peak_value, warmup_steps, total_steps)``.

  Raises:
    ValueError: if the scaled run would be shorter than its warmup.

  Examples:
    The paper's Table 4 (untuned LAMB for BERT), from the recipe at batch
    size 512, the learning rate written :math:`5 / (2^e \cdot 10^3)`:

    >>> import math
    >>> from lamb_optax import schedules
    >>> for batch_size in (512, 1024, 2048, 4096, 8192, 16384, 32768):
    ...   c = schedules.legw_config(
    ...       base_learning_rate=5 / (2**3 * 10**3), base_batch_size=512,
    ...       base_warmup_steps=3125, base_total_steps=1_000_000,
    ...       batch_size=batch_size)
    ...   e = math.log2(5e-3 / c.peak_value)
    ...   print(f"{batch_size:>5}  5/(2^{e:.1f}*10^3)  warmup {c.warmup_steps}"
    ...         f"  ratio 1/{c.total_steps // c.warmup_steps}"
    ...         f"  iterations {c.total_steps}")
      512  5/(2^3.0*10^3)  warmup 3125  ratio 1/320  iterations 1000000
     1024  5/(2^2.5*10^3)  warmup 3125  ratio 1/160  iterations 500000
     2048  5/(2^2.0*10^3)  warmup 3125  ratio 1/80  iterations 250000
     4096  5/(2^1.5*10^3)  warmup 3125  ratio 1/40  iterations 125000
     8192  5/(2^1.0*10^3)  warmup 3125  ratio 1/20  iterations 62500
    16384  5/(2^0.5*10^3)  warmup 3125  ratio 1/10  iterations 31250
    32768  5/(2^0.0*10^3)  warmup 3125  ratio 1/5  iterations 15625

  References:
    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020, Table 4.

    You et al., `Large-Batch Training for LSTM and Beyond
    <https://arxiv.org/abs/1901.08256>`_, SC 2019 (LEGW).
  """
  base_learning_rate = validation.check_real(
      "base_learning_rate", base_learning_rate, positive=True)
  base_batch_size = _check_int("base_batch_size", base_batch_size, 1)
  base_warmup_steps = _check_int("base_warmup_steps", base_warmup_steps, 0)
  base_total_steps = _check_int("base_total_steps", base_total_steps, 1)
  batch_size = _check_int("batch_size", batch_size, 1)
  if base_warmup_steps > base_total_steps:
    raise ValueError(
        f"`base_warmup_steps` ({base_warmup_steps}) must be <= "
        f"`base_total_steps` ({base_total_steps}).")
  # Fixed epochs: the same number of examples, rounded up to whole steps.
  total_steps = -(-(base_total_steps * base_batch_size) // batch_size)
  if base_warmup_steps > total_steps:
    raise ValueError(
        f"`batch_size` {batch_size} is too large for this recipe: at a fixed "
        f"number of epochs the run has {total_steps} steps, fewer than the "
        f"{base_warmup_steps} warmup steps LEGW keeps at every batch size.")
  return LEGWConfig(
      peak_value=base_learning_rate * math.sqrt(batch_size / base_batch_size),
      warmup_steps=base_warmup_steps, total_steps=total_steps)


def legw(
    base_learning_rate: float,
    base_batch_size: int,
    base_warmup_steps: int,
    base_total_steps: int,
    batch_size: int,
    decay_power: float = 1.0,
) -> optax.Schedule:
  r"""The paper's recipe across batch sizes: sqrt scaling with LEGW warmup.

  Scaling the batch size by :math:`k = B / B_0` from a base recipe
  (:math:`\eta_0, B_0, W_0, T_0`), at a fixed number of epochs:

  .. math::

    \eta = \eta_0 \sqrt{k}, \qquad W = W_0, \qquad
    T = \lceil T_0 / k \rceil = \lceil T_0 B_0 / B \rceil,

  then :func:`warmup_polynomial_decay` ``(eta, W, T, power=decay_power)``.
  LEGW (Linear-Epoch Gradual Warmup) scales the warmup *epochs* by :math:`k`,
  so the warmup *iterations* stay :math:`W_0`. :func:`legw_config` gives the
  numbers.

  Args:
    base_learning_rate: :math:`\eta_0 > 0`, the peak at ``base_batch_size``.
    base_batch_size: :math:`B_0`, an int >= 1.
    base_warmup_steps: :math:`W_0`, an int >= 0.
    base_total_steps: :math:`T_0`, an int >= ``base_warmup_steps``.
    batch_size: :math:`B`, an int >= 1, with :math:`T \ge W_0`.
    decay_power: The power of the decay, > 0 (1 is linear, as in the paper).

  Returns:
    An :data:`optax.Schedule`.

  Examples:
    Table 4's recipe at batch size 32K (:func:`legw_config` has the table):

    >>> from lamb_optax import schedules
    >>> base = dict(base_learning_rate=5 / (2**3 * 10**3),
    ...             base_batch_size=512, base_warmup_steps=3125,
    ...             base_total_steps=1_000_000)
    >>> lr = schedules.legw(**base, batch_size=32768)
    >>> print(*[f"{float(lr(t)):.3e}" for t in (0, 3125, 9375, 15625)])
    0.000e+00 5.000e-03 2.500e-03 0.000e+00
    >>> schedules.legw_config(**base, batch_size=32768)
    LEGWConfig(peak_value=0.005, warmup_steps=3125, total_steps=15625)

  References:
    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020, Table 4.

    You et al., `Large-Batch Training for LSTM and Beyond
    <https://arxiv.org/abs/1901.08256>`_, SC 2019 (LEGW).
  """
  config = legw_config(base_learning_rate, base_batch_size, base_warmup_steps,
                       base_total_steps, batch_size)
  return _checked_schedule(config.peak_value, config.warmup_steps,
                           config.total_steps, decay_power, 0.0,
                           power_name="decay_power")


def mixed_batch(
    peak_values: Sequence[float],
    warmup_steps: Sequence[int],
    phase_steps: Sequence[int],
    *,
    power: float = 1.0,
    end_value: float = 0.0,
) -> optax.Schedule:
  r"""Phases run one after the other, each warmed up again from zero.

  Phase :math:`i` starts at step :math:`S_i = \sum_{j<i} T_j` (with
  :math:`T_j` the ``phase_steps``) and follows its own
  :func:`warmup_polynomial_decay`, joined by ``optax.join_schedules``:

  .. math::

    \eta_t = \mathrm{wpd}(\eta_i, W_i, T_i)(t - S_i)
    \quad \text{for } S_i \le t < S_i + T_i.

  Each phase starts at 0, peaks at :math:`\eta_i` after :math:`W_i` of its
  steps and decays to ``end_value``, which holds after the last phase: the
  paper's mixed-batch BERT (sequence length 128, then 512 at a smaller batch,
  warmed up again). :func:`split_steps`, :func:`phase_steps_from_epochs` and
  :func:`phase_steps_from_tokens` give the phase lengths.

  Args:
    peak_values: One peak learning rate per phase, each >= 0.
    warmup_steps: One int per phase, ``0 <= warmup_steps[i] <=
      phase_steps[i]``.
    phase_steps: One int >= 1 per phase: its number of steps.
    power: The power of every phase's decay, > 0.
    end_value: The value every phase decays to, ``0 <= end_value <=
      min(peak_values)``.

  Returns:
    An :data:`optax.Schedule`.

  Examples:
    >>> from lamb_optax import schedules
    >>> lr = schedules.mixed_batch(
    ...     peak_values=(4e-3, 2e-3), warmup_steps=(20, 10),
    ...     phase_steps=(90, 30))
    >>> print(*[f"{float(lr(t)):.4f}" for t in (0, 20, 89, 90, 100, 120)])
    0.0000 0.0040 0.0001 0.0000 0.0020 0.0000

  References:
    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020, Section 4.1.
  """
  peak_values = validation.check_sequence("peak_values", peak_values)
  warmup_steps = validation.check_sequence("warmup_steps", warmup_steps)
  phase_steps = validation.check_sequence("phase_steps", phase_steps)
  validation.check_same_length(peak_values=peak_values,
                               warmup_steps=warmup_steps,
                               phase_steps=phase_steps)
  phases = [
      _checked_schedule(peak, warmup, steps, power, end_value, phase=f"[{i}]")
      for i, (peak, warmup, steps) in enumerate(
          zip(peak_values, warmup_steps, phase_steps))]
  boundaries = np.cumsum([int(s) for s in phase_steps])[:-1].tolist()
  return optax.join_schedules(phases, boundaries)


# ---------------------------------------------------------------------------
# Phase lengths.


def split_steps(
    total_steps: int,
    fractions: Sequence[float] = (0.9, 0.1),
) -> tuple[int, ...]:
  r"""Splits a number of steps between phases, summing exactly to it.

  Phase :math:`i` gets :math:`\lfloor f_i T \rfloor` steps; the steps left
  over go one each to the phases with the largest remainders :math:`f_i T -
  \lfloor f_i T \rfloor` (the earlier phase on ties). A phase that would get 0
  steps takes one from the longest phase, so every phase has a step.

  Args:
    total_steps: :math:`T`, an int >= ``len(fractions)``.
    fractions: :math:`f_i > 0`, one per phase, summing to 1 (within 1e-6;
      they are then normalised). The paper's 9:1 by default.

  Returns:
    A tuple of ints, one per phase, each >= 1, summing to ``total_steps``.

  Examples:
    >>> from lamb_optax import schedules
    >>> schedules.split_steps(8599)
    (7739, 860)
    >>> schedules.split_steps(10, (1/3, 1/3, 1/3))
    (4, 3, 3)
  """
  weights = _check_fractions(fractions)
  total_steps = _check_int("total_steps", total_steps, 1)
  if total_steps < len(weights):
    raise ValueError(
        f"`total_steps` ({total_steps}) must be >= the number of phases "
        f"({len(weights)}) so that every phase gets a step.")
  quotas = [w * total_steps for w in weights]
  steps = [math.floor(q) for q in quotas]
  by_remainder = sorted(range(len(quotas)),
                        key=lambda i: (-(quotas[i] - steps[i]), i))
  for i in by_remainder[:total_steps - sum(steps)]:
    steps[i] += 1
  for i in range(len(steps)):
    if steps[i] == 0:
      longest = max(range(len(steps)), key=lambda j: (steps[j], -j))
      steps[longest] -= 1
      steps[i] += 1
  assert sum(steps) == total_steps and min(steps) >= 1
  return tuple(steps)


def _phase_steps(budget: Fraction, per_step: list[int],
                 weights: list[Fraction]) -> tuple[int, ...]:
  """``ceil(w_i * budget / per_step_i)`` for each phase, exactly."""
  return tuple(math.ceil(w * budget / n) for w, n in zip(weights, per_step))


def phase_steps_from_epochs(
    epochs: float,
    num_examples: int,
    batch_sizes: Sequence[int],
    fractions: Sequence[float] = (0.9, 0.1),
) -> tuple[int, ...]:
  r"""Steps per phase for an epoch budget, each phase at its own batch size.

  Phase :math:`i` trains on the fraction :math:`f_i` of the :math:`E \cdot N`
  examples at batch size :math:`B_i`:

  .. math::

    T_i = \lceil f_i E N / B_i \rceil,

  rounded up so that the budget is covered, in exact arithmetic.

  Args:
    epochs: :math:`E > 0`, passes over the data (int or float).
    num_examples: :math:`N`, an int >= 1: examples (sequences) per epoch.
    batch_sizes: One int >= 1 per phase.
    fractions: :math:`f_i > 0`, one per phase, summing to 1. The paper's 9:1
      by default.

  Returns:
    A tuple of ints, one per phase, each >= 1.

  Examples:
    Table 4's budget (1M iterations at batch size 512) with phase 1 at batch
    size 65536 and phase 2 at 32768 (the paper reports 8599 iterations):

    >>> from lamb_optax import schedules
    >>> steps = schedules.phase_steps_from_epochs(
    ...     epochs=1, num_examples=512 * 1_000_000,
    ...     batch_sizes=(65536, 32768))
    >>> steps, sum(steps)
    ((7032, 1563), 8595)

  References:
    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020.
  """
  weights = _check_fractions(fractions)
  validation.check_real("epochs", epochs, positive=True)
  num_examples = _check_int("num_examples", num_examples, 1)
  batch_sizes = _check_ints("batch_sizes", batch_sizes)
  validation.check_same_length(batch_sizes=batch_sizes, fractions=weights)
  return _phase_steps(_exact(epochs) * num_examples, batch_sizes, weights)


def phase_steps_from_tokens(
    total_tokens: Union[int, float],
    batch_sizes: Sequence[int],
    sequence_lengths: Sequence[int],
    fractions: Sequence[float] = (0.9, 0.1),
) -> tuple[int, ...]:
  r"""Steps per phase for a token budget, at each phase's batch and length.

  Phase :math:`i` trains on the fraction :math:`f_i` of the :math:`K` tokens
  with batches of :math:`B_i` sequences of :math:`L_i` tokens:

  .. math::

    T_i = \lceil f_i K / (B_i L_i) \rceil,

  rounded up so that the budget is covered, in exact arithmetic.

  Args:
    total_tokens: :math:`K > 0`, the token budget (int, or a float such as
      ``6e10``).
    batch_sizes: One int >= 1 per phase (sequences per batch).
    sequence_lengths: One int >= 1 per phase (tokens per sequence).
    fractions: :math:`f_i > 0`, the share of the *token* budget of each
      phase, summing to 1. 9:1 by default.

  Returns:
    A tuple of ints, one per phase, each >= 1.

  Examples:
    The paper's two phases (128 tokens at batch size 65536, then 512 at
    32768) on 60 billion tokens:

    >>> from lamb_optax import schedules
    >>> schedules.phase_steps_from_tokens(
    ...     total_tokens=60e9, batch_sizes=(65536, 32768),
    ...     sequence_lengths=(128, 512))
    (6438, 358)
  """
  weights = _check_fractions(fractions)
  validation.check_real("total_tokens", total_tokens, positive=True)
  batch_sizes = _check_ints("batch_sizes", batch_sizes)
  sequence_lengths = _check_ints("sequence_lengths", sequence_lengths)
  validation.check_same_length(batch_sizes=batch_sizes,
                               sequence_lengths=sequence_lengths,
                               fractions=weights)
  per_step = [b * n for b, n in zip(batch_sizes, sequence_lengths)]
  return _phase_steps(_exact(total_tokens), per_step, weights)


# ---------------------------------------------------------------------------
# Batch-size scaling rules.


def _batch_ratio(base_batch_size: int, batch_size: int) -> float:
  """``B / B0``, both checked."""
  base_batch_size = _check_int("base_batch_size", base_batch_size, 1)
  return _check_int("batch_size", batch_size, 1) / base_batch_size


def _scaled(base_learning_rate, factor):
  if callable(base_learning_rate):
    return lambda count: factor * base_learning_rate(count)
  return factor * validation.check_real(
      "base_learning_rate", base_learning_rate, positive=False)


def sqrt_scaled(
    base_learning_rate: optax.ScalarOrSchedule,
    base_batch_size: int,
    batch_size: int,
) -> optax.ScalarOrSchedule:
  r"""Square-root scaling of a learning rate with the batch size.

  .. math::

    \eta(B) = \eta(B_0) \sqrt{B / B_0},

  the rule the paper uses for LAMB across batch sizes (with LEGW warmup, see
  :func:`legw`).

  Args:
    base_learning_rate: :math:`\eta(B_0)`, a real number >= 0 or a schedule.
    base_batch_size: :math:`B_0`, an int >= 1.
    batch_size: :math:`B`, an int >= 1.

  Returns:
    A float for a number, an :data:`optax.Schedule` for a schedule.

  Examples:
    >>> from lamb_optax import schedules
    >>> schedules.sqrt_scaled(1e-3, base_batch_size=256, batch_size=4096)
    0.004

  References:
    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020.
  """
  return _scaled(base_learning_rate,
                 math.sqrt(_batch_ratio(base_batch_size, batch_size)))


def linear_scaled(
    base_learning_rate: optax.ScalarOrSchedule,
    base_batch_size: int,
    batch_size: int,
) -> optax.ScalarOrSchedule:
  r"""Linear scaling of a learning rate with the batch size.

  .. math::

    \eta(B) = \eta(B_0) \, B / B_0,

  Goyal et al.'s rule for SGD (with LARS, the paper's ImageNet baselines).

  Args:
    base_learning_rate: :math:`\eta(B_0)`, a real number >= 0 or a schedule.
    base_batch_size: :math:`B_0`, an int >= 1.
    batch_size: :math:`B`, an int >= 1.

  Returns:
    A float for a number, an :data:`optax.Schedule` for a schedule.

  Examples:
    >>> from lamb_optax import schedules
    >>> schedules.linear_scaled(0.1, base_batch_size=256, batch_size=8192)
    3.2

  References:
    Goyal et al., `Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour
    <https://arxiv.org/abs/1706.02677>`_, 2017.
  """
  return _scaled(base_learning_rate, _batch_ratio(base_batch_size, batch_size))
