"The run's own inference settings (RUN_DIR/inference.yaml): predict and evaluate use them, flags override them and say so; one engine."
import json
from pathlib import Path
import numpy as np, nibabel as nib, pytest, yaml
from test_cohort import random_checkpoint
from lung_tumor_seg.cli import main as lungseg
from lung_tumor_seg.core import LungsegError
from lung_tumor_seg.training import (DEFAULT_CONFIG, load_checkpoint, write_inference_settings, inference_settings, update_inference_settings,
                                     load_config, predict_trainer)

@pytest.fixture(scope='module')
def demo_like_run(tmp_path_factory):
    "Phantom DICOM through annotations, masks and preprocess (32x32), a run folder with a checkpoint and the demo's inference settings."
    from lung_tumor_seg.phantom import cached_phantom
    root = tmp_path_factory.mktemp('chain')
    raw = cached_phantom(5, max_slices=16, task06=False)/'LIDC-IDRI'
    ann, masks, prep, run = root/'ann', root/'masks', root/'prep', root/'run'
    assert lungseg(['annotations', str(raw), '--out', str(ann), '--dicom', str(raw)]) == 0
    assert lungseg(['masks', str(ann), '--dicom', str(raw), '--out', str(masks)]) == 0
    assert lungseg(['preprocess', '--dicom', str(raw), '--masks', str(masks), '--out', str(prep), '--size', '32', '32',
                    '--split', '0.6', '0.2', '0.2']) == 0
    preprocess = json.loads((prep/'preprocess.json').read_text())
    ckpt = random_checkpoint(run/'checkpoints'/'best.ckpt', preprocess)
    (run/'config.yaml').write_text(yaml.safe_dump({'data': {'prep_dir': str(prep)}}))
    config = load_config('demo')   # its inference section: flip TTA, no component under 10 mm³
    write_inference_settings(run, config, dict(load_checkpoint(ckpt).hparams))
    return raw, masks, prep, run, ckpt

def test_inference_file_records_the_settings_and_the_model(demo_like_run):
    *_, run, ckpt = demo_like_run
    saved = yaml.safe_load((run/'inference.yaml').read_text())
    assert (saved['tta'], saved['min_volume_mm3'], saved['threshold'], saved['second_stage']) == (True, 10.0, DEFAULT_CONFIG['val']['threshold'], False)
    assert saved['model']['in_channels'] == 3 and saved['model']['image_size'] == [32, 32]
    assert 'val.threshold' in saved['chosen']['threshold']
    hparams = dict(load_checkpoint(ckpt).hparams)
    settings, notes = inference_settings(ckpt, hparams, False)
    assert settings['tta'] and settings['min_volume_mm3'] == 10 and notes == []
    settings, notes = inference_settings(ckpt, hparams, False, dict(tta=False, threshold=None))
    assert not settings['tta'] and notes == ['--tta False overrides inference.yaml (tta: True)']

def test_an_inference_file_of_another_model_is_refused(demo_like_run, tmp_path):
    *_, run, ckpt = demo_like_run
    other = tmp_path/'run'; (other/'checkpoints').mkdir(parents=True)
    (other/'checkpoints'/'best.ckpt').write_bytes(Path(ckpt).read_bytes())
    saved = yaml.safe_load((run/'inference.yaml').read_text())
    saved['model']['context_slices'], saved['model']['in_channels'] = 4, 9
    (other/'inference.yaml').write_text(yaml.safe_dump(saved))
    with pytest.raises(LungsegError, match=r"settings of another model: in_channels 9 \(the checkpoint's: 3\); context_slices 4"):
        inference_settings(other/'checkpoints'/'best.ckpt', dict(load_checkpoint(ckpt).hparams), False)
    (other/'inference.yaml').unlink()   # an older run: defaults, said in one line
    settings, notes = inference_settings(other/'checkpoints'/'best.ckpt', dict(load_checkpoint(ckpt).hparams), False)
    assert not settings['tta'] and len(notes) == 1 and 'not found' in notes[0] and 'defaults: threshold 0.5, no TTA' in notes[0]
    with pytest.raises(LungsegError, match='not found'): update_inference_settings(other/'checkpoints'/'best.ckpt', threshold=(0.4, 'chosen'))

