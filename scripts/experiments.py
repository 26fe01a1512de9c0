"""Write the docs page nbs/experiments.md ("Experiment history") from the record of trials, nbs/experiments.csv.

The record has one row per trial of the demo's training recipe: what changed, on which data and machine, how it was
scored and what it scored. A new trial is a new row; the packaged configuration keeps only its settings, each with one
comment of why, citing the trials by id.

Usage: python scripts/experiments.py [--check]   (--check: exit 1 when the page is not what the record gives)
"""
from __future__ import annotations
import csv, re, sys
from itertools import groupby
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT/'nbs'/'experiments.csv'
PAGE = ROOT/'nbs'/'experiments.md'
COLUMNS = ['id', 'date', 'kind', 'setting', 'vs', 'data', 'machine', 'scoring', 'val_dice', 'val_sensitivity_6mm', 'test_dice',
           'test_median_dice', 'sensitivity_6mm', 'fp_per_scan', 'train_min', 'demo_min', 'kept', 'why', 'notes']
NUMERIC = ['val_dice', 'val_sensitivity_6mm', 'test_dice', 'test_median_dice', 'sensitivity_6mm', 'fp_per_scan', 'train_min', 'demo_min']
KINDS = {'trial': 'a change against the recipe of its time',
         'recipe': 'the recipe of its time, run as it was',
         'diagnostic': 'a measurement on a trained model, no setting chosen'}
SEED = re.compile(r'--seed (\d+)')  # a recipe row run with another seed than the configuration's says so in its setting
CONFIG_KEY = re.compile(r'\b((?:model|loss|optim|data|train|val|trainer|early_stopping|fp_reduction)\.\w+(?: [\w.+-]*\w)?|DEMO_\w+)\b')


def read_record(path:Path=RECORD) -> list[dict]:
    "The rows of the record, checked: the columns, unique ids, numbers where numbers belong, known kinds and references."
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != COLUMNS: raise ValueError(f"{path.name}: columns {reader.fieldnames}, expected {COLUMNS}")
        rows = list(reader)
    ids = [r['id'] for r in rows]
    if len(set(ids)) != len(ids): raise ValueError(f"{path.name}: repeated ids {sorted(i for i in set(ids) if ids.count(i) > 1)}")
    for r in rows:
        where = f"{path.name}, {r['id']}"
        if not re.fullmatch(r'T\d+', r['id']): raise ValueError(f"{where}: an id is T and a number")
        if r['kind'] not in KINDS: raise ValueError(f"{where}: kind {r['kind']!r} is none of {sorted(KINDS)}")
        if r['kept'] not in ('yes', 'no', ''): raise ValueError(f"{where}: kept is yes, no or empty, not {r['kept']!r}")
        if r['date'] and not re.fullmatch(r'\d{4}-\d{2}-\d{2}', r['date']): raise ValueError(f"{where}: date {r['date']!r} is not YYYY-MM-DD")
        if r['vs'] and r['vs'] not in ids: raise ValueError(f"{where}: vs {r['vs']!r} is no row of the record")
        if not r['setting']: raise ValueError(f"{where}: no setting")
        for c in NUMERIC:
            if r[c]:
                try: float(r[c])
                except ValueError: raise ValueError(f"{where}: {c} {r[c]!r} is not a number") from None
    return rows


def _md(text:str) -> str:
    "A table cell: config keys as code, trial ids linked to their rows, pipes escaped."
    text = text.replace('|', '\\|')
    text = CONFIG_KEY.sub(r'`\1`', text)
    return re.sub(r'\b(T\d+)\b', lambda m: f'[{m.group(1)}](#{m.group(1).lower()})', text)


def _row(r:dict) -> str:
    setting = _md(r['setting']) + (f" (vs [{r['vs']}](#{r['vs'].lower()}))" if r['vs'] else '')
    test = r['test_dice'] + (f" ({r['test_median_dice']})" if r['test_median_dice'] else '')
    val = r['val_dice'] + (f"; ≥ 6 mm {r['val_sensitivity_6mm']}" if r['val_sensitivity_6mm'] else '')
    time = ', '.join(f"{label} {r[c]} min" for label, c in (('train', 'train_min'), ('demo', 'demo_min')) if r[c])
    kept = {'recipe': 'recipe', 'diagnostic': '–'}.get(r['kind'], r['kept'])
    why = ' — '.join(_md(t) for t in (r['why'], r['notes']) if t)
    cells = [f'<span id="{r["id"].lower()}">{r["id"]}</span>', setting, val, test, r['sensitivity_6mm'], r['fp_per_scan'], time,
             _md(r['scoring']), kept, why]
    return '| ' + ' | '.join(cells) + ' |'


