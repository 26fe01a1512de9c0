"Every notebook runs through `nbdev_test`, one pytest test per notebook."
import os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT/'nbs').glob('*.ipynb') if not p.name.startswith('_'))

@pytest.mark.parametrize('notebook', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook(notebook):
    "The notebook's cells (less those flagged `slow` or `cuda`) run without error and their assertions hold."
    nbdev_test = Path(sys.executable).parent/'nbdev_test'
    res = subprocess.run([str(nbdev_test), '--path', str(notebook), '--n_workers', '0'],
                         cwd=ROOT/'nbs', capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, f"{notebook.name} failed:\n{res.stdout[-4000:]}\n{res.stderr[-8000:]}"
