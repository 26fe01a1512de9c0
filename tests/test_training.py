"Training end to end on tiny synthetic chests: `lungseg train`, the per-patient validation rule, checkpoints, bad input, two-process DDP on CPU."
import json, os, subprocess, sys
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch, yaml
import lightning as L
from lung_tumor_seg.core import LungsegError, save_nifti
from lung_tumor_seg.preprocessing import preprocess, task06_cases, PreprocessConfig
try: from lung_tumor_seg.volumes import toy_chest
except ImportError: from lung_tumor_seg.preprocessing import toy_chest
from lung_tumor_seg.dataset import LungDataModule
from lung_tumor_seg.training import (SegModule, load_config, load_checkpoint, train_main, make_loss, LOSSES, resolve_precision,
                                     checkpoint_settings)

ROOT = Path(__file__).resolve().parents[1]
LUNGSEG = Path(sys.executable).parent/'lungseg'
TINY = ['--set', 'threads=1', '--set', 'model.base_width=4', '--set', 'model.depth=2', '--batch-size', '8', '--num-workers', '0',
        '--limit-train-batches', '3', '--set', 'trainer.log_every_n_steps=1', '--set', 'trainer.progress_bar=false',
        '--set', 'trainer.model_summary=false', '--set', 'optim.warmup_steps=1']

@pytest.fixture(scope='module')
def prep(tmp_path_factory):
    "A preprocessed folder of six synthetic chests (64x64 slices): 3 train, 2 validation, 1 test patients."
    work = tmp_path_factory.mktemp('chests')
    training = []
    for i in range(6):
        hu, mask = toy_chest(n_slices=16, size=64, n_nodules=2, seed=i)
        for kind, arr in (('imagesTr', hu), ('labelsTr', mask)): save_nifti(arr, np.diag([-0.7, -0.7, 2.5, 1]), work/'task'/kind/f'lung_{i:03d}.nii.gz')
        training.append(dict(image=f'./imagesTr/lung_{i:03d}.nii.gz', label=f'./labelsTr/lung_{i:03d}.nii.gz'))
    (work/'task'/'dataset.json').write_text(json.dumps(dict(name='synthetic', training=training)))
    prep = work/'prep'
    assert preprocess(task06_cases(work/'task'), prep, PreprocessConfig(image_size=64)).ok
    patients = sorted(p.name for p in (prep/'patients').iterdir())
    (prep/'split.json').write_text(json.dumps(dict(train=patients[:3], val=patients[3:5], test=patients[5:], seed=0, rule='test')))
    return prep

@pytest.fixture(scope='module')
def run(prep, tmp_path_factory):
    "A 2.5D run of two tiny epochs made with `lungseg train`."
    run = tmp_path_factory.mktemp('runs')/'run'
    assert train_main(['--data', str(prep), '--out', str(run), '--max-epochs', '2', '--set', 'data.context_slices=1',
                       '--set', 'train.crop_size=48', *TINY]) == 0
    return run

def test_cli_run_leaves_checkpoints_logs_config_and_panel(prep, run):
    for name in ('checkpoints/best.ckpt', 'checkpoints/last.ckpt', 'config.yaml', 'val_panel.png', 'logs/csv/metrics.csv'):
        assert (run/name).is_file(), name
    config = yaml.safe_load((run/'config.yaml').read_text())
    assert config['train']['crop_size'] == 48
    assert config['trainer']['max_epochs'] == 2 and config['data']['context_slices'] == 1 and config['data']['prep_dir'] == str(prep.resolve())
    # the run's own config.yaml is a valid --config for another run
    assert load_config(run/'config.yaml')['model']['base_width'] == 4
    metrics = pd.read_csv(run/'logs'/'csv'/'metrics.csv')
    assert metrics['val/patient_dice'].notna().sum() == 2
    assert metrics['val/patients_with_tumor'].dropna().eq(2).all()
    # the contract: Lightning's own loader and ours both restore the 2.5D model with the data's recipe
    model = SegModule.load_from_checkpoint(run/'checkpoints'/'best.ckpt', map_location='cpu', weights_only=False)
    assert model.net.in_channels == 3 and model.hparams.preprocess['image_size'] == [64, 64]
    ours = load_checkpoint(run/'checkpoints'/'best.ckpt', expect=dict(in_channels=3, context_slices=1, image_size=(64, 64), window='lung'))
    x = torch.rand(2, 3, 64, 64)
    assert torch.allclose(ours(x), model.eval()(x))