def test_predict_without_flags_writes_the_mask_evaluate_scored(demo_like_run, tmp_path, capsys):
    "The masks `lungseg evaluate` scored are, voxel for voxel, those `lungseg predict` writes for the same scans with no flags."
    from lung_tumor_seg.core import read_series
    from lung_tumor_seg.volumes import to_lps_grid
    raw, masks, prep, run, ckpt = demo_like_run
    assert lungseg(['evaluate', '--run', str(run), '--split', 'test', '--grid', 'original', '--masks', str(masks), '--accelerator', 'cpu']) == 0
    metrics = json.loads((run/'eval'/'metrics.json').read_text())
    assert metrics['inference']['tta'] is True and metrics['inference']['min_volume_mm3'] == 10 and metrics['inference']['source'].endswith('inference.yaml')
    assert metrics['device'] == 'cpu'
    checked = 0
    for patient in metrics['patients']:
        series_dir = next((raw/patient).glob('*/*'))
        out = tmp_path/patient
        assert lungseg(['predict', '--checkpoint', str(ckpt), '--input', str(series_dir), '--out', str(out), '--no-animation']) == 0
        assert 'overrides' not in capsys.readouterr().out
        summary = json.loads(next(out.glob('*_prediction.json')).read_text())
        assert summary['inference'] == metrics['inference']
        predicted = np.asarray(nib.load(next(out.glob('*_mask.nii.gz'))).dataobj)
        predicted_lps, _ = to_lps_grid(predicted.transpose(2, 1, 0), read_series(series_dir).geometry.affine)
        scored = np.load(run/'eval'/'masks'/f'{patient}.npz')['mask']
        assert scored.shape == predicted_lps.shape and np.array_equal(scored, predicted_lps > 0), patient
        checked += int(scored.any())
    assert checked >= 1   # at least one non-empty mask compared

def test_flags_override_and_say_so(demo_like_run, tmp_path, capsys):
    raw, *_, ckpt = demo_like_run
    series_dir = next(raw.glob('PHANTOM-0001/*/*'))
    assert lungseg(['predict', '--checkpoint', str(ckpt), '--input', str(series_dir), '--out', str(tmp_path), '--no-tta', '--no-animation']) == 0
    assert '--tta False overrides inference.yaml (tta: True)' in capsys.readouterr().out
    assert json.loads(next(tmp_path.glob('*_prediction.json')).read_text())['inference']['tta'] is False

def test_the_device_is_the_one_asked_for(demo_like_run, capsys):
    "Lightning chooses the device: --accelerator cpu runs on the CPU; a GPU asked for where there is none is one clear line."
    *_, run, _ = demo_like_run
    assert predict_trainer('cpu').strategy.root_device.type == 'cpu'
    import torch
    if not torch.cuda.is_available():
        assert lungseg(['evaluate', '--run', str(run), '--split', 'test', '--accelerator', 'gpu']) == 1
        err = capsys.readouterr().err
        assert err.startswith('lungseg: error: --accelerator gpu') and len(err.strip().splitlines()) == 1

def test_a_threshold_chosen_on_validation_patients_is_written(demo_like_run, tmp_path, capsys):
    "`lungseg evaluate --split val --choose-threshold`: the best of the candidates on validation patients goes into inference.yaml; never on test."
    *_, run, ckpt = demo_like_run
    saved = (run/'inference.yaml').read_text()
    try:
        assert lungseg(['evaluate', '--run', str(run), '--split', 'test', '--choose-threshold', '0.3', '0.6']) == 1
        assert 'validation patients only' in capsys.readouterr().err
        assert lungseg(['evaluate', '--run', str(run), '--split', 'val', '--choose-threshold', '0.3', '0.6', '--accelerator', 'cpu']) == 0
        scores = {t: json.loads((run/'eval_val'/f'threshold_{t}'/'metrics.json').read_text())['mean_patient_dice'] for t in ('0.3', '0.6')}
        scores = {t: -1 if v is None else v for t, v in scores.items()}   # no tumour to score: the first candidate
        chosen = yaml.safe_load((run/'inference.yaml').read_text())
        assert chosen['threshold'] == float(max(scores, key=scores.get)) and 'validation patients' in chosen['chosen']['threshold']
        assert chosen['tta'] is True    # the other settings stay
    finally: (run/'inference.yaml').write_text(saved)
