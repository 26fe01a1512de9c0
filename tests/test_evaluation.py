"Evaluation metrics against hand-constructible cases, empty-mask rules, detection by size, and `lungseg evaluate` end to end."
import json, math
from pathlib import Path
import numpy as np, pandas as pd, pytest, yaml
from scipy import ndimage
from conftest import save_checkpoint
from scipy.spatial import cKDTree
from lung_tumor_seg.evaluation import (overlap_metrics, hausdorff95_mm, match_nodules, detection_summary, evaluate_volume,
                                       summarize_patients, reader_agreement, slice_level_extras, equivalent_diameter_mm,
                                       evaluate_main, evaluate_run)
from lung_tumor_seg.training import predict_probabilities

def box(shape, lo, hi):
    m = np.zeros(shape, bool); m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True; return m

def ball(shape, centre, radius_mm, spacing_mm=(1, 1, 1)):
    grid = np.stack(np.meshgrid(*[np.arange(n)*s for n, s in zip(shape, spacing_mm)], indexing='ij'), -1)
    return (((grid - np.asarray(centre)*np.asarray(spacing_mm))**2).sum(-1) <= radius_mm**2)

def test_overlap_of_two_boxes_by_formula():
    a, b = box((30, 30, 30), (2, 3, 4), (12, 10, 20)), box((30, 30, 30), (5, 5, 5), (20, 15, 15))
    inter = (12 - 5)*(10 - 5)*(15 - 5)
    va, vb = 10*7*16, 15*10*10
    m = overlap_metrics(a, b)
    assert m['dice'] == pytest.approx(2*inter/(va + vb))
    assert m['iou'] == pytest.approx(inter/(va + vb - inter))
    assert m['precision'] == pytest.approx(inter/va) and m['recall'] == pytest.approx(inter/vb)

def _hd95_bruteforce(p, t, spacing):
    "Symmetric HD95 from surface voxels by KD-tree, independent of MONAI."
    def surface(m): return np.argwhere(m & ~ndimage.binary_erosion(m)) * np.asarray(spacing)   # face-connected border, as MONAI
    sp, st = surface(p), surface(t)
    return max(np.percentile(cKDTree(st).query(sp)[0], 95), np.percentile(cKDTree(sp).query(st)[0], 95))

def test_hausdorff95_in_mm_with_anisotropic_spacing():
    t = box((20, 40, 40), (5, 10, 10), (10, 20, 20))
    assert hausdorff95_mm(box((20, 40, 40), (8, 10, 10), (13, 20, 20)), t, (2.0, 0.5, 0.7)) == pytest.approx(6.0, abs=1e-4)  # 3 slices × 2 mm
    assert hausdorff95_mm(box((20, 40, 40), (5, 10, 12), (10, 20, 22)), t, (2.0, 0.5, 0.7)) == pytest.approx(1.4, abs=1e-4)  # 2 columns × 0.7 mm
    spacing = (2.5, 0.7, 0.7)
    p, q = ball((24, 60, 60), (12, 30, 30), 9.0, spacing), ball((24, 60, 60), (13, 33, 28), 7.0, spacing)
    assert hausdorff95_mm(p, q, spacing) == pytest.approx(_hd95_bruteforce(p, q, spacing), rel=0.02)

def test_empty_masks_are_undefined_and_counted_apart():
    t, empty = box((10, 10, 10), (2, 2, 2), (6, 6, 6)), np.zeros((10, 10, 10), bool)
    assert math.isnan(overlap_metrics(empty, empty)['dice']) and math.isnan(overlap_metrics(t, empty)['dice'])
    assert overlap_metrics(empty, t)['dice'] == 0 and math.isnan(hausdorff95_mm(empty, t, (1, 1, 1)))
    rows = []
    for pid, (p, g) in {'A': (t, t), 'B': (empty, empty), 'C': (t, empty), 'D': (empty, t)}.items():
        row, _ = evaluate_volume(p, g, (1, 1, 1)); rows.append(dict(patient=pid, **row))
    s = summarize_patients(pd.DataFrame(rows), [])
    assert s['mean_patient_dice'] == pytest.approx(0.5)      # A=1, D=0; B and C never enter as 1.0
    assert (s['n_patients_dice'], s['empty_gt'], s['empty_gt_predicted_empty']) == (2, 2, 1)
    assert s['patients_dice'] == ['A', 'D'] and s['empty_gt_patients'] == ['B', 'C']
    assert s['fp_per_scan'] == pytest.approx(1/4)             # C's component is a false positive

