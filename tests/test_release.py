"""Release metadata: license, floors, version, changelog and the CI workflow.

What the built wheel holds is checked by .ci/check_dist.py on the real build in
CI; here the checker itself is tested on wheels made to be wrong.
"""

from __future__ import annotations

import datetime
import email.message
import hashlib
import importlib.util
import io
import pathlib
import re
import tarfile
import tomllib
import zipfile

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version
import pytest
import yaml

import lamb_optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
CONSTRAINTS = ROOT / ".ci" / "constraints-floors.txt"
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
# sha256 of the Apache License 2.0 as published
# (https://www.apache.org/licenses/LICENSE-2.0.txt).
APACHE_2_SHA256 = (
    "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30")
COPYRIGHT = "Copyright 2026 The lamb_optax Authors"
PLACEHOLDER = "Copyright [yyyy] [name of copyright owner]"


def pins(python: str) -> dict[str, str]:
  """{name: version} of the constraints that apply on `python` ("3.11")."""
  found = {}
  for line in CONSTRAINTS.read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
      req = Requirement(line)
      (spec,) = req.specifier
      assert spec.operator == "==", f"{CONSTRAINTS.name}: not a pin: {line!r}"
      if req.marker is None or req.marker.evaluate({"python_version": python}):
        assert req.name not in found, f"{req.name} pinned twice on {python}"
        found[req.name] = spec.version
  return found


def supported_pythons() -> list[str]:
  minimum = re.fullmatch(r">=3\.(\d+)", PROJECT["requires-python"])[1]
  return [f"3.{m}" for m in range(int(minimum), 14)]


def floors(requirements: list[str]) -> dict[str, str]:
  """{name: version} of each requirement's `>=` bound."""
  found = {}
  for text in requirements:
    req = Requirement(text)
    lower = [s.version for s in req.specifier if s.operator == ">="]
    assert len(lower) == 1, f"{text!r} has no single >= floor"
    found[req.name] = lower[0]
  return found


# ---------------------------------------------------------------------------
# License.


def test_license_is_the_apache_2_text_with_our_copyright():
  text = (ROOT / "LICENSE").read_text()
  assert text.count(COPYRIGHT) == 1
  canonical = text.replace(COPYRIGHT, PLACEHOLDER)
  assert hashlib.sha256(canonical.encode()).hexdigest() == APACHE_2_SHA256


def test_pyproject_declares_apache_2_as_an_spdx_expression():
  assert PROJECT["license"] == "Apache-2.0"
  assert PROJECT["license-files"] == ["LICENSE"]
  # PEP 639: no license classifier next to the expression (setuptools
  # refuses the pair), and a backend that writes License-Expression.
  assert not [c for c in PROJECT["classifiers"] if c.startswith("License ::")]
  (setuptools,) = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]
                   if Requirement(r).name == "setuptools"]
  assert Version("77") in setuptools.specifier
  assert not setuptools.specifier.contains(Version("76.1"))


def test_readme_ends_with_a_license_section():
  readme = (ROOT / "README.md").read_text()
  sections = re.findall(r"^## (.+)$", readme, re.M)
  assert sections[-1] == "License"
  body = readme.split("\n## License\n", 1)[1]
  assert "Apache" in body and "2.0" in body and "LICENSE" in body


def test_citation_has_license_and_version():
  citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
  assert citation["license"] == "Apache-2.0"
  assert citation["version"] == lamb_optax.__version__
  assert citation["cff-version"] == "1.2.0"


# ---------------------------------------------------------------------------
# Version and changelog.


def test_version_has_one_source():
  assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
  attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
  assert attr == "lamb_optax.__version__"
  assert lamb_optax.__version__ == "0.1.0"


def test_changelog_keeps_a_changelog_and_has_this_version():
  text = (ROOT / "CHANGELOG.md").read_text()
  assert text.startswith("# Changelog\n")
  assert "keepachangelog.com" in text
  headings = re.findall(r"^## \[([^\]]+)\](.*)$", text, re.M)
  assert headings[0] == ("Unreleased", "")
  released = headings[1:]
  assert released, "no released version"
  versions = []
  for version, rest in released:
    date = re.fullmatch(r" - (\d{4}-\d{2}-\d{2})", rest)
    assert date, f"## [{version}] needs ' - YYYY-MM-DD', has {rest!r}"
    datetime.date.fromisoformat(date[1])
    versions.append(Version(version))
  assert versions == sorted(versions, reverse=True), "newest first"
  assert released[0][0] == lamb_optax.__version__
  # The floors it states are the declared ones.
  declared = {**floors(PROJECT["dependencies"]),
              "flax": floors(PROJECT["optional-dependencies"]["test"])["flax"]}
  flat = " ".join(text.split())
  for name, version in declared.items():
    assert f"{name} >= {version}" in flat, (name, version)
  for kind in re.findall(r"^### (.+)$", text, re.M):
    assert kind in {"Added", "Changed", "Deprecated", "Removed", "Fixed",
                    "Security"}, kind


