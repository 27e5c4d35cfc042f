"""optax's own test cases of lamb, lars, scale_by_adam and scale_by_trust_ratio,
run against lamb_optax.

The cases come from the test modules that ship inside the installed optax
package (nothing is copied): ``optax/_src/alias_test.py``,
``transform_test.py``, ``float64_test.py``, ``sharding_test.py`` and
``optax/contrib/_common_test.py``. Each module is loaded under a private
name while :func:`substituted` puts lamb_optax's functions where optax's
stand (``optax.lamb``, ``optax._src.alias.lamb``,
``optax._src.transform.scale_by_adam``, ...), and every selected case runs
inside the same substitution, so that the names a test looks up at import
and at run time are ours. A case is selected when its parameters name one
of the four functions (:data:`SELECTION`); :data:`EXCLUDED` lists the
selected cases that are not run, each with its reason.

``python tests/optax_conformance.py OUT.json`` runs the selected cases of
``sharding_test.py`` with 8 simulated CPU devices (that module sets
``XLA_FLAGS`` when imported, and its cases need 8 devices) and writes their
outcomes as JSON; ``tests/test_optax_conformance.py`` runs it in a
subprocess and the other modules' cases in its own process.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import pathlib
import re
import sys
import types
import unittest

if __name__ == "__main__":  # Before jax initialises its backend.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")

import jax
import optax
from optax._src import alias
from optax._src import transform
from packaging.version import Version

import lamb_optax

OPTAX_DIR = pathlib.Path(optax.__file__).resolve().parent

# The adapter: what stands in for each optax name. Every line is a
# difference a user of optax meets.
SUBSTITUTES = {
    # Same positional arguments, defaults and state kinds as optax's.
    "lamb": lamb_optax.lamb,
    # Algorithm 1 of the paper (optax implements the classic LARS), with
    # optax's positional arguments; the default trust coefficient is the
    # paper's 1, optax's is 1e-3. At optax's test learning rate (1.0) a
    # trust coefficient of 1 moves every layer by its own norm at every step,
    # which cannot settle on a minimum: optax's coefficient is passed.
    "lars": functools.partial(lamb_optax.lars, trust_coefficient=1e-3),
    # optax's positional arguments and defaults (eps=1e-8).
    "scale_by_adam": lamb_optax.scale_by_adam,
    # optax's positional arguments (min_norm, trust_coefficient, eps) and
    # defaults.
    "scale_by_trust_ratio": lamb_optax.scale_by_trust_ratio,
}
# Where optax's test modules find those names, at import or at run time.
_HOMES = {optax: ("lamb", "lars", "scale_by_adam", "scale_by_trust_ratio"),
          alias: ("lamb", "lars"),
          transform: ("scale_by_adam", "scale_by_trust_ratio")}

# Module (relative to the optax package) -> regex over "<test method>
# <parameters>": the cases that exercise one of the four functions.
SELECTION = {
    "_src/alias_test.py": r"opt_name='(lamb|lars)'",
    "_src/transform_test.py": r"^test_scalers_(adam|trust_ratio) |"
                              r"^test_rms_match_adam ",
    "_src/float64_test.py": r"^test_mixed_dtype_input_outputs_"
                            r"(scale_by_adam|scale_by_trust_ratio|lamb) ",
    "_src/sharding_test.py": r"_(lamb|lars) ",
    "contrib/_common_test.py": r"opt_name='(lamb|lars)'",
}
SHARDING_MODULE = "_src/sharding_test.py"

# Selected cases that are not run: "<module>::<class>.<method>" -> reason.
EXCLUDED = {
    "_src/transform_test.py::TransformTest.test_rms_match_adam": (
        "It compares scale_by_adam(b1=0) with optax.scale_by_rms to 1e-6 "
        "relative. Our 1 - b2**t is float32-accurate (expm1 of t log b2 "
        "taken in double precision); optax rounds b2 = 0.999 to float32 "
        "first, 1.3e-5 off at t = 1, so scale_by_rms is 6e-6 off "
        "(tests/test_adam.py::test_bias_correction_is_float32_accurate)."),
}


@contextlib.contextmanager
def substituted():
  """lamb_optax's functions in optax's places, restored afterwards."""
  saved = {(home, name): getattr(home, name)
           for home, names in _HOMES.items() for name in names}
  try:
    for home, name in saved:
      setattr(home, name, SUBSTITUTES[name])
    yield
  finally:
    for (home, name), value in saved.items():
      setattr(home, name, value)


def _placeholder_sklearn() -> None:
  """alias_test.py imports scikit-learn for its L-BFGS cases, which are not
  selected. Where scikit-learn is not installed a placeholder module stands
  in, so that the module imports; a selected case that used it would fail
  with an AttributeError."""
  try:
    import sklearn  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    placeholder = types.ModuleType("sklearn")
    placeholder.datasets = types.ModuleType("sklearn.datasets")
    placeholder.linear_model = types.ModuleType("sklearn.linear_model")
    sys.modules["sklearn"] = placeholder


class _Version(str):
  """A version string that compares as a version, not character by
  character: sharding_test.py skips itself when ``jax.__version__ <
  '0.7.2'``, which as strings holds for '0.10.2'."""

  def __lt__(self, other):
    return Version(self) < Version(other)


class _JaxWithComparableVersion(types.ModuleType):
  """jax, as sharding_test.py sees it, with a :class:`_Version`."""

  def __init__(self):
    super().__init__("jax")
    self.__version__ = _Version(jax.__version__)

  def __getattr__(self, name):
    return getattr(jax, name)


@functools.cache
def load(module: str) -> types.ModuleType:
  """optax's test module ``module``, imported with our functions in place."""
  _placeholder_sklearn()
  name = "optax_conformance_" + re.sub(r"\W", "_", module)
  spec = importlib.util.spec_from_file_location(name, OPTAX_DIR / module)
  loaded = importlib.util.module_from_spec(spec)
  xla_flags = os.environ.get("XLA_FLAGS")
  with substituted():
    spec.loader.exec_module(loaded)
  if module == SHARDING_MODULE:
    # It sets XLA_FLAGS for 8 devices at import: not for the caller's
    # process, which runs it in a subprocess that sets them itself.
    if xla_flags is None:
      os.environ.pop("XLA_FLAGS", None)
    else:
      os.environ["XLA_FLAGS"] = xla_flags
    loaded.jax = _JaxWithComparableVersion()
  return loaded


