#!/usr/bin/env bash
# The declared dependency floors, checked: install the built wheel with exactly
# the versions of .ci/constraints-floors.txt into a clean virtualenv outside the
# repository, then, from a directory outside the repository, run the library
# tests, the README quickstart and the installed package's doctests.
#
#   .ci/floors.sh [WHEEL] [CONSTRAINTS]
#
# WHEEL defaults to a wheel built here with `pip wheel`; CONSTRAINTS defaults
# to .ci/constraints-floors.txt. PYTHON picks the interpreter (default
# python3). Set FLOORS_KEEP=1 to keep the temporary directory.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEEL="${1:-}"
CONSTRAINTS="$(realpath "${2:-$ROOT/.ci/constraints-floors.txt}")"

# Left out: the tests of the repository's own files (README, docs, release
# metadata) and of the benchmarks, and every test that reads examples/ (found
# by what it reads, so that a new example test is left out too). The examples
# need the examples extra; they are tested with the newest releases only
# (.ci/run, step 1).
NOT_LIBRARY_TESTS=(
  tests/test_readme.py
  tests/test_docs.py
  tests/test_release.py
  tests/test_benchmark_smoke.py
)
EXAMPLES_PATTERN="[\"']examples[\"']|examples/"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/lamb_optax_floors.XXXXXX")"
if [ "${FLOORS_KEEP:-0}" != 1 ]; then trap 'rm -rf "$WORK"' EXIT; fi
echo "floors: working in $WORK with $($PYTHON --version)"

if [ -z "$WHEEL" ]; then
  "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$WORK/dist" "$ROOT"
  WHEEL="$(ls "$WORK"/dist/lamb_optax-*.whl)"
fi
WHEEL="$(realpath "$WHEEL")"

"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install --quiet --upgrade pip
"$VPY" -m pip install --quiet -c "$CONSTRAINTS" "lamb_optax[test] @ file://$WHEEL"

# Every pin of the constraints file that applies here is what got installed.
"$VPY" - "$CONSTRAINTS" <<'EOF'
import importlib.metadata as md, sys
from packaging.requirements import Requirement
pins = {}
for line in open(sys.argv[1]):
  line = line.split("#")[0].strip()
  if line:
    req = Requirement(line)
    (spec,) = req.specifier
    assert spec.operator == "==", f"not an exact pin: {line!r}"
    if req.marker is None or req.marker.evaluate():
      pins[req.name] = spec.version
bad = {n: (v, md.version(n)) for n, v in pins.items() if md.version(n) != v}
assert not bad, f"installed versions differ from the floors (want, got): {bad}"
print("floors:", " ".join(f"{n}=={v}" for n, v in pins.items()))
EOF

# A copy of the repository without the package, so that only the installed
# wheel can be imported.
mkdir "$WORK/src"
tar -C "$ROOT" --exclude=./lamb_optax --exclude=./.git --exclude='./.venv*' \
  --exclude=./dist --exclude=./build --exclude='*.egg-info' \
  --exclude=./docs/_build --exclude=__pycache__ -cf - . | tar -C "$WORK/src" -xf -
cd "$WORK/src"
"$VPY" - <<'EOF'
import pathlib, sysconfig, lamb_optax
site = pathlib.Path(sysconfig.get_paths()["purelib"]).resolve()
where = pathlib.Path(lamb_optax.__file__).resolve()
assert site in where.parents, f"lamb_optax imported from {where}, not {site}"
assert (where.parent / "py.typed").is_file(), "py.typed is not installed"
print("floors: lamb_optax", lamb_optax.__version__, "from", where.parent)
EOF

ignores=()
for t in "${NOT_LIBRARY_TESTS[@]}"; do ignores+=("--ignore=$t"); done
while IFS= read -r t; do ignores+=("--ignore=$t"); done \
  < <(grep -l -E "$EXAMPLES_PATTERN" tests/test_*.py)
echo "floors: leaving out ${ignores[*]//--ignore=/}"
status=0
# pytest exit 5 (nothing collected) is a failure too.
"$VPY" -m pytest -n 2 -q tests "${ignores[@]}" || status=$?
if [ "$status" = 0 ]; then
  "$VPY" -m pytest -q -p no:cacheprovider \
    "tests/test_readme.py::test_quickstart_trains_and_reports_ratios" || status=$?
fi
if [ "$status" = 0 ]; then
  "$VPY" -m pytest -q --doctest-modules --pyargs lamb_optax || status=$?
fi
if [ "$status" = 5 ]; then echo "floors: pytest collected nothing" >&2; fi
exit "$status"