class Oracle(SegModule):
    "Predicts from a table of volumes by patient, to check the validation arithmetic independently of learning."
    def __init__(self, table, **kw):
        super().__init__(**kw); self.table = table
    def validation_step(self, batch, batch_idx):
        self.current = batch['patient']; return super().validation_step(batch, batch_idx)
    def probabilities(self, image, chunk_slices=None): return self.table[self.current].to(image.device).float()

def test_validation_dice_is_per_patient_3d_and_empty_patients_are_counted_apart(prep):
    split = json.loads((prep/'split.json').read_text())
    tumour, other = split['val']
    truth = torch.from_numpy(np.load(prep/'patients'/tumour/'mask.npy')).bool()
    pred = truth.clone(); zs = torch.nonzero(truth.flatten(1).any(1)).flatten(); pred[zs[0]] = False   # miss one tumour slice
    pred[0, :4, :4] = True                                                                              # and add a false positive
    expected = 2*(pred & truth).sum().item() / (pred.sum().item() + truth.sum().item())
    # the second validation patient gets an empty ground truth (and an empty prediction)
    mask_file = prep/'patients'/other/'mask.npy'
    saved = np.load(mask_file)
    np.save(mask_file, np.zeros_like(saved))
    try:
        module = Oracle({tumour: pred, other: torch.zeros(saved.shape, dtype=torch.bool)}, model=dict(base_width=4, depth=2))
        trainer = L.Trainer(accelerator='cpu', devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.validate(module, datamodule=LungDataModule(prep, batch_size=4, num_workers=0))
    finally: np.save(mask_file, saved)
    m = trainer.callback_metrics
    assert 0.5 < expected < 1
    assert m['val/patient_dice'].item() == pytest.approx(expected, abs=1e-6)  # not (expected + 1) / 2
    assert (m['val/patients_with_tumor'].item(), m['val/empty_patients'].item(), m['val/empty_patients_fp_free'].item()) == (1, 1, 1)

def test_resume_continues_and_refuses_another_model(prep, tmp_path):
    run = tmp_path/'run'
    assert train_main(['--data', str(prep), '--out', str(run), '--max-epochs', '1', *TINY]) == 0
    first = torch.load(run/'checkpoints'/'last.ckpt', weights_only=False)['global_step']
    # validation (and the best checkpoint) only every second epoch: last.ckpt still follows every epoch
    assert train_main(['--data', str(prep), '--out', str(run), '--max-epochs', '3', '--resume', 'last', *TINY,
                       '--set', 'trainer.check_val_every_n_epoch=2']) == 0
    last = torch.load(run/'checkpoints'/'last.ckpt', weights_only=False)
    assert (last['epoch'], last['global_step']) == (2, 3*first)
    with pytest.raises(LungsegError, match='base_width=4, expected 8'):
        train_main.__wrapped__(['--data', str(prep), '--out', str(run), '--max-epochs', '3', '--resume', 'last', *TINY, '--set', 'model.base_width=8'])

def test_seeded_runs_are_reproducible(prep, run, tmp_path):
    "Same seed, same data, same settings: identical weights after training (CPU, deterministic algorithms)."
    assert train_main(['--data', str(prep), '--out', str(tmp_path/'again'), '--max-epochs', '2', '--set', 'data.context_slices=1',
                       '--set', 'train.crop_size=48', *TINY]) == 0
    first, again = (torch.load(r/'checkpoints'/'last.ckpt', weights_only=False)['state_dict'] for r in (run, tmp_path/'again'))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)

