"The false-positive reduction stage: patches on the stored grid, component centres, dense blobs, the training set, the filter's decisions, bad files."
import json
from pathlib import Path
import numpy as np, pytest, torch
from torch import nn
from lung_tumor_seg.core import LungsegError
from lung_tumor_seg.fp_reduction import (candidate_patch, component_centres, candidate_set, FalsePositiveFilter, CandidateNet,
                                         fp_filter_for, FP_FILE, dense_blobs, blob_segment, nodule_peak, mine_blobs)

def test_patch_steps_in_mm_whatever_the_slice_spacing():
    ramp = np.broadcast_to(np.arange(30, dtype=np.float32)[:, None, None], (30, 8, 8)).copy()   # value = slice index
    patch = candidate_patch(ramp, (12, 4, 4), slice_mm=2.5, slices=5, z_mm=2.0, pixels=4)
    np.testing.assert_allclose(patch[:, 2, 2], 12 + 0.8*np.arange(-2, 3), atol=1e-5)        # 2 mm = 0.8 slices of 2.5 mm
    top = candidate_patch(ramp, (1, 4, 4), slice_mm=1.0, slices=5, z_mm=2.0, pixels=4)
    np.testing.assert_allclose(top[:, 2, 2], [0, 0, 1, 3, 5])                                 # clamped at the first slice

def test_component_centres_on_the_full_grid():
    mask = np.zeros((10, 20, 30), bool)
    mask[2:5, 3:6, 4:7] = True; mask[7, 15, 25] = True
    labels, centres = component_centres(mask)
    assert labels.shape == mask.shape and labels.max() == 2
    np.testing.assert_allclose(centres, [[3, 4, 5], [7, 15, 25]])
    assert labels[3, 4, 5] != labels[7, 15, 25] and labels[0, 0, 0] == 0
    assert component_centres(np.zeros((4, 4, 4), bool))[1].shape == (0, 3)

class EndsInZ(nn.Module):
    "A stand-in classifier: a nodule when the top and bottom of its patch are dark at the centre (it ends in z), else not."
    width = 1
    def forward(self, x): return torch.where((x[:, 0, 0, 8, 8] < 0.5) & (x[:, 0, -1, 8, 8] < 0.5), 5.0, -5.0)

def scene():
    vol = np.full((9, 32, 48), 0.3, np.float32)
    zz, yy, xx = np.ogrid[:9, :32, :48]
    vol[(zz - 4)**2*4 + (yy - 16)**2 + (xx - 10)**2 <= 9] = 0.9                  # a ball
    vol[np.broadcast_to((yy - 16)**2 + (xx - 36)**2 <= 9, vol.shape)] = 0.9      # a tube through every slice
    prob = np.zeros(vol.shape, np.float32); prob[3:6][vol[3:6] > 0.6] = 0.8
    return vol, prob

def test_suppress_zeroes_rejected_components_only():
    vol, prob = scene()
    fp = FalsePositiveFilter(EndsInZ(), dict(patch_slices=9, patch_z_mm=1.0, patch_pixels=16, min_volume_mm3=0))
    kept, counts = fp.suppress(prob, vol, (1.0, 1.0, 1.0))
    assert counts == dict(candidates=2, rejected=1)
    np.testing.assert_array_equal(kept[:, :, :24], prob[:, :, :24])   # the ball untouched
    assert kept[:, :, 24:].max() == 0                                  # the tube gone
    assert prob[:, :, 24:].max() == 0.8                                # the input untouched
    # candidates below the threshold or the volume floor are neither scored nor changed
    assert fp.suppress(prob, vol, (1.0, 1.0, 1.0), threshold=0.9)[1] == dict(candidates=0, rejected=0)
    with pytest.raises(LungsegError, match='differ in shape'): fp.suppress(prob[:4], vol, (1.0, 1.0, 1.0))

