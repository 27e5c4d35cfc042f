"""Checks the built sdist and wheel: `python .ci/check_dist.py DIST_DIR`.

The wheel must hold the package with its `py.typed` marker and nothing else at
the top level, the LICENSE, and metadata that say Apache-2.0, the version of
`lamb_optax.__version__` and pyproject's requires-python; the sdist must hold
what it takes to build that wheel again.
"""

from __future__ import annotations

import email
import pathlib
import re
import sys
import tarfile
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _version() -> str:
  text = (ROOT / "lamb_optax" / "__init__.py").read_text()
  return re.search(r'^__version__ = "([^"]+)"$', text, re.M).group(1)


def _requires_python() -> str:
  text = (ROOT / "pyproject.toml").read_text()
  return re.search(r'^requires-python = "([^"]+)"$', text, re.M).group(1)


def problems(dist: pathlib.Path) -> list[str]:
  """What is wrong with the sdist and wheel in `dist` (empty if nothing)."""
  found = []
  version = _version()
  wheels = sorted(dist.glob("lamb_optax-*.whl"))
  sdists = sorted(dist.glob("lamb_optax-*.tar.gz"))
  if [w.name for w in wheels] != [f"lamb_optax-{version}-py3-none-any.whl"]:
    found.append(f"want one wheel lamb_optax-{version}-py3-none-any.whl, "
                 f"found {[w.name for w in wheels]}")
  if [s.name for s in sdists] != [f"lamb_optax-{version}.tar.gz"]:
    found.append(f"want one sdist lamb_optax-{version}.tar.gz, found "
                 f"{[s.name for s in sdists]}")
  license_text = (ROOT / "LICENSE").read_text()
  for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
      names = set(z.namelist())
      info = f"lamb_optax-{version}.dist-info"
      top = {n.split("/")[0] for n in names} - {info}
      if top != {"lamb_optax"}:
        found.append(f"{wheel.name}: top-level entries {sorted(top)}, want "
                     "only lamb_optax")
      for needed in ("lamb_optax/__init__.py", "lamb_optax/py.typed",
                     f"{info}/METADATA", f"{info}/licenses/LICENSE"):
        if needed not in names:
          found.append(f"{wheel.name}: no {needed}")
      if f"{info}/licenses/LICENSE" in names and z.read(
          f"{info}/licenses/LICENSE").decode() != license_text:
        found.append(f"{wheel.name}: its LICENSE differs from LICENSE")
      if f"{info}/METADATA" in names:
        meta = email.message_from_bytes(z.read(f"{info}/METADATA"))
        want = {"Name": "lamb_optax", "Version": version,
                "License-Expression": "Apache-2.0",
                "Requires-Python": _requires_python()}
        for key, value in want.items():
          if meta.get(key) != value:
            found.append(f"{wheel.name}: METADATA {key} is {meta.get(key)!r},"
                         f" want {value!r}")
        if meta.get("License-File") != "LICENSE":
          found.append(f"{wheel.name}: METADATA License-File is "
                       f"{meta.get('License-File')!r}, want 'LICENSE'")
  for sdist in sdists:
    with tarfile.open(sdist) as t:
      names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for needed in ("LICENSE", "README.md", "pyproject.toml",
                   "lamb_optax/__init__.py", "lamb_optax/py.typed"):
      if needed not in names:
        found.append(f"{sdist.name}: no {needed}")
  return found


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    print(__doc__, file=sys.stderr)
    return 2
  found = problems(pathlib.Path(argv[1]))
  for problem in found:
    print(f"check_dist: {problem}", file=sys.stderr)
  if not found:
    print(f"check_dist: sdist and wheel of lamb_optax {_version()} are "
          "complete")
  return 1 if found else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
