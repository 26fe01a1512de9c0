"Slices, sampler, volumes and the DataModule on a small synthetic preprocessed folder."
import contextlib, io, json
from pathlib import Path
import numpy as np, pytest, torch
from lung_tumor_seg.core import save_nifti, LungsegError
from lung_tumor_seg.volumes import toy_chest
from lung_tumor_seg.preprocessing import task06_cases, preprocess, PreprocessConfig
from lung_tumor_seg.dataset import (SliceDataset, PatientVolumes, LungDataModule, slice_weights, expected_tumor_fraction,
                                    make_sampler, train_augmentation, read_split)

def toy_task(folder, n=5, slices=16, size=48):
    folder = Path(folder); training = []
    for i in range(n):
        hu, mask = toy_chest(n_slices=slices, size=size, n_nodules=2, seed=20 + i)
        for kind, arr in (('imagesTr', hu), ('labelsTr', mask)): save_nifti(arr, np.diag([-0.7, -0.7, 2.5, 1]), folder/kind/f'lung_{i:03d}.nii.gz')
        training.append(dict(image=f'./imagesTr/lung_{i:03d}.nii.gz', label=f'./labelsTr/lung_{i:03d}.nii.gz'))
    (folder/'dataset.json').write_text(json.dumps(dict(training=training)))
    return folder

@pytest.fixture(scope='module')
def prep(tmp_path_factory):
    root = tmp_path_factory.mktemp('ds')
    assert preprocess(task06_cases(toy_task(root/'task')), root/'prep', PreprocessConfig(image_size=32, slab='all')).ok
    return root/'prep'

def test_inverse_frequency_sampler_gives_half_tumour_batches(prep):
    ds = SliceDataset(prep, read_split(prep)['train'])
    tp = ds.tumor_pixels
    assert 0 < (tp > 0).mean() < 0.5                              # tumour slices are the minority
    w = slice_weights(tp)
    assert expected_tumor_fraction(w, tp) == pytest.approx(0.5)
    out = io.StringIO()
    with contextlib.redirect_stdout(out): sampler = make_sampler(tp, batch_size=8, num_samples=4000, seed=1)
    assert 'expected tumour share per batch 50.0%' in out.getvalue()
    drawn = np.array(list(sampler))
    assert (tp[drawn] > 0).mean() == pytest.approx(0.5, abs=0.05)   # what the weights imply is what the sampler draws
    # fixed oversampling: share = f*T / (f*T + N)
    t, n = int((tp > 0).sum()), int((tp == 0).sum())
    w4 = slice_weights(tp, 'oversample', 3.0)
    assert expected_tumor_fraction(w4, tp) == pytest.approx(3*t / (3*t + n))
    with contextlib.redirect_stdout(io.StringIO()): assert make_sampler(tp, 'none') is None

def test_context_channels_are_the_neighbouring_slices_clamped_at_the_ends(prep):
    patient = read_split(prep)['train'][0]
    ds = SliceDataset(prep, [patient], context_slices=2)
    stored = np.load(prep/'patients'/patient/'image.npy').astype(np.float32)
    last = len(stored) - 1
    for i, expected in ((0, [0, 0, 0, 1, 2]), (last, [last-2, last-1, last, last, last]), (5, [3, 4, 5, 6, 7])):
        item = ds[i]
        assert item['slice'] == i and item['image'].shape == (5, 32, 32)
        np.testing.assert_allclose(item['image'].numpy(), stored[expected])

