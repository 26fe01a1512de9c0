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