def test_saved_filter_round_trip_and_bad_files(tmp_path):
    fp = FalsePositiveFilter(CandidateNet(2), dict(patch_slices=5, patch_pixels=16), dict(image_size=[64, 64], window='lung', pixel_mm=0.8))
    path = fp.save(tmp_path/'checkpoints'/FP_FILE)
    again = fp_filter_for(tmp_path/'checkpoints'/'best.ckpt', dict(image_size=[64, 64], window='lung', pixel_mm=0.8))
    x = torch.rand(3, 1, 5, 16, 16)
    with torch.no_grad(): torch.testing.assert_close(again.net(x), fp.net(x))
    assert again.settings['patch_slices'] == 5 and again.settings['width'] == 2
    assert fp_filter_for(tmp_path/'elsewhere'/'best.ckpt') is None
    with pytest.raises(LungsegError, match='pixel_mm'): FalsePositiveFilter.load(path, dict(image_size=[64, 64], window='lung', pixel_mm=0.7))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(LungsegError, match=f'{FP_FILE}: not a readable'): FalsePositiveFilter.load(path)
    torch.save(dict(format=1, state_dict=CandidateNet(2).state_dict(), settings=dict(width=2)), path)   # saved before the search
    assert FalsePositiveFilter.load(path).settings['recall_score'] is None
    assert FalsePositiveFilter.load(fp.save(path)).settings['recall_score'] == 0.7
    torch.save(dict(format=1, state_dict={'x': torch.zeros(1)}, settings={}), path)
    with pytest.raises(LungsegError, match='weights do not match'): FalsePositiveFilter.load(path)

def test_candidate_set_labels_nodules_random_and_mined_points(tmp_path):
    image = np.full((12, 40, 40), 0.3, np.float16); image[:, 10:13, 10:13] = 0.9           # a vessel
    mask = np.zeros(image.shape, np.uint8); mask[5:8, 25:29, 25:29] = 1; image[mask > 0] = 0.9
    mask[2, 30:32, 5:7] = 1                                                                  # a second, tiny nodule
    folder = tmp_path/'patients'/'P1'; folder.mkdir(parents=True)
    np.save(folder/'image.npy', image); np.save(folder/'mask.npy', mask)
    (folder/'meta.json').write_text(json.dumps(dict(stored_spacing_mm=[2.0, 0.8, 0.8])))
    settings = dict(patch_slices=5, patch_pixels=16, positive_copies=3, peak_copies=2, random_negatives=4, mined_copies=2, blob_copies=1)
    patches, labels = candidate_set(tmp_path, ['P1'], {'P1': np.array([[6.0, 11.0, 11.0]])}, settings,
                                    blobs={'P1': np.array([[3.0, 11.0, 11.0], [9.0, 11.0, 11.0]])}, dense=0.6)
    assert patches.shape == (10 + 4 + 2 + 2, 1, 5, 16, 16) and patches.dtype == torch.float16   # 2 nodules x (3 + 2), random, mined x 2, blobs
    assert labels.tolist() == [1]*10 + [0]*8
    assert mine_blobs(tmp_path, ['P1'], dict(blob_min_radius_mm=0.5), dense=0.6)['P1'].shape[1] == 3
    with pytest.raises(LungsegError, match='no training patches'): candidate_set(tmp_path, [], None, settings)

def lungs_scene(spacing=(2.0, 0.8, 0.8)):
    "Lung with a 10 mm ball and a 2 mm vessel through every slice, on an anisotropic grid; the ball's mask."
    shape = (30, 80, 80)
    zz, yy, xx = np.ogrid[:shape[0], :shape[1], :shape[2]]
    mm = lambda z, y, x: ((zz - z)*spacing[0])**2 + ((yy - y)*spacing[1])**2 + ((xx - x)*spacing[2])**2
    vol = np.full(shape, 0.3, np.float32)
    ball = mm(15, 30, 30) <= 25
    vol[ball] = 0.9
    vol[np.broadcast_to(((yy - 60)*spacing[1])**2 + ((xx - 50)*spacing[2])**2 <= 1, shape)] = 0.9
    return vol, ball

