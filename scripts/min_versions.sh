#!/usr/bin/env bash
# The minimum-versions environment (default .venv-min): every runtime requirement of settings.ini that has a floor, installed at
# exactly that floor, the others as pip resolves them beside those pins; then the `test` extra and the project without its
# dependencies. `make test-min` runs the fast tests in it: a floor too low for the code fails there, and is raised.
# torch: the CPU build of the floor, from a wheel pip finds locally or from the PyTorch CPU index (TORCH_INDEX_URL). Where neither
# has it, the CPU build scripts/setup_venv.sh installs (torch 2.13.0) stands in, and the run says so: PyPI's own torch wheels are
# CUDA builds of several GB, which this script never asks PyPI for.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-min}
py=${PYTHON:-python3}
index=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
fallback=${TORCH_FALLBACK:-2.13.0}
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
echo '*' > "$venv/.gitignore"   # an environment, never committed
python="$venv/bin/python"
pip="$python -m pip"
$pip install -q --upgrade pip packaging

# `name==floor` for each runtime requirement with a floor and the bare name for the others (`requirements`); an extra as written.
read_settings() {
  "$python" - "$1" <<'EOF'
import shlex, sys
from configparser import ConfigParser
from packaging.requirements import Requirement
from packaging.version import Version
cfg = ConfigParser(delimiters=['=']); cfg.read('settings.ini', encoding='utf-8'); cfg = cfg['DEFAULT']
for r in map(Requirement, shlex.split(cfg.get(sys.argv[1], ''))):
    floors = [s.version for s in r.specifier if s.operator in ('>=', '==', '~=')]
    print(f"{r.name}=={max(floors, key=Version)}" if floors and sys.argv[1] == 'requirements' else str(r))
EOF
}
# Whether the installed `name` is release `version` (2.5 is 2.5.0; a local label such as +cpu is ignored).
installed_is() {
  "$python" -c 'import sys; from importlib.metadata import version; from packaging.version import Version
try: sys.exit(Version(Version(version(sys.argv[1])).public) != Version(sys.argv[2]))
except Exception: sys.exit(1)' "$1" "$2"
}
pins=$(read_settings requirements)
tests=$(read_settings test_requirements)
torch_floor=$(sed -n 's/^torch==//p' <<<"$pins")

torch_now=$torch_floor
if ! installed_is torch "$torch_floor"; then
  # torch alone, without its dependencies (those come from PyPI with the pins below): a local wheel, else the CPU index only.
  $pip install -q --no-deps --no-index "torch==$torch_floor" 2>/dev/null ||
  $pip install -q --no-deps --retries 1 --timeout 20 --index-url "$index" "torch==$torch_floor" 2>/dev/null || {
    torch_now=$fallback
    installed_is torch "$fallback" || $pip install -q --no-deps --no-index "torch==$fallback" ||
      { echo "error: no CPU build of torch $torch_floor (local wheel or $index) nor of $fallback: set TORCH_INDEX_URL" >&2; exit 1; }; }
fi
pins=$(sed "s/^torch==.*/torch==$torch_now/" <<<"$pins")

# One resolution for all: pip refuses floors that contradict each other, or a pinned release's own requirements.
# shellcheck disable=SC2086
$pip install -q $pins $tests
$pip install -q --no-deps -e .
$pip check
for pin in $pins; do
  case $pin in *==*) installed_is "${pin%%==*}" "${pin#*==}" || { echo "error: ${pin%%==*} is not at its floor ${pin#*==}" >&2; exit 1; };; esac
done
echo "min-versions: $(grep '==' <<<"$pins" | tr '\n' ' ')"
[ "$torch_now" = "$torch_floor" ] ||
  echo "min-versions: torch $torch_now stands in for the floor $torch_floor: no CPU build of $torch_floor here (set TORCH_INDEX_URL)"