def render(rows:list[dict]) -> str:
    "The Markdown of the page."
    n_trials = sum(r['kind'] == 'trial' for r in rows)
    n_kept = sum(r['kind'] == 'trial' and r['kept'] == 'yes' for r in rows)
    recipe = [r for r in rows if r['kind'] == 'recipe']
    seed_of = lambda r: int(m.group(1)) if (m := SEED.search(r['setting'])) else 0
    latest = [r for r in recipe if seed_of(r) == 0][-1]
    other_seeds = [r for r in recipe[recipe.index(latest) + 1:] if seed_of(r) != 0]
    out = ['---', 'title: Experiment history',
           "description: Every trial of the demo's training recipe so far, what it changed and what it scored on the synthetic phantom.",
           '---', '',
           '<!-- Generated from nbs/experiments.csv by scripts/experiments.py: edit the record, then run the script. -->', '',
           '**All numbers on this page are on synthetic data**: the LIDC-geometry [phantom](04a_phantom.ipynb) (seed 0) as the [demo](11_demo.ipynb) builds it, never on patients. '
           'The phantom\'s patients are split into training, validation and test patients: 96 (76/10/10) for the first trials, '
           '160 (128/16/16) since. **Dice** is the per-patient 3D Dice, averaged over the held-out patients whose ground truth '
           'is not empty (patients without tumour are counted apart, never averaged in as 1.0). **Validation** is that mean over '
           'the validation patients, on which the checkpoint and the recipe are chosen; **test** is the mean (median in brackets) '
           'over the held-out test patients, scored on each scan\'s own grid unless the scoring says "stored grid". '
           '**Sensitivity** is the share of nodules of 6 mm and more found (a nodule counts as found at IoU ≥ 0.1 with the '
           'predicted components touching it); **FP/scan** counts predicted components that touch no nodule. Most rows are one '
           'run each, and runs of one setting differ by about 0.03 in mean Dice: a difference smaller than that is not a measured gain.',
           '',
           f'The record holds {len(rows)} rows: {n_trials} trials ({n_kept} kept), '
           f"{sum(r['kind'] == 'recipe' for r in rows)} runs of the recipe as it was, "
           f"{sum(r['kind'] == 'diagnostic' for r in rows)} diagnostics. The latest run of the recipe with the default seed, "
           f"[{latest['id']}](#{latest['id'].lower()}) ({latest['date']}, {latest['machine']}): test {latest['test_dice']}"
           + (f" (median {latest['test_median_dice']})" if latest['test_median_dice'] else '')
           + (f", sensitivity ≥ 6 mm {latest['sensitivity_6mm']}" if latest['sensitivity_6mm'] else '')
           + (f", {latest['fp_per_scan']} FP/scan" if latest['fp_per_scan'] else '') + '.'
           + (' The same recipe with other seeds (each draws its own split and training): '
              + ', '.join(f"[{r['id']}](#{r['id'].lower()}) (seed {seed_of(r)}) {r['test_dice']}" for r in other_seeds) + '.'
              if other_seeds else ''),
           '',
           'The packaged `lung_tumor_seg/configs/demo.yaml` holds the current settings, each with one comment citing the trials '
           'behind it by id. A new trial is a new row of `nbs/experiments.csv` (an empty cell: not measured), then '
           '`python scripts/experiments.py` rewrites this page; the tests fail while the page is older than the record.',
           '',
           '## Columns', '',
           '- **Setting**: what the trial changed, in the configuration\'s key names where there is one, against the row named after "vs".',
           '- **Validation**, **Test (median)**: mean per-patient 3D Dice as above; "≥ 6 mm" after validation is its sensitivity.',
           '- **Sens. ≥ 6 mm**, **FP/scan**: on the test patients.',
           '- **Time**: minutes of training (train) and of the whole demo chain without set-up (demo), where recorded.',
           '- **Scoring**: the grid and post-processing the test patients were scored with: the U-Net alone, `DEMO_POSTPROCESS` '
           '(flip test-time augmentation, no predicted component under 10 mm³) or with the second stage (`fp_reduction`).',
           '- **Kept**: yes or no for a trial; ' + '; '.join(f'*{k}*: {v}' for k, v in KINDS.items()) + '.',
           '']
    header = ['| ID | Setting | Validation | Test (median) | Sens. ≥ 6 mm | FP/scan | Time | Scoring | Kept | Why — notes |',
              '|---|---|---:|---:|---:|---:|---|---|---|---|']
    for (date, data, machine), group in groupby(rows, key=lambda r: (r['date'], r['data'], r['machine'])):
        out += [f"## {date or 'date not recorded'} · {data} · {machine or 'machine not recorded'}", '', *header,
                *(_row(r) for r in group), '']
    return '\n'.join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try: page = render(read_record())
    except ValueError as e: print(f"experiments: {e}", file=sys.stderr); return 1
    if '--check' in argv:
        if PAGE.exists() and PAGE.read_text() == page: return 0
        print(f"experiments: {PAGE.relative_to(ROOT)} is not what {RECORD.relative_to(ROOT)} gives: run python scripts/experiments.py",
              file=sys.stderr)
        return 1
    PAGE.write_text(page)
    return 0


if __name__ == '__main__':
    sys.exit(main())