def test_detection_by_size_bins():
    shape, spacing = (60, 60, 120), (1.0, 1.0, 1.0)
    diam = {'4mm': 4.4, '8mm': 8.2, '15mm': 15.0, '25mm': 25.0}
    centres = {'4mm': (10, 10, 10), '8mm': (10, 10, 30), '15mm': (30, 30, 50), '25mm': (30, 30, 90)}
    truth = np.zeros(shape, bool)
    for k in diam: truth |= ball(shape, centres[k], diam[k]/2)
    pred = ball(shape, centres['8mm'], 2.5) | ball(shape, centres['25mm'], 8) | box(shape, (50, 50, 5), (53, 53, 8))   # 2 hits, 1 FP
    nodules, n_fp = match_nodules(pred, truth, spacing)
    by_bin = {n['size_bin']: n for n in nodules}
    assert set(by_bin) == {'3-6', '6-10', '10-20', '>20'}
    for k, b in zip(diam, ['3-6', '6-10', '10-20', '>20']):
        assert by_bin[b]['diameter_mm'] == pytest.approx(equivalent_diameter_mm(int(ball(shape, centres[k], diam[k]/2).sum()), spacing), abs=0.01)
    assert [by_bin[b]['hit'] for b in ['3-6', '6-10', '10-20', '>20']] == [False, True, False, True]
    assert by_bin['>20']['iou'] == pytest.approx(ball(shape, centres['25mm'], 8).sum()/ball(shape, centres['25mm'], 12.5).sum(), abs=1e-3)
    assert n_fp == 1
    s = detection_summary(nodules, [n_fp, 0])
    assert s['sensitivity_6mm_plus'] == pytest.approx(2/3) and s['sensitivity'] == pytest.approx(0.5)
    assert s['fp_per_scan'] == pytest.approx(0.5)
    assert s['sensitivity_by_size']['10-20'] == dict(n=1, hits=0, sensitivity=0.0)

def test_slice_level_extras_are_labelled():
    e = slice_level_extras(box((10, 8, 8), (2, 0, 0), (4, 8, 4)), box((10, 8, 8), (2, 0, 0), (4, 8, 8)))
    assert set(e) == {'extra_slice_dice_tumour_slices', 'extra_empty_slices_predicted_empty'}
    assert e['extra_slice_dice_tumour_slices'] == pytest.approx(2*32/(32 + 64))

def test_reader_agreement_uses_the_other_readers_only():
    a, b = box((10, 20, 20), (2, 2, 2), (6, 10, 10)), box((10, 20, 20), (2, 2, 2), (6, 10, 6))
    table = reader_agreement(np.stack([a, a, a, b]), (1, 1, 1))
    # reader 3 against the others (all equal to a): 2|a∩b| / (|a| + |b|); readers 0-2 against {a, a, b} at >= half of 3: a
    assert table.dice.iloc[3] == pytest.approx(2*b.sum()/(a.sum() + b.sum()))
    assert np.allclose(table.dice.iloc[:3], 1.0)

def test_predict_probabilities_flip_tta_averages_flipped_passes():
    import torch
    conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad(): conv.weight.copy_(torch.arange(9.).reshape(1, 1, 3, 3)/9 - 0.4)   # not flip-invariant
    x = np.random.default_rng(0).random((5, 1, 16, 16)).astype(np.float32)
    plain = predict_probabilities(conv, x, batch_size=2, precision='32-true')
    t = torch.from_numpy(x)
    with torch.no_grad():
        expected = (torch.sigmoid(conv(t)) + torch.sigmoid(conv(t.flip(-1))).flip(-1) + torch.sigmoid(conv(t.flip(-2))).flip(-2))/3
    assert np.allclose(predict_probabilities(conv, x, batch_size=2, tta=True, precision='32-true'), expected[:, 0].numpy(), atol=1e-6)
    assert not np.allclose(plain, expected[:, 0].numpy(), atol=1e-4)

def test_predict_probabilities_bf16_close_to_fp32():
    "bf16 inference (what 'auto' picks on CPUs and GPUs with native bf16) stays within a few hundredths of fp32."
    import torch
    conv = torch.nn.Conv2d(3, 1, 3, padding=1)
    x = np.random.default_rng(1).random((4, 3, 16, 16)).astype(np.float32)
    fp32 = predict_probabilities(conv, x, precision='32-true')
    bf16 = predict_probabilities(conv, x, precision='bf16-mixed')
    assert bf16.dtype == np.float32 and np.abs(bf16 - fp32).max() < 0.02
    assert not np.array_equal(bf16, fp32)      # it did compute in bf16

