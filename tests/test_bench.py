"`lungseg bench`: row schema, timing statistics, result writers and the --quick selection (no speed is asserted: the benchmark measures, the tests check its rows)."
import json
import pytest
from lung_tumor_seg.core import LungsegError
from lung_tumor_seg.bench import (ROW_FIELDS, SECTIONS, bench_row, time_call, machine_row, bench_settings, markdown_table,
                                  write_results, load_results, scaling_rows)
from lung_tumor_seg.bench_sections import demo_rows, bench_main

REQUIRED = ['masks_speedup_vs_pylidc', 'masks_dice_vs_pylidc', 'masks_identical_share', 'dicom_load_ratio_vs_simpleitk',
            'loader_over_model_throughput', 'train_images_per_s', 'train_fraction_of_conv_peak', 'inference_s_per_volume',
            'demo_wall_s', 'demo_peak_rss_mb']

def test_row_schema_and_ratio():
    r = bench_row('dicom_load_ratio_vs_simpleitk', 3.0, 4.0, 's', False, '  our time\n over theirs ')
    assert tuple(r) == ROW_FIELDS
    assert r['ratio'] == pytest.approx(0.75) and r['notes'] == 'our time over theirs'
    assert bench_row('x', 3.0, 0.0)['ratio'] is None                   # no division by a zero peer
    assert bench_row('x', None, 4.0)['ratio'] is None
    assert bench_row('speedup', 0.02, 1.0, ratio=50)['ratio'] == 50
    json.dumps(machine_row())                                          # JSON-serialisable
    assert tuple(machine_row()) == ROW_FIELDS

def test_timing_statistics_on_a_fake_clock():
    "Warm-up runs read no clock; median, min and max of the timed runs; sync is called around each timed run."
    clock = iter([0.0, 3.0, 10.0, 11.0, 20.0, 24.0, 30.0, 32.0])      # durations 3, 1, 4, 2
    calls, syncs = [], []
    t = time_call(lambda: calls.append(1), repeats=4, warmup=2, clock=lambda: next(clock), sync=lambda: syncs.append(1))
    assert len(calls) == 6 and len(syncs) == 8
    assert (t.median_s, t.min_s, t.max_s, t.repeats) == (2.5, 1.0, 4.0, 4)
    with pytest.raises(LungsegError, match='at least 1'): time_call(lambda: None, repeats=0)

def test_timing_of_a_trivial_function_is_ordered():
    t = time_call(lambda: sum(range(1000)), repeats=5, warmup=1)
    assert 0 <= t.min_s <= t.median_s <= t.max_s

def test_quick_selection():
    quick, full = bench_settings(quick=True), bench_settings()
    assert quick['sections'] == full['sections'] == list(SECTIONS)    # --quick keeps every section, smaller
    assert full['mask_annotations'] is None and 0 < quick['mask_annotations'] < 6859
    assert 'compile' in full['train_modes'] and 'compile' not in quick['train_modes'] + quick['big_unet_modes']
    assert quick['demo']['patients'] < full['demo']['patients'] and quick['demo']['max_epochs'] == 1
    assert max(quick['prep_patients']) <= quick['phantom_patients'] and max(full['prep_patients']) <= full['phantom_patients']
    assert full['series_slices'] == quick['series_slices'] == 300
    assert bench_settings(True, only=['scaling', 'masks'])['sections'] == ['masks', 'scaling']
    with pytest.raises(LungsegError, match="unknown benchmark section 'gpu'"): bench_settings(only=['gpu'])

def test_scaling_rows_compare_with_linear_growth():
    rows = scaling_rows('preprocess_scaling', [1, 1, 4, 4], [2.0, 1.5, 8.0, 6.0], 'patients', [1, 2, 1, 2])
    assert [r['name'] for r in rows] == ['preprocess_scaling_1_1w', 'preprocess_scaling_1_2w', 'preprocess_scaling_4_1w', 'preprocess_scaling_4_2w']
    assert [r['peer'] for r in rows] == pytest.approx([2.0, 2.0, 8.0, 4.0])   # one patient keeps one worker busy
    assert rows[3]['ratio'] == pytest.approx(1.5) and rows[3]['higher_is_better'] is False

