#!/usr/bin/env bash
# The test command: nbdev sync checks, every notebook through nbdev_test, and pytest.
# pytest runs each notebook as one test (tests/test_notebooks.py calls nbdev_test on it),
# so its closing line counts notebooks, sync checks and the tests in tests/ together.
set -uo pipefail
cd "$(dirname "$0")/.."
export MPLBACKEND=Agg PYTHONHASHSEED=0
if [ -z "${LUNGSEG_SAMPLE_DIR:-}" ] && [ -d ../shared/data/lidc-sample ]; then
  export LUNGSEG_SAMPLE_DIR="$(cd ../shared/data/lidc-sample && pwd)"
fi
[ -n "${LUNGSEG_SAMPLE_DIR:-}" ] || echo "note: LUNGSEG_SAMPLE_DIR is not set: tests on the real LIDC-IDRI sample will be skipped (see README)"
# The tests' files (phantom cohorts, runs, predictions: GBs) go in a folder of their own, removed when pytest ends, so that a
# second run (`make test-min`) and its environment find the disk as the first found it.
base=$(mktemp -d "${TMPDIR:-/tmp}/lungseg-tests.XXXXXX")
python -m pytest tests -p no:cacheprovider -rs --basetemp "$base" "$@"
rc=$?
rm -rf "$base"
# pytest exits 5 when it collected nothing: that is a failure here, not a pass.
[ $rc -eq 5 ] && { echo "0 passed, 1 failed"; exit 1; }
exit $rc
