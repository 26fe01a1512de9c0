"Every notebook runs through `nbdev_test`, one pytest test per notebook; a figure that fails to draw fails its notebook."
import os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT/'nbs').glob('*.ipynb') if not p.name.startswith('_'))

# `nbdev_test` in-process, with one change: IPython's display machinery catches an exception raised while a figure is rendered
# to PNG (a bad label, a failing artist), prints it and goes on, so a broken drawing cell would pass. Rendering goes through
# `IPython.core.pylabtools.print_figure`; the wrapper records each failure and the run then fails, naming it.
RUNNER = """
import sys, IPython.core.pylabtools as pylabtools
failed = []
_print_figure = pylabtools.print_figure
def print_figure(fig, *args, **kwargs):
    try: return _print_figure(fig, *args, **kwargs)
    except Exception as e: failed.append(f"{type(e).__name__}: {e}"); raise
pylabtools.print_figure = print_figure
from nbdev.test import nbdev_test
try: nbdev_test(path=sys.argv[1], n_workers=0)
finally:
    if failed: sys.exit("figures that failed to draw:\\n" + "\\n".join(failed))
"""

@pytest.mark.parametrize('notebook', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook(notebook, tmp_path):
    "The notebook's cells (less those flagged `slow` or `cuda`) run without error, their assertions hold and their figures draw."
    # The notebook's temporary files go under the test's own folder, removed with the others when the run ends.
    env = {**os.environ, 'TMPDIR': str(tmp_path)}
    res = subprocess.run([sys.executable, '-c', RUNNER, str(notebook)], cwd=ROOT/'nbs', capture_output=True, text=True, timeout=1500,
                         env=env)
    assert res.returncode == 0, f"{notebook.name} failed:\n{res.stdout[-4000:]}\n{res.stderr[-8000:]}"


def _figures_script():
    "scripts/figures.py as a module: its list of the notebooks that draw and its checks of kept outputs."
    import importlib.util
    spec = importlib.util.spec_from_file_location('lungseg_figures', ROOT/'scripts'/'figures.py')
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('notebook', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_outputs(notebook):
    "Kept outputs hold no path of this machine, progress bar, memory address, error or oversized PNG; a notebook that draws keeps its figures (or table)."
    from execnb.nbio import read_nb
    figures, nb = _figures_script(), read_nb(notebook)
    problems, pngs = figures.check_outputs(nb, os.environ)
    assert not problems, f"{notebook.name}: outputs to redraw with `make figures` (scripts/figures.py):\n" + '\n'.join(problems)
    tables = [o for c in nb.cells for o in c.get('outputs', []) if 'text/html' in o.get('data', {})]
    if notebook.stem in figures.FIGURE_NOTEBOOKS:
        assert pngs or tables, f"{notebook.name} draws, but keeps no figure or table: run `make figures NOTEBOOKS={notebook.stem}` and commit it"
