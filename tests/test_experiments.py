"""The experiment record (`nbs/experiments.csv`), its docs page (`nbs/experiments.md`) and the packaged configurations.

The history of what was tried lives in the record, one row per trial; the page is generated from it
(`python scripts/experiments.py`); a packaged configuration holds settings, each with one comment of why.
"""
import csv, importlib.util, re, subprocess, sys
from pathlib import Path
import pytest, yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT/'lung_tumor_seg'/'configs'
RECORDED_TRIALS = 59   # the rows the record started with: every trial once written as comments in demo.yaml


def _script(name):
    spec = importlib.util.spec_from_file_location(f'_{name}', ROOT/'scripts'/f'{name}.py')
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    return module

experiments = _script('experiments')


def test_record_parses_with_its_columns():
    "One row per trial, the expected columns, numbers where numbers belong, every trial recorded so far."
    with open(experiments.RECORD, newline='') as f: header = next(csv.reader(f))
    assert header == experiments.COLUMNS
    for wanted in ('id', 'setting', 'data', 'machine', 'scoring', 'val_dice', 'test_dice', 'test_median_dice',
                   'sensitivity_6mm', 'fp_per_scan', 'train_min', 'demo_min', 'kept', 'why'):
        assert wanted in header
    rows = experiments.read_record()
    assert len(rows) >= RECORDED_TRIALS, "rows are added, never removed"
    assert [r['id'] for r in rows[:RECORDED_TRIALS]] == [f'T{i:02d}' for i in range(1, RECORDED_TRIALS + 1)]
    for r in rows:
        for c in ('val_dice', 'val_sensitivity_6mm', 'test_dice', 'test_median_dice', 'sensitivity_6mm'):
            assert not r[c] or 0 <= float(r[c]) <= 1, f"{r['id']}: {c} {r[c]} is not a fraction"
        assert r['data'].startswith('phantom '), f"{r['id']}: every recorded number is on the synthetic phantom"
    assert any(r['kept'] == 'yes' for r in rows) and any(r['kept'] == 'no' for r in rows)


def test_record_rejects_a_bad_row(tmp_path):
    "A misspelt column, a word where a number belongs or a reference to no row is an error naming the row."
    rows = list(csv.DictReader(open(experiments.RECORD, newline='')))
    def write(rows, columns=experiments.COLUMNS):
        p = tmp_path/'record.csv'
        with open(p, 'w', newline='') as f:
            w = csv.DictWriter(f, columns, extrasaction='ignore'); w.writeheader(); w.writerows(rows)
        return p
    with pytest.raises(ValueError, match='columns'): experiments.read_record(write(rows, experiments.COLUMNS[:-1]))
    with pytest.raises(ValueError, match='T01: test_dice'): experiments.read_record(write([{**rows[0], 'test_dice': 'high'}, *rows[1:]]))
    with pytest.raises(ValueError, match='vs'): experiments.read_record(write([*rows, {**rows[1], 'id': 'T999', 'vs': 'T998'}]))


def test_page_is_up_to_date():
    "nbs/experiments.md is what scripts/experiments.py writes from the record (as README.md from index.ipynb)."
    res = subprocess.run([sys.executable, 'scripts/experiments.py', '--check'], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, "nbs/experiments.md is out of date: run `python scripts/experiments.py` and commit\n" + res.stderr


def test_page_is_a_site_page_on_synthetic_data():
    "The page has a title (so the docs build lists it in the sidebar), says its numbers are synthetic and has a row per trial."
    text = experiments.PAGE.read_text()
    assert re.match(r'---\ntitle: Experiment history\n', text)
    assert 'synthetic data' in text and 'per-patient 3D Dice' in text and 'not empty' in text
    for r in experiments.read_record(): assert f'<span id="{r["id"].lower()}">{r["id"]}</span>' in text


def test_headline_names_the_default_seeds_run_and_the_other_seeds():
    "The page opens on the latest recipe run of the configured seed, not on a later run with another seed, and lists those."
    rows = experiments.read_record()
    base = {c: '' for c in experiments.COLUMNS}
    extra = [{**base, 'id': 'T900', 'kind': 'recipe', 'setting': 'the recipe', 'data': 'phantom 160', 'test_dice': '0.701'},
             {**base, 'id': 'T901', 'kind': 'recipe', 'setting': 'the recipe, lungseg demo --seed 7', 'data': 'phantom 160', 'test_dice': '0.912'}]
    page = experiments.render(rows + extra)
    headline = next(l for l in page.splitlines() if l.startswith('The record holds'))
    assert 'default seed, [T900](#t900)' in headline and 'test 0.701' in headline
    assert '[T901](#t901) (seed 7) 0.912' in headline
    page = experiments.render(rows + extra[:1])
    assert '(seed' not in next(l for l in page.splitlines() if l.startswith('The record holds')), "no other seed run since T900"


@pytest.mark.parametrize('name', ['demo', 'lidc_full', 'task06_full'])
def test_config_is_settings_with_one_comment_each(name):
    "A short header, then settings; each setting (a key with a value) carries one comment; no history of trials."
    lines = (CONFIGS/f'{name}.yaml').read_text().splitlines()
    assert isinstance(yaml.safe_load('\n'.join(lines)), dict)
    comments = [l for l in lines if l.lstrip().startswith('#')]
    settings = [l for l in lines if l.strip() and not l.lstrip().startswith('#')]
    assert len(comments) <= 5 and all(l.startswith('#') for l in comments), "only a header of at most 5 lines"
    assert lines[:len(comments)] == comments, "the header comes first"
    assert len(comments) <= 2*len(settings)
    assert 'Experiment history' in '\n'.join(comments), "the header names the page of trials"
    leaves = [l for l in settings if re.match(r'\s*\w+:\s*[^\s#]', l)]
    bare = [l.strip() for l in leaves if '#' not in l]
    assert not bare, f"settings without a comment of why: {bare}"


def test_trials_cited_by_the_demo_config_exist():
    "Each trial id a comment of demo.yaml cites is a row of the record."
    cited = set(re.findall(r'\bT\d+\b', (CONFIGS/'demo.yaml').read_text()))
    assert cited, "demo.yaml cites the trials behind its values"
    assert cited <= {r['id'] for r in experiments.read_record()}