def test_ema_checkpoint_holds_the_average_of_the_weights(prep, tmp_path):
    "With train.ema_decay the checkpoint's weights are the moving average, which lags the trained weights; loading gives the average."
    run = tmp_path/'ema'
    assert train_main(['--data', str(prep), '--out', str(run), '--max-epochs', '2', *TINY, '--set', 'train.ema_decay=0.5',
                       '--set', 'optim.lr=0.05']) == 0
    ckpt = torch.load(run/'checkpoints'/'last.ckpt', weights_only=False)
    average, trained = ckpt['state_dict'], ckpt['current_model_state']
    weights = [k for k in average if k.endswith('.weight')]
    assert weights and any(not torch.equal(average[k], trained[k]) for k in weights)   # the average is not the last weights
    loaded = load_checkpoint(run/'checkpoints'/'last.ckpt').state_dict()
    assert all(torch.equal(loaded[k], average[k]) for k in weights)

def test_bad_checkpoints_are_named_errors(run, tmp_path):
    best = run/'checkpoints'/'best.ckpt'
    with pytest.raises(LungsegError, match=r'checkpoint has image_size=\[64, 64\], expected \[256, 256\]'):
        load_checkpoint(best, expect=dict(image_size=[256, 256]))
    with pytest.raises(LungsegError, match='checkpoint has in_channels=3, expected 1'): load_checkpoint(best, expect=dict(in_channels=1))
    for name, content in (('empty.ckpt', b''), ('noise.ckpt', os.urandom(4096)), ('cut.ckpt', best.read_bytes()[:len(best.read_bytes())//2])):
        (tmp_path/name).write_bytes(content)
        with pytest.raises(LungsegError, match=f'{name}: not a readable checkpoint'): load_checkpoint(tmp_path/name)
    ckpt = torch.load(best, weights_only=False)
    ckpt['state_dict']['net.head.weight'] = torch.zeros(1, 8, 1, 1)   # weights of another width
    torch.save(ckpt, tmp_path/'mixed.ckpt')
    with pytest.raises(LungsegError, match='weights do not match'): load_checkpoint(tmp_path/'mixed.ckpt')

def test_cli_reports_bad_settings(prep, tmp_path, capsys):
    assert train_main(['--data', str(prep), '--out', str(tmp_path/'r'), '--set', 'loss.name=hinge', *TINY]) == 1
    assert "unknown loss 'hinge'" in capsys.readouterr().err
    (tmp_path/'typo.yaml').write_text('trainer:\n  max_epoch: 3\n')
    assert train_main(['--data', str(prep), '--out', str(tmp_path/'r'), '--config', str(tmp_path/'typo.yaml')]) == 1
    assert "unknown setting 'trainer.max_epoch'" in capsys.readouterr().err
    assert not (tmp_path/'r'/'checkpoints').exists()

@pytest.mark.parametrize('name', ['demo', 'lidc_full', 'task06_full'])
def test_committed_configs_load(name):
    config = load_config(ROOT/'lung_tumor_seg'/'configs'/f'{name}.yaml')
    module = SegModule.from_config(config)
    assert checkpoint_settings(module.hparams)['in_channels'] == 1 + 2*config['data']['context_slices']
    assert isinstance(config['optim']['lr'], float)

def test_losses_and_precision(monkeypatch):
    target = torch.zeros(2, 1, 16, 16); target[0, :, 4:8, 4:8] = 1
    for name in LOSSES:
        logits = torch.zeros_like(target, requires_grad=True)
        loss = make_loss(name)(logits, target)
        loss.backward()
        assert torch.isfinite(loss) and logits.grad.abs().sum() > 0, name
    assert resolve_precision('16-mixed', 'cpu') == '16-mixed'
    import lung_tumor_seg.training as training
    monkeypatch.setattr(training, 'cpu_bf16_supported', lambda: False)   # a CPU without native bf16: fp32
    assert resolve_precision('auto', 'cpu') == '32-true'
    monkeypatch.setattr(training, 'cpu_bf16_supported', lambda: True)    # AVX512-BF16 or AMX: bf16 autocast
    assert resolve_precision('auto', 'cpu') == 'bf16-mixed'

def test_two_process_ddp_on_cpu(prep, tmp_path):
    "Two processes (gloo) train one short epoch; validation patients are split between them and gathered."
    run = tmp_path/'ddp'
    env = os.environ | dict(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    res = subprocess.run([sys.executable, str(LUNGSEG), 'train', '--data', str(prep), '--out', str(run), '--max-epochs', '1',
                          '--accelerator', 'cpu', '--devices', '2', '--strategy', 'ddp', *TINY],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'MEMBER: 2/2' in res.stdout + res.stderr
    assert (run/'checkpoints'/'best.ckpt').is_file() and (run/'checkpoints'/'last.ckpt').is_file()
    metrics = pd.read_csv(run/'logs'/'csv'/'metrics.csv')
    # each process validated one of the two patients; the logged count covers both
    assert metrics['val/patients_with_tumor'].dropna().tolist() == [2.0]
    assert load_checkpoint(run/'checkpoints'/'best.ckpt').hparams.preprocess['image_size'] == [64, 64]

def test_fp_reduction_is_trained_with_the_unet_and_used_by_evaluate_and_predict(prep, tmp_path):
    from lung_tumor_seg.evaluation import evaluate_run
    from lung_tumor_seg.inference import predict
    from lung_tumor_seg.fp_reduction import FalsePositiveFilter, train_main as lungseg_train   # `lungseg train`: the U-Net, then the second stage
    run = tmp_path/'run'
    assert lungseg_train(['--data', str(prep), '--out', str(run), '--max-epochs', '1', '--set', 'data.context_slices=1', *TINY,
                       '--set', 'fp_reduction.enabled=true', '--set', 'fp_reduction.steps=3', '--set', 'fp_reduction.batch_size=8',
                       '--set', 'fp_reduction.mine_patients=2', '--set', 'fp_reduction.threshold=0.0']) == 0
    path = run/'checkpoints'/'fp_reduction.pt'
    fp = FalsePositiveFilter.load(path, dict(image_size=[64, 64], window='lung', pixel_mm=None))
    assert fp.settings['steps'] == 3 and fp.settings['threshold'] == 0.0
    import yaml
    inference = yaml.safe_load((run/'inference.yaml').read_text())   # written by training: the second stage is on, the threshold the validation one
    assert inference['second_stage'] is True and inference['threshold'] == 0.5 and 'fp_reduction.enabled' in inference['chosen']['second_stage']
    used = evaluate_run(run, 'val', out_dir=tmp_path/'eval_fp')
    assert used['fp_reduction'].startswith('checkpoints/fp_reduction.pt') and 'candidates' in used['fp_reduction']
    assert evaluate_run(run, 'val', out_dir=tmp_path/'eval_plain', fp_reduction=False)['fp_reduction'] == 'off'
    volume = next((prep.parent/'task'/'imagesTr').glob('*.nii.gz'))
    assert predict(run/'checkpoints'/'best.ckpt', volume, tmp_path/'pred', animation=False)['inference']['second_stage'] is True
    assert predict(run/'checkpoints'/'best.ckpt', volume, tmp_path/'pred2', animation=False, fp_reduction=False)['inference']['second_stage'] is False
    # a classifier trained on other data is refused by name
    with pytest.raises(LungsegError, match='image_size'): FalsePositiveFilter.load(path, dict(image_size=[128, 128], window='lung', pixel_mm=None))

def test_typed_configuration_on_the_command_line(prep, tmp_path, capfd):
    "`lungseg train --config demo --trainer.max_epochs N` trains with the packaged recipe; --print_config is complete; a misspelt key is one line."
    run = tmp_path/'demo-run'
    assert train_main(['--config', 'demo', '--data', str(prep), '--out', str(run), '--trainer.max_epochs', '1',
                       '--trainer.limit_train_batches', '2', '--trainer.check_val_every_n_epoch', '1', '--train.crop_size', '32',
                       '--data.context_mm', 'null', '--data.context_slices', '1', '--model.base_width', '4', '--model.depth', '2',
                       '--trainer.enable_progress_bar', 'false', '--trainer.enable_model_summary', 'false']) == 0
    saved = yaml.safe_load((run/'config.yaml').read_text())
    demo = yaml.safe_load((ROOT/'lung_tumor_seg'/'configs'/'demo.yaml').read_text())
    assert saved['trainer']['max_epochs'] == 1 and saved['optim'] == load_config('demo')['optim'] != load_config()['optim']
    assert saved['fp_reduction']['enabled'] == demo['fp_reduction']['enabled'] and saved['data']['sampler'] == demo['data']['sampler']
    assert 'accumulate_grad_batches' in saved['trainer'] and 'max_time' in saved['trainer']   # the full resolved configuration
    capfd.readouterr()
    r = subprocess.run([str(LUNGSEG), 'train', '--config', 'demo', '--print_config'], capture_output=True, text=True)
    printed = yaml.safe_load(r.stdout)
    assert r.returncode == 0 and set(printed) >= {'model', 'loss', 'optim', 'data', 'train', 'val', 'trainer', 'early_stopping', 'fp_reduction'}
    assert printed['model']['channels_last'] is True and printed['trainer']['gradient_clip_val'] == 1.0
    r = subprocess.run([str(LUNGSEG), 'train', '--data', str(prep), '--out', str(tmp_path/'x'), '--trainer.max_epoch', '2'], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count('\n') == 1 and 'trainer.max_epoch' in r.stderr, r.stderr
    (tmp_path/'typo.yaml').write_text('optim:\n  lr: fast\n')
    r = subprocess.run([str(LUNGSEG), 'train', '--data', str(prep), '--out', str(tmp_path/'x'), '--config', str(tmp_path/'typo.yaml')], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count('\n') == 1 and 'typo.yaml' in r.stderr and "optim.lr" in r.stderr and 'float' in r.stderr, r.stderr

def test_compiled_training_keeps_one_copy_of_the_weights_and_computes_as_eager(prep, tmp_path, monkeypatch):
    "train.compile=true: the U-Net's training passes are compiled, the checkpoint holds the keys of an eager run, and the first loss is the eager one."
    pytest.importorskip('torch._inductor')
    from lung_tumor_seg.training import compile_training
    if not compile_training('auto', '32-true', 'cpu'): pytest.skip('no C compiler for torch.compile here')
    compiled_nets, real_compile = [], torch.compile
    monkeypatch.setattr(torch, 'compile', lambda net, **kw: compiled_nets.append(type(net).__name__) or real_compile(net, **kw))
    for name, flag in (('eager', 'false'), ('compiled', 'true')):
        assert train_main(['--data', str(prep), '--out', str(tmp_path/name), '--max-epochs', '2', '--set', 'data.context_slices=1',
                           '--set', 'train.crop_size=48', '--set', f'train.compile={flag}', '--set', 'trainer.precision=32-true', *TINY,
                           '--set', 'model.dropout=0.0']) == 0   # dropout draws its masks differently when compiled
    assert compiled_nets == ['UNet']                                             # the compiled run only, and the U-Net only
    eager, compiled = (torch.load(tmp_path/r/'checkpoints'/'last.ckpt', weights_only=False) for r in ('eager', 'compiled'))
    assert compiled['hyper_parameters']['train']['compile'] is True
    assert eager['state_dict'].keys() == compiled['state_dict'].keys()          # no second copy under the compiled wrapper
    first_loss = [pd.read_csv(tmp_path/r/'logs'/'csv'/'metrics.csv')['train/loss_step'].dropna().iloc[0] for r in ('eager', 'compiled')]
    assert first_loss[0] == pytest.approx(first_loss[1], rel=1e-4)              # same batch, same weights: the same forward pass