def test_writers_round_trip(tmp_path):
    rows = [bench_row(n, 1.0, 2.0, 's', False, 'a | b') for n in REQUIRED] + demo_rows(120.0, None, 'example')
    write_results(rows, tmp_path/'out'/'r.json', tmp_path/'out'/'r.md')
    assert json.loads((tmp_path/'out'/'r.json').read_text()) == rows
    assert load_results(tmp_path/'out'/'r.json') == rows and load_results(tmp_path/'missing.json') is None
    md = (tmp_path/'out'/'r.md').read_text().strip().splitlines()
    assert len(md) == 2 + len(rows) and md[0].startswith('| name |')
    assert all(line.count(' | ') >= 6 for line in md[2:]) and 'a \\| b' in md[2]
    assert sorted(tmp_path.joinpath('out').iterdir()) == [tmp_path/'out'/'r.json', tmp_path/'out'/'r.md']  # no temporary leftovers
    (tmp_path/'bad.json').write_text('{"rows": []}')
    with pytest.raises(LungsegError, match='not a list of benchmark rows'): load_results(tmp_path/'bad.json')

def test_cli_bad_input(tmp_path, capsys):
    assert bench_main(['--json', str(tmp_path/'r.json'), '--only', 'gpu']) == 1
    assert "unknown benchmark section 'gpu'" in capsys.readouterr().err
    assert bench_main(['--json', str(tmp_path/'r.json'), '--demo-metrics', str(tmp_path/'none.json')]) == 1
    assert not (tmp_path/'r.json').exists()
    with pytest.raises(SystemExit): bench_main([])                   # --json is required

def test_cli_demo_rows_from_metrics(tmp_path):
    "The demo section reads a demo's metrics.json: rows against the 15-minute budget and the machine's memory."
    (tmp_path/'metrics.json').write_text(json.dumps(dict(demo_wall_s=450.0, peak_rss_mb=1500.0, phantom_patients=16)))
    assert bench_main(['--quick', '--only', 'demo', '--demo-metrics', str(tmp_path/'metrics.json'), '--json', str(tmp_path/'r.json'),
                       '--md', str(tmp_path/'r.md')]) == 0
    rows = {r['name']: r for r in json.loads((tmp_path/'r.json').read_text())}
    assert {'machine', 'demo_wall_s', 'demo_peak_rss_mb', 'bench_wall_s'} <= set(rows)
    assert rows['demo_wall_s']['ratio'] == pytest.approx(0.5) and rows['demo_peak_rss_mb']['ours'] == 1500.0
    assert 'demo_wall_s' in (tmp_path/'r.md').read_text() and rows['bench_wall_s']['peer'] == 600     # --quick: the 10-minute limit

def test_cohort_rows_measure_one_and_two_processes():
    "`lungseg predict` over a small root, one process and two (DDP): both rows measured, the second against the first."
    from lung_tumor_seg.bench_sections import bench_cohort
    rows = {r['name']: r for r in bench_cohort(n_series=2, n_slices=8, repeats=1)}
    one, two = rows['cohort_volumes_per_hour_1proc'], rows['cohort_volumes_per_hour_2proc']
    assert one['ours'] > 0 and two['ours'] > 0 and two['peer'] == one['ours']
    assert two['ratio'] == pytest.approx(two['ours'] / one['ours'], rel=1e-3)

def test_a_failed_section_is_listed_and_the_command_fails(tmp_path, capsys, monkeypatch):
    "A section that raises becomes a `<section>_failed` row; the table is still written, and the exit code is 1."
    import lung_tumor_seg.bench_sections as sections
    def broken(*args, **kwargs): raise LungsegError('no DICOM files found')
    monkeypatch.setattr(sections, 'bench_demo', broken)
    assert bench_main(['--quick', '--only', 'demo', '--json', str(tmp_path/'r.json')]) == 1
    rows = {r['name']: r for r in json.loads((tmp_path/'r.json').read_text())}
    assert 'no DICOM files found' in rows['demo_failed']['notes']
    assert 'section demo failed: LungsegError: no DICOM files found' in capsys.readouterr().err