def test_dense_blobs_find_compact_lumps_not_thin_vessels():
    vol, ball = lungs_scene()
    centres, radii = dense_blobs(vol, (2.0, 0.8, 0.8), dense=0.6)
    assert len(centres) == 1 and ball[tuple(np.round(centres[0]).astype(int))]
    np.testing.assert_allclose(centres[0], [15, 30, 30], atol=1)
    assert 4.0 <= radii[0] <= 5.5                                   # in mm, whatever the anisotropic spacing
    assert len(dense_blobs(vol, (2.0, 0.8, 0.8), dense=0.6, min_radius_mm=6.0)[0]) == 0
    assert len(dense_blobs(np.full((10, 20, 20), 0.3, np.float32), (1.0, 1.0, 1.0), dense=0.6)[0]) == 0

def test_blob_segment_and_peak_of_a_nodule_touching_a_vessel():
    vol, ball = lungs_scene()
    vol[14:17, 30:33, 30:70] = 0.9                                  # a vessel leaving the nodule sideways
    centres, radii = dense_blobs(vol, (2.0, 0.8, 0.8), dense=0.6)
    seg = blob_segment(vol, (2.0, 0.8, 0.8), centres[0], radii[0], dense=0.6, grow=1.25)
    dice = 2*(seg & ball).sum()/(seg.sum() + ball.sum())
    assert dice > 0.85, dice                                        # the ball, not the vessel
    assert not seg[:, :, 45:].any()
    peak = nodule_peak(vol, ball, (2.0, 0.8, 0.8), dense=0.6)
    np.testing.assert_allclose(peak, [15, 30, 30], atol=1)

def test_recover_adds_missed_nodules_the_classifier_accepts():
    vol, _ = scene()
    fp = FalsePositiveFilter(EndsInZ(), dict(patch_slices=9, patch_z_mm=1.0, patch_pixels=16, min_volume_mm3=0, blob_min_radius_mm=1.5,
                                             recall_score=0.7, dense_hu=-450))
    nothing = np.zeros(vol.shape, np.float32)
    found, counts = fp.recover(nothing, vol, (1.0, 1.0, 1.0))
    assert counts == dict(blobs=2, recovered=1)                     # the ball and the tube are blobs; the ball ends in z
    assert found[4, 16, 10] > 0.99 and found[:, :, 24:].max() == 0 and nothing.max() == 0
    ball_predicted = (np.where(vol[None, 4] > 0.6, 0.8, 0.0) * (np.arange(48) < 24) * np.ones((9, 1, 1))).astype(np.float32)
    again, counts = fp.recover(ball_predicted, vol, (1.0, 1.0, 1.0))
    assert counts == dict(blobs=1, recovered=0)                     # blobs under the prediction are not looked at again
    np.testing.assert_array_equal(again, ball_predicted)
    fp.settings['recall_score'] = None
    assert fp.recover(nothing, vol, (1.0, 1.0, 1.0))[1] == dict(blobs=0, recovered=0)
    assert fp.dense == pytest.approx((-450 + 1350)/1500)
    with pytest.raises(LungsegError, match='differ in shape'): fp.recover(nothing[:4], vol, (1.0, 1.0, 1.0))

# --- training through Lightning, scoring where the net lies ---
import contextlib, io
from unittest.mock import patch
from lung_tumor_seg.fp_reduction import (train_candidate_net, candidate_trainer, CandidateModule, train_fp_reduction, second_stage,
                                         RandomBatches, patch_loader)
import lung_tumor_seg.fp_reduction as fp_reduction