# --- lungseg evaluate end to end --------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def toy_run(tmp_path_factory):
    from lung_tumor_seg.volumes import toy_chest, Volume
    from lung_tumor_seg.preprocessing import PreprocessConfig, preprocess, Case
    from lung_tumor_seg.training import SegModule
    root = tmp_path_factory.mktemp('evalrun')
    def case(name, seed):
        def load():
            hu, mask = toy_chest(n_slices=20, size=64, seed=seed)
            if name == 'TOY-3': mask[:] = 0    # a patient without tumour
            return Volume(hu, (2.5, 0.8, 0.8), np.diag([-0.8, -0.8, 2.5, 1.0]), name), mask
        return Case(name, name, load)
    prep = root/'prep'
    names = ['PHANTOM-0001', 'TOY-1', 'TOY-2', 'TOY-3']    # the first shares its ID with the phantom patient of the reader test
    res = preprocess([case(n, i) for i, n in enumerate(names)], prep, PreprocessConfig(image_size=(32, 32), slab='all'))
    assert res.ok
    split = json.loads((prep/'split.json').read_text())
    split['test'] = ['PHANTOM-0001', 'TOY-3']; (prep/'split.json').write_text(json.dumps(split))
    run = root/'run'; (run/'checkpoints').mkdir(parents=True)
    module = SegModule(model=dict(base_width=4, depth=2), preprocess=json.loads((prep/'preprocess.json').read_text()))
    save_checkpoint(module, run/'checkpoints'/'best.ckpt')
    (run/'config.yaml').write_text(yaml.safe_dump({'prep_dir': str(prep)}))
    log = run/'logs'/'csv'/'metrics.csv'; log.parent.mkdir(parents=True)
    log.write_text("epoch,step,train/loss_epoch,val/patient_dice\n0,9,0.9,\n0,9,,0.2\n1,19,0.6,\n1,19,,0.5\n")
    return run, prep, module

def test_evaluate_cli_writes_metrics(toy_run, capsys):
    run, prep, _ = toy_run
    assert evaluate_main(['--run', str(run), '--split', 'test']) == 0
    out = capsys.readouterr().out
    assert 'empty GT: 1' in out
    m = json.loads((run/'eval'/'metrics.json').read_text())
    for key in ('mean_patient_dice', 'median_patient_dice', 'sensitivity_6mm_plus', 'fp_per_scan', 'empty_mask_rule', 'split', 'patients', 'n_patients'):
        assert key in m
    assert m['split'] == 'test' and m['patients'] == ['PHANTOM-0001', 'TOY-3'] and m['n_patients'] == 2
    assert (m['n_patients_dice'], m['empty_gt'], m['patients_dice']) == (1, 1, ['PHANTOM-0001'])
    table = pd.read_csv(run/'eval'/'patients.csv')
    assert m['mean_patient_dice'] == pytest.approx(table.set_index('patient').loc['PHANTOM-0001', 'dice'], abs=1e-6)
    assert math.isnan(table.set_index('patient').loc['TOY-3', 'dice'])
    for name in ('nodules.csv', 'curves.png', 'patient_dice.png'): assert (run/'eval'/name).exists()

def test_evaluate_bad_inputs(toy_run, tmp_path, capsys):
    run, prep, module = toy_run
    assert evaluate_main(['--run', str(tmp_path/'nowhere')]) == 1
    assert 'run folder not found' in capsys.readouterr().err
    empty_run = tmp_path/'empty'; empty_run.mkdir()
    assert evaluate_main(['--run', str(empty_run)]) == 1
    assert 'best.ckpt' in capsys.readouterr().err
    from lung_tumor_seg.training import SegModule
    other = tmp_path/'other'; (other/'checkpoints').mkdir(parents=True)
    save_checkpoint(SegModule(model=dict(base_width=4, depth=2), preprocess=dict(window='lung', image_size=[64, 64])), other/'checkpoints'/'best.ckpt')
    assert evaluate_main(['--run', str(other), '--data', str(prep)]) == 1
    err = capsys.readouterr().err
    assert 'image_size' in err and len(err.strip().splitlines()) == 1