def cases(module: str) -> list[str]:
  """The selected cases of ``module``: ``"<class>.<method>"``, sorted."""
  pattern = re.compile(SELECTION[module])
  found = []
  for class_name, cls in sorted(vars(load(module)).items()):
    if not (isinstance(cls, type) and issubclass(cls, unittest.TestCase)):
      continue
    reprs = getattr(cls, "_test_params_reprs", {})
    for method in sorted(unittest.TestLoader().getTestCaseNames(cls)):
      if pattern.search(f"{method} {reprs.get(method, '')}"):
        found.append(f"{class_name}.{method}")
  return found


def describe(module: str, case: str) -> str:
  """A case's parameters, as absl prints them."""
  class_name, method = case.split(".")
  cls = getattr(load(module), class_name)
  return getattr(cls, "_test_params_reprs", {}).get(method, "")


def run(module: str, case: str) -> tuple[str, str]:
  """Runs one case with our functions in place: ``(outcome, detail)``, the
  outcome one of "passed", "failed", "skipped"."""
  class_name, method = case.split(".")
  test = getattr(load(module), class_name)(method)
  result = unittest.TestResult()
  x64 = jax.config.jax_enable_x64  # float64_test.py sets it, and a failing
  try:                             # case would not reset it.
    with substituted():
      test.run(result)
  finally:
    jax.config.update("jax_enable_x64", x64)
  problems = result.failures + result.errors
  if problems:
    return "failed", "\n".join(trace for _, trace in problems)
  if result.skipped:
    return "skipped", "; ".join(reason for _, reason in result.skipped)
  return "passed", ""


def main(out: str) -> None:
  outcomes = {}
  for case in cases(SHARDING_MODULE):
    outcomes[case] = run(SHARDING_MODULE, case)
  pathlib.Path(out).write_text(json.dumps(
      {"device_count": jax.device_count(), "outcomes": outcomes}, indent=1))


if __name__ == "__main__":
  main(sys.argv[1])