# ---------------------------------------------------------------------------
# Floors.


def test_floors_equal_the_constraints_pins():
  runtime = floors(PROJECT["dependencies"])
  test = floors(PROJECT["optional-dependencies"]["test"])
  declared = {**runtime, "flax": test["flax"]}
  oldest = supported_pythons()[0]
  for python in supported_pythons():
    pinned = pins(python)
    # jax pins its own jaxlib; the constraints file says which.
    assert pinned.pop("jaxlib") == pinned["jax"], python
    assert set(pinned) == set(declared), python
    for name, version in pinned.items():
      if python == oldest:  # the floor itself, where it has wheels
        assert version == declared[name], (python, name)
      else:  # a later Python may need a later release (wheels)
        assert Version(version) >= Version(declared[name]), (python, name)
  # Every extra that names a pinned package asks for at least its floor.
  for extra, requirements in PROJECT["optional-dependencies"].items():
    for name, version in floors(requirements).items():
      if name in declared:
        assert Version(version) >= Version(declared[name]), (extra, name)


def test_requires_python_agrees_with_classifiers_and_workflow():
  minimum = Version(re.fullmatch(r">=(\d+\.\d+)",
                                 PROJECT["requires-python"])[1])
  listed = sorted(Version(c.rsplit(" ", 1)[1]) for c in PROJECT["classifiers"]
                  if re.fullmatch(r"Programming Language :: Python :: 3\.\d+",
                                  c))
  assert listed[0] == minimum
  assert listed == [Version(f"3.{m}") for m in range(minimum.minor,
                                                     listed[-1].minor + 1)]
  matrix = [Version(v) for v in _job()["strategy"]["matrix"]["python-version"]]
  assert [v for v in matrix if v >= minimum] == listed
  # Below the minimum, .ci/run checks that pip refuses the wheel.
  run = (ROOT / ".ci" / "run").read_text()
  assert "requires a different Python" in run
  assert SpecifierSet(PROJECT["requires-python"]).contains("3.10") is False


def test_floors_run_leaves_out_exactly_the_example_and_repository_tests():
  script = (ROOT / ".ci" / "floors.sh").read_text()
  listed = re.search(r"NOT_LIBRARY_TESTS=\((.*?)\)", script, re.S)[1].split()
  for path in listed:
    assert (ROOT / path).is_file(), f"floors.sh leaves out missing {path}"
  pattern = re.search(r'^EXAMPLES_PATTERN="(.*)"$', script, re.M)[1]
  pattern = re.compile(pattern.replace('\\"', '"'))
  reads_examples = {str(p.relative_to(ROOT)) for p in
                    (ROOT / "tests").glob("test_*.py")
                    if pattern.search(p.read_text())}
  # The tests the library's floors cannot promise, no more: a library test
  # that started reading examples/ would be left out silently, and fails here.
  left_out = set(listed) | reads_examples
  known = {"tests/test_bert_example.py", "tests/test_bert_input_pipeline.py",
           "tests/test_quickstart.py",
           "tests/test_benchmark_smoke.py", "tests/test_readme.py",
           "tests/test_docs.py", "tests/test_release.py"}
  landing = {"tests/test_bert_utils.py",  # examples/bert's utils and metrics
             "tests/test_batch_scaling.py",  # examples/batch_scaling
             "tests/test_noise_scale.py",  # examples/batch_scaling
             "tests/test_bigram_probe.py",  # examples/batch_scaling
             "tests/test_reproducibility.py",  # examples/batch_scaling
             "tests/test_tpu_compile.py"}  # examples/bert on TPU topologies
  assert known <= left_out <= known | landing, sorted(left_out)
  # The README quickstart it runs exists under that name.
  node = re.search(r"tests/test_readme\.py::(\w+)", script)[1]
  assert f"def {node}(" in (ROOT / "tests" / "test_readme.py").read_text()


# ---------------------------------------------------------------------------
# CI.


