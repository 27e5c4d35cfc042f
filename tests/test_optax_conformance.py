"""optax's own test cases of lamb, lars, scale_by_adam and scale_by_trust_ratio
pass on lamb_optax: the conformance suite of a drop-in (optax_conformance.py
says how the cases are found and substituted, and what the adapter changes).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import optax_conformance as conformance

IN_PROCESS = [module for module in conformance.SELECTION
              if module != conformance.SHARDING_MODULE]
CASES = [(module, case) for module in IN_PROCESS
         for case in conformance.cases(module)]
TIMEOUT_S = 300


def _key(module, case):
  return f"{module}::{case}"


@pytest.mark.parametrize(
    "module,case",
    [pair for pair in CASES if _key(*pair) not in conformance.EXCLUDED],
    ids=[_key(*pair) for pair in CASES
         if _key(*pair) not in conformance.EXCLUDED])
def test_optax_case_passes(module, case):
  outcome, detail = conformance.run(module, case)
  assert outcome == "passed", (
      f"{_key(module, case)} {conformance.describe(module, case)} "
      f"{outcome}:\n{detail}")


def test_every_module_contributes_cases_and_exclusions_are_real():
  """A selection that stopped matching (optax renamed its cases) would run
  nothing and pass: each module must give cases, and every exclusion must
  name a selected case and say why."""
  for module in IN_PROCESS:
    assert conformance.cases(module), module
  selected = {_key(*pair) for pair in CASES}
  for key, reason in conformance.EXCLUDED.items():
    assert key in selected or key.startswith(conformance.SHARDING_MODULE), key
    assert reason.strip(), key


def test_selection_covers_every_case_that_names_our_functions():
  """Every parametrized case of optax's modules whose parameters name lamb,
  lars, scale_by_adam or scale_by_trust_ratio is selected."""
  names = re.compile(r"'(lamb|lars)'|function (scale_by_adam|"
                     r"scale_by_trust_ratio|lamb|lars) ")
  for module in IN_PROCESS:
    selected = set(conformance.cases(module))
    loaded = conformance.load(module)
    for class_name, cls in vars(loaded).items():
      for method, params in getattr(cls, "_test_params_reprs", {}).items():
        if names.search(params):
          assert f"{class_name}.{method}" in selected, (module, method,
                                                        params)


def test_adapter_substitutes_ours_and_restores_optax():
  import optax  # pylint: disable=g-import-not-at-top
  import lamb_optax  # pylint: disable=g-import-not-at-top
  from optax._src import transform  # pylint: disable=g-import-not-at-top
  original = optax.lamb, transform.scale_by_adam
  with conformance.substituted():
    assert optax.lamb is lamb_optax.lamb
    assert transform.scale_by_adam is lamb_optax.scale_by_adam
    assert optax.lars.func is lamb_optax.lars
  assert (optax.lamb, transform.scale_by_adam) == original


@pytest.fixture(scope="module")
def sharding_outcomes(tmp_path_factory):
  out = tmp_path_factory.mktemp("optax_sharding") / "outcomes.json"
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  try:
    proc = subprocess.run([sys.executable, conformance.__file__, str(out)],
                          env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=False)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"optax_conformance.py ran past {TIMEOUT_S} s:\n{e.stderr}")
  if proc.returncode:
    pytest.fail(f"optax_conformance.py failed (exit {proc.returncode}):\n"
                f"{proc.stderr[-4000:]}")
  return json.loads(out.read_text())


def test_optax_sharding_cases_pass_on_eight_devices(sharding_outcomes):
  """sharding_test.py's cases, including those optax skips on jax 0.10 by
  comparing version strings, on 8 simulated devices."""
  assert sharding_outcomes["device_count"] == 8
  outcomes = {case: outcome for case, outcome
              in sharding_outcomes["outcomes"].items()
              if _key(conformance.SHARDING_MODULE, case)
              not in conformance.EXCLUDED}
  assert outcomes, "no sharding case selected"
  assert any("sharding_type" in case for case in outcomes), outcomes
  failed = {case: detail for case, (outcome, detail) in outcomes.items()
            if outcome != "passed"}
  assert not failed, "\n\n".join(f"{case}: {detail}"
                                 for case, detail in failed.items())