def toy_patches(n, seed):
    "Balls (label 1) and tubes running through every z position (label 0) of the same cross-section on the middle slice, (n, 1, 9, 16, 16)."
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.ogrid[:9, :16, :16]
    out, labels = [], []
    for i in range(n):
        r, cy, cx = rng.uniform(2, 4), *rng.uniform(6, 10, 2)
        ball = (zz - 4)**2*4 + (yy - cy)**2 + (xx - cx)**2 <= r*r
        tube = np.broadcast_to((yy - cy)**2 + (xx - cx)**2 <= r*r, (9, 16, 16))
        out.append((np.where(ball if i % 2 else tube, 0.9, 0.3) + rng.normal(0, 0.05, (9, 16, 16))).astype(np.float16)); labels.append(i % 2)
    return torch.from_numpy(np.stack(out)[:, None]), torch.tensor(labels, dtype=torch.float32)

SHORT = dict(steps=4, batch_size=8, width=2)
CPU32 = dict(accelerator='cpu', precision='32-true')

def test_training_writes_its_checkpoint_and_logs_into_the_run_folder(tmp_path):
    X, y = toy_patches(32, 0)
    net = train_candidate_net(X, y, SHORT, verbose=False, trainer=CPU32, run_dir=tmp_path)
    assert not net.training and next(net.parameters()).device.type == 'cpu'
    ckpt = tmp_path/'second_stage'/'candidate_net.ckpt'
    again = CandidateModule.load_from_checkpoint(ckpt, map_location='cpu').net      # Lightning's checkpoint holds the same classifier
    for a, b in zip(again.state_dict().values(), net.state_dict().values()): assert torch.equal(a, b)
    import pandas as pd
    metrics = pd.read_csv(tmp_path/'logs'/'second_stage'/'csv'/'metrics.csv')
    assert {'train/loss', 'lr-AdamW'} <= set(metrics.columns) and metrics.step.max() == 3   # the last of 4 steps logged
    assert list((tmp_path/'logs'/'second_stage'/'tensorboard').glob('events.out.tfevents.*'))
    # no run folder: nothing written, anywhere
    with contextlib.chdir(tmp_path/'second_stage'):
        train_candidate_net(X, y, SHORT, verbose=False, trainer=CPU32)
        assert sorted(p.name for p in Path('.').iterdir()) == ['candidate_net.ckpt']

def test_same_seed_same_classifier_and_the_old_loops_draws():
    X, y = toy_patches(32, 0)
    a, b = (train_candidate_net(X, y, SHORT, verbose=False, trainer=CPU32) for _ in range(2))
    for p, q in zip(a.state_dict().values(), b.state_dict().values()): assert torch.equal(p, q)
    c = train_candidate_net(X, y, SHORT | dict(seed=1), verbose=False, trainer=CPU32)
    assert not torch.equal(a.head.weight, c.head.weight)
    g = torch.Generator().manual_seed(3)
    assert list(RandomBatches(32, 8, 2, seed=3)) == [torch.randint(32, (8,), generator=g).tolist() for _ in range(2)]
    x, _ = next(iter(patch_loader(X, y, 8, 2)))
    assert x.shape == (8, 1, 9, 16, 16) and x.dtype == torch.float32

def test_trainer_takes_the_runs_devices_and_precision():
    from lung_tumor_seg.training import resolve_precision
    t = candidate_trainer(7, trainer=dict(accelerator='cpu', devices=1, num_nodes=1, strategy='auto', precision='auto'), verbose=False)
    assert type(t.accelerator).__name__ == 'CPUAccelerator' and type(t.strategy).__name__ == 'SingleDeviceStrategy'
    assert t.precision == resolve_precision('auto', 'cpu') and t.max_steps == 7 and t.loggers == [] and t.checkpoint_callback is None
    assert candidate_trainer(7, trainer=CPU32, verbose=False).precision == '32-true'
    with pytest.raises(LungsegError, match='unknown Trainer option.*max_epochs'): candidate_trainer(7, trainer=dict(max_epochs=3))
    # `lungseg train` hands the second stage its Trainer's options, and only those
    seen = {}
    def fake_train(checkpoint, prep_dir, settings, verbose, trainer): seen.update(trainer=trainer, verbose=verbose); return Path('x')
    config = dict(fp_reduction=dict(enabled=True), trainer=dict(accelerator='cpu', devices=1, num_nodes=1, strategy='auto', precision='32-true',
                                                                  max_epochs=3, enable_progress_bar=False))
    with patch.object(fp_reduction, 'train_fp_reduction', fake_train): second_stage('best.ckpt', 'prep', config)
    assert seen == dict(trainer=dict(accelerator='cpu', devices=1, num_nodes=1, strategy='auto', precision='32-true'), verbose=False)