def _workflow() -> dict:
  return yaml.safe_load(WORKFLOW.read_text())


def _job() -> dict:
  (job,) = _workflow()["jobs"].values()
  return job


def test_workflow_runs_ci_script_on_python_3_10_to_3_13():
  workflow = _workflow()
  triggers = workflow.get("on", workflow.get(True))  # YAML 1.1: on == True
  assert {"push", "pull_request"} <= set(triggers)
  job = _job()
  assert job["runs-on"].startswith("ubuntu")
  assert 0 < job["timeout-minutes"] <= 30
  assert job["strategy"]["matrix"]["python-version"] == [
      "3.10", "3.11", "3.12", "3.13"]
  assert job["strategy"]["fail-fast"] is False
  steps = job["steps"]
  assert steps[0]["uses"].startswith("actions/checkout@")
  setup = [s for s in steps if s.get("uses", "").startswith(
      "actions/setup-python@")]
  assert len(setup) == 1
  assert setup[0]["with"]["python-version"] == "${{ matrix.python-version }}"
  runs = [s for s in steps if "run" in s]
  assert [s["run"].strip() for s in runs] == [".ci/run"]
  assert steps.index(setup[0]) < steps.index(runs[0])
  assert runs[0]["env"]["PYTHON"] == "python"


def test_ci_script_runs_every_stage_in_order():
  run = "\n".join(line for line in (ROOT / ".ci" / "run").read_text()
                  .splitlines() if not line.lstrip().startswith("#"))
  stages = ["python -m pytest -n 2 -q", "python -m build",
            "python .ci/check_dist.py", ".ci/floors.sh",
            "python -m sphinx -W"]
  positions = [run.find(stage) for stage in stages]
  assert -1 not in positions, dict(zip(stages, positions))
  assert positions == sorted(positions)
  assert '-e ".[docs]"' in run
  floors_sh = (ROOT / ".ci" / "floors.sh").read_text()
  assert "constraints-floors.txt" in floors_sh
  assert "--doctest-modules --pyargs lamb_optax" in floors_sh
  assert 'site in where.parents' in floors_sh


# ---------------------------------------------------------------------------
# The wheel checker, on wheels made to be wrong.


def _check_dist():
  spec = importlib.util.spec_from_file_location(
      "check_dist", ROOT / ".ci" / "check_dist.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _fake_dist(tmp_path, *, py_typed=True, license_expression="Apache-2.0",
               extra_top=None):
  version = lamb_optax.__version__
  info = f"lamb_optax-{version}.dist-info"
  meta = email.message.Message()
  meta["Metadata-Version"] = "2.4"
  meta["Name"] = "lamb_optax"
  meta["Version"] = version
  meta["License-Expression"] = license_expression
  meta["License-File"] = "LICENSE"
  meta["Requires-Python"] = PROJECT["requires-python"]
  files = {"lamb_optax/__init__.py": "", f"{info}/METADATA": meta.as_string(),
           f"{info}/licenses/LICENSE": (ROOT / "LICENSE").read_text()}
  if py_typed:
    files["lamb_optax/py.typed"] = ""
  if extra_top:
    files[f"{extra_top}/__init__.py"] = ""
  with zipfile.ZipFile(tmp_path / f"lamb_optax-{version}-py3-none-any.whl",
                       "w") as z:
    for name, text in files.items():
      z.writestr(name, text)
  with tarfile.open(tmp_path / f"lamb_optax-{version}.tar.gz", "w:gz") as t:
    for name in ("LICENSE", "README.md", "pyproject.toml",
                 "lamb_optax/__init__.py", "lamb_optax/py.typed"):
      data = (ROOT / name).read_bytes()
      entry = tarfile.TarInfo(f"lamb_optax-{version}/{name}")
      entry.size = len(data)
      t.addfile(entry, io.BytesIO(data))
  return tmp_path


def test_check_dist_accepts_a_complete_dist(tmp_path):
  assert _check_dist().problems(_fake_dist(tmp_path)) == []


@pytest.mark.parametrize("broken, message", [
    (dict(py_typed=False), "no lamb_optax/py.typed"),
    (dict(license_expression="MIT"), "License-Expression is 'MIT'"),
    (dict(extra_top="tests"), "top-level entries ['lamb_optax', 'tests']"),
])
def test_check_dist_catches(tmp_path, broken, message):
  found = _check_dist().problems(_fake_dist(tmp_path, **broken))
  assert len(found) == 1 and message in found[0], found
