"`lungseg predict` over a cohort: phantom series under a root, shared between two processes (DDP, gloo), resumed after a kill, manifests."
import json, os, signal, subprocess, sys, time
from pathlib import Path
import numpy as np, nibabel as nib, pandas as pd, pytest, torch
from conftest import save_checkpoint

def run_lungseg(*args, timeout=600, **kwargs):
    "`lungseg ARGS` in a new process, as a user runs it (Lightning's DDP launcher starts the other ranks the same way)."
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    return subprocess.run([sys.executable, '-m', 'lung_tumor_seg.cli', *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, **kwargs)

def random_checkpoint(path, preprocess=None, context_slices=1):
    "A small U-Net with random weights (seeded) and its head unbiased: masks with structure, the same in every process."
    from lung_tumor_seg.training import SegModule
    torch.manual_seed(0)
    module = SegModule(context_slices=context_slices, model=dict(base_width=4, depth=2),
                       preprocess=preprocess or dict(window='lung', image_size=[32, 32], slab='all'))
    with torch.no_grad(): module.net.head.weight.normal_(0, 3.0); module.net.head.bias.fill_(0.0)
    return save_checkpoint(module, path)

@pytest.fixture(scope='module')
def cohort(tmp_path_factory):
    "Five synthetic phantom patients in the NBIA classic layout, and a checkpoint."
    from lung_tumor_seg.phantom import cached_phantom
    root = cached_phantom(5, max_slices=16, task06=False)/'LIDC-IDRI'
    return root, random_checkpoint(tmp_path_factory.mktemp('ckpt')/'best.ckpt')

def outputs_of(out):
    "Per series folder: its mask (as an array) and its summary."
    found = {}
    for summary in sorted(Path(out).glob('*/*_prediction.json')):
        s = json.loads(summary.read_text())
        found[summary.parent.name] = (np.asarray(nib.load(summary.parent/s['outputs']['mask']).dataobj), s)
    return found

def test_two_processes_share_the_cohort_and_write_each_series_once(cohort, tmp_path):
    root, ckpt = cohort
    one, two = tmp_path/'one', tmp_path/'two'
    res = run_lungseg('predict', '--checkpoint', ckpt, '--input', root, '--out', one, '--accelerator', 'cpu', '--no-animation', '--no-progress')
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_lungseg('predict', '--checkpoint', ckpt, '--input', root, '--out', two, '--accelerator', 'cpu', '--devices', 2,
                      '--strategy', 'ddp', '--no-animation', '--no-progress')
    assert res.returncode == 0, res.stderr[-2000:]
    table = pd.read_csv(two/'cohort.csv', dtype={'series_uid': str})
    assert len(table) == 5 and table.series_uid.is_unique and set(table.status) == {'done'}
    assert set(table['rank']) == {0, 1}                                        # both processes wrote series
    a, b = outputs_of(one), outputs_of(two)
    assert sorted(a) == sorted(b) and len(a) == 5
    assert {s['rank'] for _, s in b.values()} == {0, 1}
    for key in a:
        assert np.array_equal(a[key][0], b[key][0]), key                        # identical to the one-process result
        assert a[key][0].any() and not a[key][0].all()                          # masks with structure, not trivially equal
        assert len(list((two/key).glob('*_prediction.json'))) == 1
    assert not list(two.rglob('*.part'))

def test_a_killed_run_resumes_without_redoing_finished_series(cohort, tmp_path):
    root, ckpt = cohort
    out = tmp_path/'out'
    cmd = [sys.executable, '-m', 'lung_tumor_seg.cli', 'predict', '--checkpoint', str(ckpt), '--input', str(root), '--out', str(out),
           '--accelerator', 'cpu', '--no-progress']
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(out.glob('*/*_prediction.json'))) < 2: time.sleep(0.05)
    first.send_signal(signal.SIGKILL); first.wait()
    finished = {p: p.stat().st_mtime_ns for p in out.glob('*/*_prediction.json')}
    assert 2 <= len(finished) < 5, 'the first run should be killed part-way'
    res = run_lungseg('predict', '--checkpoint', ckpt, '--input', root, '--out', out, '--accelerator', 'cpu', '--no-progress')
    assert res.returncode == 0, res.stderr[-2000:]
    table = pd.read_csv(out/'cohort.csv')
    assert len(table) == 5 and (table.status == 'done before').sum() == len(finished) and (table.status == 'done').sum() == 5 - len(finished)
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())          # finished series not written again
    assert len(list(out.glob('*/*_prediction.json'))) == 5 and not list(out.rglob('*.part'))