def test_toy_classifier_separates_balls_from_tubes():
    X, y = toy_patches(256, 1)
    net = train_candidate_net(X, y, dict(steps=60, batch_size=32, width=4), verbose=False, trainer=CPU32)
    Xt, yt = toy_patches(64, 2)
    with torch.no_grad(): score = torch.sigmoid(net(Xt.float()))
    assert float(((score > 0.5) == (yt > 0)).float().mean()) > 0.9
    assert score[yt > 0].mean() > 0.8 and score[yt == 0].mean() < 0.2

class NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x): return x.view_as(x)
    @staticmethod
    def backward(ctx, grad): return torch.full_like(grad, float('nan'))

def test_non_finite_bf16_gradients_skip_the_step_and_train_again_in_fp32():
    X, y = toy_patches(32, 0)
    plain, steps = CandidateNet.forward, []
    def nan_under_bf16(self, x):
        bf16 = torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') == torch.bfloat16
        steps.append(bf16)
        return NaNGradient.apply(plain(self, x)) if bf16 else plain(self, x)
    with patch.object(CandidateNet, 'forward', nan_under_bf16), contextlib.redirect_stdout(io.StringIO()) as said:
        net = train_candidate_net(X, y, SHORT, verbose=True, trainer=dict(accelerator='cpu', precision='bf16-mixed'))
    assert [l for l in said.getvalue().splitlines() if 'non-finite' in l] == ['candidate classifier: non-finite bf16 gradients at step 0, training again in fp32']
    assert steps == [True] + [False]*4                   # one bf16 step, skipped; then the whole schedule in fp32
    fp32 = train_candidate_net(X, y, SHORT, verbose=False, trainer=CPU32)
    for a, b in zip(net.state_dict().values(), fp32.state_dict().values()): assert torch.equal(a, b)
    # the skipped step changed nothing: no optimizer update from NaN gradients
    module = CandidateModule(width=2, steps=4)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with patch.object(CandidateNet, 'forward', nan_under_bf16):
        fit = candidate_trainer(4, trainer=dict(accelerator='cpu', precision='bf16-mixed'), verbose=False)
        fit.fit(module, patch_loader(X, y, 8, 4))
    assert module.nonfinite_step == 0 and fit.global_step == 1
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items() if 'running' not in k and 'num_batches' not in k)

class Recorder(nn.Module):
    "A stand-in classifier with its one weight on `device` in `dtype`: records what it is given, answers logit 2 on the CPU."
    width = 1
    def __init__(self, device, dtype):
        super().__init__(); self.weight, self.seen = nn.Parameter(torch.zeros(1, device=device, dtype=dtype)), []
    def forward(self, x): self.seen.append((x.device.type, x.dtype, tuple(x.shape))); return torch.full((len(x),), 2.0)