def test_evaluate_on_the_original_grid(tmp_path, capsys):
    "With --grid original the truth is the original Task06 label at the scan's own spacing, not the stored mask."
    import nibabel as nib, torch
    from lung_tumor_seg.volumes import toy_chest
    from lung_tumor_seg.preprocessing import PreprocessConfig, preprocess, task06_cases
    from lung_tumor_seg.training import SegModule
    task = tmp_path/'Task06_Lung'; (task/'imagesTr').mkdir(parents=True); (task/'labelsTr').mkdir()
    affine, training = np.diag([-0.7, -0.7, 2.0, 1.0]), []
    for i in range(3):
        hu, mask = toy_chest(n_slices=16, size=64, seed=10 + i)
        nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0), affine), task/'imagesTr'/f'lung_{i:03d}.nii.gz')
        nib.save(nib.Nifti1Image(mask.transpose(2, 1, 0), affine), task/'labelsTr'/f'lung_{i:03d}.nii.gz')
        training.append(dict(image=f'./imagesTr/lung_{i:03d}.nii.gz', label=f'./labelsTr/lung_{i:03d}.nii.gz'))
    (task/'dataset.json').write_text(json.dumps(dict(training=training)))
    prep = tmp_path/'prep'
    assert preprocess(task06_cases(task), prep, PreprocessConfig(image_size=(32, 32), slab='all')).ok
    module = SegModule(model=dict(base_width=4, depth=2), preprocess=json.loads((prep/'preprocess.json').read_text()))
    with torch.no_grad(): module.net.head.weight.zero_(); module.net.head.bias.fill_(10.)   # tumour everywhere
    run = tmp_path/'run'; (run/'checkpoints').mkdir(parents=True)
    save_checkpoint(module, run/'checkpoints'/'best.ckpt')
    assert evaluate_main(['--run', str(run), '--data', str(prep), '--split', 'train', '--grid', 'original']) == 0
    rows = pd.read_csv(run/'eval'/'patients.csv')
    assert len(rows) == len(json.loads((prep/'split.json').read_text())['train']) > 0
    for _, row in rows.iterrows():
        label = np.asarray(nib.load(task/'labelsTr'/f'{row.patient}.nii.gz').dataobj)
        assert row.true_voxels == int(label.sum()) and row.pred_voxels == label.size     # every original voxel predicted
        assert row.dice == pytest.approx(2*label.sum()/(label.sum() + label.size))
        assert row.spacing_mm == '2.000 0.700 0.700'
    assert 'original grid' in json.loads((run/'eval'/'metrics.json').read_text())['grid']
    (prep/'patients'/rows.patient[0]/'meta.json').write_text(json.dumps(
        json.loads((prep/'patients'/rows.patient[0]/'meta.json').read_text()) | dict(source=str(tmp_path/'gone.nii.gz'))))
    assert evaluate_main(['--run', str(run), '--data', str(prep), '--split', 'train', '--grid', 'original']) == 1
    err = capsys.readouterr().err   # the scan is read from its source, as `lungseg predict` reads it: the missing file is named
    assert 'gone.nii.gz: input not found' in err and len(err.strip().splitlines()) == 1

def test_evaluate_with_the_human_reference(toy_run, tmp_path, capsys):
    "--readers adds each reader-vs-others row of the evaluated patients that have an XML read (here the phantom's)."
    from lung_tumor_seg.phantom import cached_phantom
    run, prep, _ = toy_run
    phantom = cached_phantom(2)     # shared with the other tests that need the phantom
    assert evaluate_main(['--run', str(run), '--readers', str(phantom/'LIDC-IDRI'), '--split', 'test']) == 0
    assert 'human reference:' in capsys.readouterr().out
    readers = pd.read_csv(run/'eval'/'human_reference.csv')
    xml_readers = next(phantom.glob('LIDC-IDRI/PHANTOM-0001/*/*/*.xml')).read_text().count('<readingSession>')
    assert set(readers.patient) == {'PHANTOM-0001'} and len(readers) == xml_readers      # TOY-3 has no read: no rows
    m = json.loads((run/'eval'/'metrics.json').read_text())
    assert m['human_patients'] == ['PHANTOM-0001'] and m['human_reader_rows'] == xml_readers
    assert m['human_mean_reader_dice'] == pytest.approx(readers.dice.mean(), abs=1e-6)
    assert (run/'eval'/'model_vs_readers.png').exists()

def test_small_overlap_is_not_a_hit():
    "A predicted component that grazes a nodule (IoU below 0.1) does not find it."
    shape = (40, 40, 40)
    truth = ball(shape, (20, 20, 20), 8)
    graze = ball(shape, (20, 20, 29), 2)       # mostly outside, touches the rim
    nodules, n_fp = match_nodules(graze, truth, (1, 1, 1))
    assert nodules[0]['iou'] < 0.1 and not nodules[0]['hit'] and n_fp == 0
