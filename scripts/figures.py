"""Run the notebooks that draw, top to bottom, and keep their outputs (the figures the site shows): `make figures`.

Each notebook runs in a fresh Python process, in `nbs/`, with `MPLBACKEND=Agg`, `PYTHONHASHSEED=0` and the real LIDC-IDRI sample
(`LUNGSEG_SAMPLE_DIR`, else `../shared/data/lidc-sample` beside the checkout when it is there); every code cell runs, `slow` ones
too (their outputs are committed though `nbdev_test` skips them), except the closing `nbdev_export()` cell. Figures are plain PNG
at 72 dpi. Before a notebook is written back its outputs are checked: no path of this machine (checkout, sample folder, temporary
folder, home), no progress bars or terminal escapes, no memory addresses, no PNG over 400 KB; a notebook that fails a cell or a
check is left as it was. Then `nbdev_clean` tidies the metadata (settings.ini keeps outputs: `clear_all = False`).

Usage: python scripts/figures.py [--skip-slow] [NOTEBOOK ...]   (names as in nbs/, e.g. 05a_preprocessing; default: every notebook
of FIGURE_NOTEBOOKS). `--skip-slow` leaves the `slow` cells and their committed outputs as they are (a quicker redraw).
"""
from __future__ import annotations
import argparse, base64, os, re, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'
# The notebooks whose pages show figures (07_unet: a table). tests/test_docs.py checks that each page shows one that loads,
# tests/test_notebooks.py that each notebook keeps its outputs and that they pass the checks below.
FIGURE_NOTEBOOKS = ('02_annotations', '03_masks', '04_phantom_chest', '04a_phantom', '05_volumes', '05a_preprocessing', '06_dataset',
                    '07_unet', '08_training', '08a_fp_reduction', '09_inference', '10_evaluation', '11_demo')
TABLE_ONLY = ('07_unet',)  # of those, the pages whose picture is a table
MAX_PNG_BYTES = 400_000
DPI = 72


def _environment() -> dict:
    env = dict(os.environ, MPLBACKEND='Agg', PYTHONHASHSEED='0', TQDM_DISABLE='1')
    env.pop('IN_TEST', None)
    sample = ROOT.parent/'shared'/'data'/'lidc-sample'
    if not env.get('LUNGSEG_SAMPLE_DIR') and sample.is_dir(): env['LUNGSEG_SAMPLE_DIR'] = str(sample.resolve())
    return env


def _forbidden(env:dict) -> list[tuple[str, str]]:
    "Patterns no kept output may hold, with what each one means."
    paths = {str(ROOT), str(ROOT.resolve()), tempfile.gettempdir(), str(Path.home())}
    if env.get('LUNGSEG_SAMPLE_DIR'): paths |= {env['LUNGSEG_SAMPLE_DIR'], str(Path(env['LUNGSEG_SAMPLE_DIR']).resolve())}
    pats = [(re.escape(p), f'a path of this machine ({p})') for p in sorted(paths, key=len, reverse=True) if len(p) > 1]
    return pats + [(r'pytest-of', 'a pytest temporary folder'), (r'\x1b\[', 'a terminal escape (progress bar?)'),
                   (r'\r(?!\n)', 'a carriage return (progress bar?)'), (r'\bat 0x[0-9a-f]{6,}', 'a memory address'),
                   (r'\d+it/s\]|\d+%\|', 'a progress bar')]


def check_outputs(nb, env:dict) -> tuple[list[str], list[int]]:
    "Problems with the outputs of `nb` (an execnb notebook) and the size in bytes of each PNG it holds."
    problems, pngs = [], []
    pats = _forbidden(env)
    for i, cell in enumerate(nb.cells):
        for o in cell.get('outputs', []):
            texts = [''.join(o.get('text', ''))] + [''.join(v) if isinstance(v, list) else str(v) for k, v in o.get('data', {}).items()
                                                     if not k.startswith('image/')]
            if o.get('output_type') == 'error': problems.append(f"cell {i}: error output {o.get('ename')}: {o.get('evalue')}")
            for t in texts:
                for pat, what in pats:
                    if m := re.search(pat, t): problems.append(f"cell {i}: {what}: ...{t[max(m.start() - 60, 0):m.end() + 200]!r}")
            if png := o.get('data', {}).get('image/png'):
                n = len(base64.b64decode(''.join(png)))
                pngs.append(n)
                if n > MAX_PNG_BYTES: problems.append(f"cell {i}: a {n//1000} KB PNG (at most {MAX_PNG_BYTES//1000} KB: downsample it)")
    return problems, pngs


def _is_slow(cell) -> bool: return bool(re.search(r'^#\|\s*slow\s*$', cell.source, re.M))


def run_one(name:str, skip_slow:bool=False) -> int:
    "Execute nbs/NAME.ipynb in this process and write it back when every cell ran and its outputs pass the checks."
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    path = NBS/f'{name}.ipynb'
    os.chdir(NBS)
    nb = read_nb(path)
    shell = CaptureShell(path=NBS, mpl_format='png')
    shell.run_cell(f"import matplotlib; matplotlib.rcParams.update({{'figure.dpi': {DPI}, 'savefig.dpi': {DPI}}})")
    def skip(cell):
        if cell.cell_type != 'code' or (skip_slow and _is_slow(cell)): return True
        cell.outputs, cell.execution_count = [], None
        return 'nbdev_export(' in cell.source or bool(re.search(r'^#\|\s*eval:\s*false', cell.source, re.M))
    t0 = time.time()
    try: shell.run_all(nb, exc_stop=True, preproc=skip)
    except BaseException:
        sys.stderr.write(shell.prettytb(fname=path) + '\n'); print(f"figures: {name}: a cell failed, notebook left as it was"); return 1
    problems, pngs = check_outputs(nb, os.environ)
    if problems:
        print(f"figures: {name}: outputs not kept:\n  " + '\n  '.join(problems)); return 1
    write_nb(nb, path)
    print(f"figures: {name}: {len(pngs)} figure(s), {sum(pngs)//1000} KB, {time.time() - t0:.0f} s")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog='figures.py', description=__doc__.split('\n\n')[0])
    ap.add_argument('notebooks', nargs='*', help="notebook names (default: every notebook that draws)")
    ap.add_argument('--skip-slow', action='store_true', help="keep the `slow` cells' committed outputs instead of running them")
    ap.add_argument('--run', help=argparse.SUPPRESS)  # internal: the child process that runs one notebook
    args = ap.parse_args(argv)
    if args.run: return run_one(args.run, args.skip_slow)
    names = [Path(n).stem for n in args.notebooks] or list(FIGURE_NOTEBOOKS)
    if missing := [n for n in names if not (NBS/f'{n}.ipynb').exists()]: raise SystemExit(f"figures: no notebook {missing}")
    env, failed = _environment(), []
    nbdev_clean = Path(sys.executable).parent/'nbdev_clean'
    for name in names:
        child = [sys.executable, __file__, '--run', name] + (['--skip-slow'] if args.skip_slow else [])
        if subprocess.run(child, env=env, cwd=ROOT).returncode: failed.append(name); continue
        subprocess.run([str(nbdev_clean), '--fname', str(NBS/f'{name}.ipynb')], cwd=ROOT, check=True)
    if failed: print(f"figures: failed: {' '.join(failed)}"); return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