def test_augmentation_moves_image_and_mask_together(prep):
    split = read_split(prep)
    plain = SliceDataset(prep, split['train'])
    aug = SliceDataset(prep, split['train'], transform=train_augmentation(rotate_deg=30, seed=3, flips=True))
    tumour = np.nonzero(plain.tumor_pixels > 0)[0]
    changed = 0
    for i in tumour[:6]:
        a, p = aug[int(i)], plain[int(i)]
        assert set(torch.unique(a['mask']).tolist()) <= {0.0, 1.0}
        assert 0 <= float(a['image'].min()) and float(a['image'].max()) <= 1
        changed += not torch.equal(a['mask'], p['mask'])
        if a['mask'].sum() > 0:   # the nodule (bright in the lung window) is under the moved mask
            inside, outside = a['image'][0][a['mask'][0] > 0].mean(), a['image'][0][a['mask'][0] == 0].mean()
            assert inside > outside
    assert changed > 0

def test_patient_volumes_follow_the_contract(prep):
    vols = PatientVolumes(prep, 'test', context_slices=1)
    assert len(vols) == len(read_split(prep)['test']) >= 1
    v = vols[0]
    assert set(v) == {'patient', 'image', 'mask', 'spacing_mm'}
    z = v['mask'].shape[0]
    assert v['image'].shape == (z, 3, 32, 32) and v['image'].dtype == torch.float32
    assert v['mask'].dtype == torch.uint8 and isinstance(v['spacing_mm'], tuple)
    assert v['spacing_mm'][1] == pytest.approx(0.7*48/32)          # stored pixels are bigger than the CT's
    with pytest.raises(LungsegError, match='unknown split'): PatientVolumes(prep, 'holdout')

def test_datamodule_prepares_idempotently_and_loads_with_a_worker(tmp_path):
    task = toy_task(tmp_path/'task', n=3, slices=12, size=32)
    dm = LungDataModule(tmp_path/'prep', batch_size=4, context_slices=1, num_workers=1, source=dict(nifti=task),
                        preprocess_settings=dict(image_size=32))
    with contextlib.redirect_stdout(io.StringIO()):
        dm.prepare_data()
        stamps = {p: p.stat().st_mtime_ns for p in (tmp_path/'prep').rglob('*.npy')}
        dm.prepare_data()
    assert stamps and {p: p.stat().st_mtime_ns for p in (tmp_path/'prep').rglob('*.npy')} == stamps
    dm.setup('fit')
    with contextlib.redirect_stdout(io.StringIO()): loader = dm.train_dataloader()
    assert loader.pin_memory == torch.cuda.is_available() and loader.persistent_workers
    batch = next(iter(loader))
    assert batch['image'].shape == (4, 3, 32, 32) and batch['mask'].shape == (4, 1, 32, 32)
    assert batch['image'].dtype == torch.float32 and batch['mask'].dtype == torch.float32
    val = list(dm.val_dataloader())
    assert [v['patient'] for v in val] == read_split(tmp_path/'prep')['val']
    assert dm.preprocess_settings['window'] == 'lung'

def test_datamodule_without_preprocessed_data_says_what_to_do(tmp_path):
    with pytest.raises(LungsegError, match='run `lungseg preprocess` first'): LungDataModule(tmp_path, num_workers=0).prepare_data()
    with pytest.raises(LungsegError, match='unknown sampler'): LungDataModule(tmp_path, sampler='balanced')

def test_workers_draw_different_augmentations(prep):
    from torch.utils.data import DataLoader
    from lung_tumor_seg.dataset import seed_worker
    ds = SliceDataset(prep, read_split(prep)['train'], transform=train_augmentation(seed=0))
    i = int(np.nonzero(ds.tumor_pixels > 0)[0][0])
    def first_items(init):
        torch.manual_seed(0)                      # fixes the seeds PyTorch hands the workers: no flaky draw
        loader = DataLoader(ds, batch_size=1, sampler=[i, i], num_workers=2, worker_init_fn=init)
        return [b['image'] for b in loader]     # item 0 from worker 0, item 1 from worker 1
    same = first_items(None)
    assert torch.equal(same[0], same[1])          # the copied generator repeats itself in every worker ...
    differ = first_items(seed_worker)
    assert not torch.equal(differ[0], differ[1])  # ... unless each worker is reseeded