def test_two_runs_at_once_never_write_the_same_series(cohort, tmp_path):
    root, ckpt = cohort
    out = tmp_path/'out'
    cmd = [sys.executable, '-m', 'lung_tumor_seg.cli', 'predict', '--checkpoint', str(ckpt), '--input', str(root), '--out', str(out),
           '--accelerator', 'cpu', '--no-progress', '--no-animation']
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [r.communicate(timeout=600) + (r.returncode,) for r in runs]
    assert all(rc == 0 for *_, rc in results), [e[-1000:] for _, e, _ in results]
    written = [{line.split(':')[0] for line in o.splitlines() if 'nodule(s)' in line} for o, _, _ in results]
    pids = [json.loads(p.read_text())['pid'] for p in out.glob('*/*_prediction.json')]
    assert len(pids) == 5 and not (written[0] & written[1])                   # each series written by one process only
    assert sum(map(len, written)) == 5

def test_manifest_rows_and_a_missing_series(cohort, tmp_path):
    "An NBIA Data Retriever-style metadata.csv (Series UID, File Location); a row naming a series that is not there fails alone."
    from lung_tumor_seg.series_index import build_series_index
    root, ckpt = cohort
    index = build_series_index(root, cache=None)
    rows = [{'Series UID': r.series_uid, 'Subject ID': r.patient_id, 'File Location': '.\\' + str(Path(r.path).relative_to(root)).replace('/', '\\')}
            for r in index.head(2).itertuples()]
    rows.append({'Series UID': '1.2.3.4.5.404', 'Subject ID': 'GONE', 'File Location': ''})
    manifest = tmp_path/'metadata.csv'
    pd.DataFrame(rows).to_csv(manifest, index=False)
    res = run_lungseg('predict', '--checkpoint', ckpt, '--input', manifest, '--root', root, '--out', tmp_path/'out', '--accelerator', 'cpu',
                      '--no-progress', '--no-animation')
    assert res.returncode == 1
    table = pd.read_csv(tmp_path/'out'/'cohort.csv', dtype=str)
    assert list(table.status) == ['failed', 'done', 'done'] and '1.2.3.4.5.404' in table.error[0]
    assert 'series failed' in res.stderr and '1.2.3.4.5.404 not found' in res.stderr and 'Traceback' not in res.stderr

def test_evaluate_on_two_processes_scores_every_patient_once_as_one_process_does(tmp_path):
    "`lungseg evaluate --devices 2` (DDP, gloo): each patient scored once, the table and the masks scored those of one process."
    import yaml
    from lung_tumor_seg.volumes import toy_chest, Volume
    from lung_tumor_seg.preprocessing import PreprocessConfig, preprocess, Case
    def case(name, seed):
        def load():
            hu, mask = toy_chest(n_slices=16, size=48, seed=seed)
            return Volume(hu, (2.5, 0.8, 0.8), np.diag([-0.8, -0.8, 2.5, 1.0]), name), mask
        return Case(name, name, load)
    prep, run = tmp_path/'prep', tmp_path/'run'
    names = [f'TOY-{k}' for k in range(5)]
    assert preprocess([case(n, k) for k, n in enumerate(names)], prep, PreprocessConfig(image_size=(32, 32), slab='all')).ok
    split = json.loads((prep/'split.json').read_text()); split['test'] = names; (prep/'split.json').write_text(json.dumps(split))
    random_checkpoint(run/'checkpoints'/'best.ckpt', json.loads((prep/'preprocess.json').read_text()), context_slices=0)
    (run/'config.yaml').write_text(yaml.safe_dump({'data': {'prep_dir': str(prep)}}))
    results = {}
    for devices in (1, 2):
        res = run_lungseg('evaluate', '--run', run, '--split', 'test', '--accelerator', 'cpu', '--devices', devices)
        assert res.returncode == 0, res.stderr[-2000:]
        out = (run/'eval').rename(tmp_path/f'eval{devices}')
        metrics = json.loads((out/'metrics.json').read_text())
        masks = {p.stem: np.load(p)['mask'] for p in sorted((out/'masks').glob('*.npz'))}
        results[devices] = metrics, pd.read_csv(out/'patients.csv'), masks
    (m1, t1, k1), (m2, t2, k2) = results[1], results[2]
    assert (m1['devices'], m2['devices']) == (1, 2)
    assert list(t2.patient) == names and t2.patient.is_unique                  # every patient once, in the split's order
    pd.testing.assert_frame_equal(t1, t2)
    assert sorted(k1) == sorted(k2) == names and all(np.array_equal(k1[n], k2[n]) for n in names)
    assert any(k.any() for k in k1.values())                                   # masks with structure, not trivially equal
    assert m1['mean_patient_dice'] == m2['mean_patient_dice']
