"Notebooks and library stay in sync: `nbdev_clean` and `nbdev_export` leave no diff."
import shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]

def _git_diff(*paths):
    "Modified and untracked files under `paths`, as git sees them."
    return subprocess.run(['git', 'status', '--porcelain', '--untracked-files=all', '--', *paths], cwd=ROOT, capture_output=True, text=True).stdout

def _in_git():
    return shutil.which('git') and subprocess.run(['git', 'rev-parse', '--git-dir'], cwd=ROOT, capture_output=True).returncode == 0

@pytest.mark.skipif(not _in_git(), reason="not a git checkout: the sync checks compare against git")
@pytest.mark.parametrize('tool,paths', [('nbdev_clean', ['nbs']), ('nbdev_export', ['lung_tumor_seg'])])
def test_nbdev_leaves_no_diff(tool, paths):
    "Running the nbdev tool over the checkout changes no tracked file."
    before = _git_diff(*paths)
    res = subprocess.run([str(Path(sys.executable).parent/tool)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    after = _git_diff(*paths)
    assert after == before, f"{tool} changed files: run `{tool}` and commit.\n{after}"

def test_readme_matches_index():
    "README.md is generated from nbs/index.ipynb (`python scripts/readme.py`)."
    res = subprocess.run([sys.executable, 'scripts/readme.py', '--check'], cwd=ROOT)
    assert res.returncode == 0, "README.md is out of date: run `python scripts/readme.py` and commit"