def test_scores_are_computed_where_the_nets_weights_lie():
    vol, _ = scene()
    centres = np.array([[4.0, 16, 10], [4.0, 16, 36], [4.0, 16, 24]])
    for device, dtype in (('meta', torch.float32), ('cpu', torch.float64), ('meta', torch.bfloat16)):
        fp = FalsePositiveFilter(Recorder(device, dtype), dict(patch_slices=9, patch_z_mm=1.0, patch_pixels=16))
        score = fp.score_points(vol, centres, 1.0, batch=2)
        assert fp.net.seen == [(device, dtype, (2, 1, 9, 16, 16)), (device, dtype, (1, 1, 9, 16, 16))]
        assert isinstance(score, np.ndarray) and score.dtype == np.float32
        np.testing.assert_allclose(score, 1/(1 + np.exp(-2.0)), rtol=1e-6)
    # a LightningModule holding the filter's net moves it, and the scores follow
    import lightning as L
    fp = FalsePositiveFilter(CandidateNet(2), dict(patch_slices=9, patch_z_mm=1.0, patch_pixels=16))
    holder = L.LightningModule(); holder.fp_net = fp.net
    single = fp.score_points(vol, centres, 1.0)
    holder.double()
    np.testing.assert_allclose(fp.score_points(vol, centres, 1.0), single, atol=1e-5)

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_scores_on_the_gpu():
    vol, _ = scene()
    fp = FalsePositiveFilter(CandidateNet(2), dict(patch_slices=9, patch_z_mm=1.0, patch_pixels=16))
    centres = np.array([[4.0, 16, 10], [4.0, 16, 36]])
    single = fp.score_points(vol, centres, 1.0)
    fp.net.cuda()
    np.testing.assert_allclose(fp.score_points(vol, centres, 1.0), single, atol=1e-4)

def prepared(tmp_path):
    "A preprocessed folder of two patients with a nodule and a vessel each, and a tiny U-Net checkpoint in RUN_DIR/checkpoints/."
    from conftest import tiny_checkpoint
    for p in ('P1', 'P2'):
        image = np.full((12, 32, 32), 0.3, np.float16); image[:, 4:7, 4:7] = 0.9
        mask = np.zeros(image.shape, np.uint8); mask[5:8, 20:25, 20:25] = 1; image[mask > 0] = 0.9
        folder = tmp_path/'prep'/'patients'/p; folder.mkdir(parents=True)
        np.save(folder/'image.npy', image); np.save(folder/'mask.npy', mask)
        (folder/'meta.json').write_text(json.dumps(dict(stored_spacing_mm=[2.0, 0.8, 0.8])))
    (tmp_path/'prep'/'split.json').write_text(json.dumps(dict(train=['P1', 'P2'], val=[], test=[])))
    (tmp_path/'run'/'checkpoints').mkdir(parents=True)
    return tiny_checkpoint(tmp_path/'run'/'checkpoints'/'best.ckpt'), tmp_path/'prep'

def test_second_stage_trains_into_the_run_folder_and_only_rank_zero_saves(tmp_path, monkeypatch):
    best, prep = prepared(tmp_path)
    settings = dict(SHORT, patch_slices=5, patch_pixels=16, mine_patients=1, random_negatives=4, recall_score=None)
    import lung_tumor_seg.training as training
    passes, predict = [], training.predict_probabilities
    monkeypatch.setattr(training, 'predict_probabilities', lambda *a, **kw: passes.append(kw) or predict(*a, **kw))
    path = train_fp_reduction(best, prep, settings, verbose=False, trainer=CPU32)
    assert passes == [dict(accelerator='cpu', precision='32-true')]    # the mining's forward passes on the run's device and precision
    assert path == best.parent/FP_FILE and FalsePositiveFilter.load(path).settings['steps'] == 4
    assert (tmp_path/'run'/'second_stage'/'candidate_net.ckpt').exists() and (tmp_path/'run'/'logs'/'second_stage'/'csv'/'metrics.csv').exists()
    path.unlink()
    from lightning.pytorch.utilities import rank_zero_only
    monkeypatch.setattr(rank_zero_only, 'rank', 1)                  # another process of a DDP run: trains, does not write the filter
    assert train_fp_reduction(best, prep, settings, verbose=False, trainer=CPU32) == path and not path.exists()
