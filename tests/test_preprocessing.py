"`lungseg preprocess` and its parts on synthetic DICOM series, synthetic Task06 folders and the real sample."
import contextlib, io, json
from pathlib import Path
import numpy as np, pandas as pd, pytest, pydicom, nibabel as nib
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from lung_tumor_seg.core import sample_dir, SAMPLE_HINT, save_nifti, LungsegError
from lung_tumor_seg.volumes import toy_chest, dicom_volume, nifti_volume, nifti_mask, LPS_AXES
from lung_tumor_seg.preprocessing import (preprocess_volume, preprocess_mask, restore_mask, PreprocessConfig, window_hu,
    preprocess_main, lidc_cases, task06_cases, preprocess, patient_split)

SPACING = (2.5, 0.7, 0.7)

def write_series(folder, hu_zyx, patient='P1', spacing=SPACING, iop=(1, 0, 0, 0, 1, 0), origin=(-45., -45., -50.), edit=None):
    "Write a (z, y, x) HU array as an uncompressed CT series (slice k at origin + k*dz along the normal); `edit(k, ds)` alters slices."
    folder = Path(folder); folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    normal = np.cross(iop[:3], iop[3:])
    for k, sl in enumerate(hu_zyx):
        ds = Dataset(); ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = '1.2.840.10008.5.1.4.1.1.2'
        ds.file_meta.MediaStorageSOPInstanceUID = sop = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = '1.2.840.10008.5.1.4.1.1.2', sop, 'CT'
        ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = patient, study, series
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k*spacing[0]*normal]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.PixelSpacing = [spacing[1], spacing[2]]; ds.SliceThickness = spacing[0]
        ds.Rows, ds.Columns = sl.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, 'MONOCHROME2'
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (sl.astype(np.int32) + 1024).astype(np.uint16).tobytes()
        if edit: edit(k, ds)
        # file names in reverse order of position: the order must come from the positions
        ds.save_as(folder/f'{len(hu_zyx) - k:04d}.dcm', enforce_file_format=True)
    return folder

def lidc_root(root, patients):
    "DICOM root <PatientID>/<Study>/<Series>/*.dcm and mask folder <PatientID>_<SeriesUID>/consensus.npy for {pid: (hu, mask, kw)}."
    for pid, (hu, mask, kw) in patients.items():
        folder = write_series(Path(root)/'dicom'/pid/'study'/'series', hu, patient=pid, **kw)
        uid = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID
        (Path(root)/'masks'/f'{pid}_{uid}').mkdir(parents=True)
        np.save(Path(root)/'masks'/f'{pid}_{uid}'/'consensus.npy', mask)
    return Path(root)/'dicom', Path(root)/'masks'

def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): rc = preprocess_main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()

def test_dicom_and_nifti_paths_give_the_same_array(tmp_path):
    hu, _ = toy_chest(n_slices=12, size=48, seed=3)
    vol = dicom_volume(write_series(tmp_path/'s', hu))
    np.testing.assert_array_equal(vol.hu, hu)
    np.testing.assert_allclose(vol.spacing_mm, SPACING, atol=1e-6)
    back = nifti_volume(save_nifti(vol.hu, vol.affine, tmp_path/'ct.nii.gz'))
    np.testing.assert_array_equal(back.hu, hu)
    # the same file reoriented to RAS (x and y flipped on disk) reads back to the same array
    ras = nib.as_closest_canonical(nib.load(tmp_path/'ct.nii.gz'))
    assert nib.aff2axcodes(ras.affine) == ('R', 'A', 'S')
    nib.save(ras, tmp_path/'ras.nii.gz')
    np.testing.assert_array_equal(nifti_volume(tmp_path/'ras.nii.gz').hu, hu)

def test_a_series_stored_with_flipped_columns_reads_as_the_standard_one(tmp_path):
    hu, _ = toy_chest(n_slices=10, size=40, seed=4)
    std = dicom_volume(write_series(tmp_path/'std', hu))
    # columns running to patient right: pixel i sits where the standard grid has column X-1-i
    # the normal now points down: the slice written k-th sits at -k*dz, so write the slices from top to bottom
    flipped = write_series(tmp_path/'flip', hu[::-1, :, ::-1], iop=(-1, 0, 0, 0, 1, 0), origin=(-45. + 39*0.7, -45., -50. + 9*2.5))
    vol = dicom_volume(flipped)
    np.testing.assert_array_equal(vol.hu, std.hu)
    np.testing.assert_allclose(vol.affine, std.affine, atol=1e-6)
    assert nib.aff2axcodes(vol.affine) == LPS_AXES

def test_task06_bad_labels_are_refused_or_explicitly_corrected(tmp_path):
    hu, mask = toy_chest(n_slices=8, size=32, seed=1)
    aff = np.diag([-0.7, -0.7, 2.5, 1])
    img = save_nifti(hu, aff, tmp_path/'img.nii.gz')
    save_nifti(mask*3, aff, tmp_path/'lab3.nii.gz')
    with pytest.raises(LungsegError, match='label values'): nifti_mask(tmp_path/'lab3.nii.gz', img)
    err = io.StringIO()
    with contextlib.redirect_stderr(err): fixed = nifti_mask(tmp_path/'lab3.nii.gz', img, binarize=True)
    np.testing.assert_array_equal(fixed, mask)
    assert 'mapped to 0/1' in err.getvalue()                     # the correction is reported
    moved = aff.copy(); moved[0, 3] += 5                       # the label grid shifted by 5 mm
    save_nifti(mask, moved, tmp_path/'moved.nii.gz')
    with pytest.raises(LungsegError, match='affine differs'): nifti_mask(tmp_path/'moved.nii.gz', img)
    save_nifti(np.zeros((8, 32, 30), np.uint8), aff, tmp_path/'narrow.nii.gz')
    with pytest.raises(LungsegError, match='does not match its image'): nifti_mask(tmp_path/'narrow.nii.gz', img)

def test_lidc_cli_keeps_going_past_bad_series_and_names_them(tmp_path, capfd):
    good_hu, good_mask = toy_chest(n_slices=16, size=48, seed=0)
    def drop_slice(k, ds):
        if k == 7: ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], ds.ImagePositionPatient[2] + 2.5]
    def other_spacing(k, ds):
        if k == 3: ds.PixelSpacing = [0.8, 0.8]
    dicom, masks = lidc_root(tmp_path, {
        'P1': (good_hu, good_mask, {}),
        'P2': (good_hu, good_mask, dict(edit=drop_slice)),           # a duplicate position, then a gap
        'P3': (good_hu, good_mask, dict(edit=other_spacing)),        # one slice with another pixel spacing
        'P4': (good_hu, good_mask[:, :40], {}),                      # mask not on the CT grid
        'P5': (good_hu, good_mask, dict(iop=(1, 0, 0, 0, 0, -1))),   # coronal
    })
    rc, out, err = run_cli(['--dicom', dicom, '--masks', masks, '--out', tmp_path/'prep', '--size', 32])
    assert rc == 1
    warned = err + capfd.readouterr().err   # warnings of worker processes go to the process's stderr
    assert 'P2' in warned and '1 missing slice(s) between z' in warned          # the gap is processed, and said
    assert 'P3' in err and 'PixelSpacing differs' in err
    assert 'P4' in err and 'does not match the CT series' in err
    assert 'P5' in err and 'not an axial series' in err
    assert sorted(p.name for p in (tmp_path/'prep'/'patients').iterdir()) == ['P1', 'P2']
    stored = np.load(tmp_path/'prep'/'patients'/'P1'/'mask.npy')
    assert stored.dtype == np.uint8 and set(np.unique(stored)) <= {0, 1} and stored.sum() > 0

def test_default_crop_never_drops_a_nodule_slice_and_restores(tmp_path):
    hu, mask = toy_chest(n_slices=30, size=64, seed=2)
    mask[1, 30:33, 30:33] = 1                   # a lesion below the lungs (e.g. a field of view the rule did not expect)
    mask[28, 30:33, 30:33] = 1                  # and one above
    dicom, masks = lidc_root(tmp_path, {'P1': (hu, mask, {})})
    rc, out, err = run_cli(['--dicom', dicom, '--masks', masks, '--out', tmp_path/'prep', '--size', 64])
    assert rc == 0, err
    case = tmp_path/'prep'/'patients'/'P1'
    meta = json.loads((case/'meta.json').read_text())
    stored = np.load(case/'mask.npy', mmap_mode='r')
    restored = restore_mask(np.asarray(stored), meta)
    tumor_slices = np.nonzero(mask.any((1, 2)))[0]
    assert set(np.nonzero(restored.any((1, 2)))[0]) == set(tumor_slices)     # every nodule slice kept, none invented
    np.testing.assert_array_equal(restored, mask)                          # same size in-plane: exact round trip
    image = np.load(case/'image.npy', mmap_mode='r')
    assert image.dtype == np.float16 and image.shape == stored.shape and 0 <= float(image.min()) and float(image.max()) <= 1
    assert meta['z_range'][0] <= 1 and meta['z_range'][1] >= 29
    # the seeds' rule drops the lowest 30... of 30 slices: too few, said so
    rc, _, err = run_cli(['--dicom', dicom, '--masks', masks, '--out', tmp_path/'prep30', '--slab', 'skip30'])
    assert rc == 1 and 'too few' in err

def test_seed_slab_rule_warns_about_the_nodule_slices_it_drops(tmp_path):
    hu, mask = toy_chest(n_slices=36, size=48, seed=2)
    mask[4, 20:23, 20:23] = 1
    dicom, masks = lidc_root(tmp_path, {'P1': (hu, mask, {})})
    write_series(tmp_path/'dicom'/'P9'/'study'/'xray', hu[:4], patient='P9')   # a series without mask: left out, counted
    rc, _, err = run_cli(['--dicom', dicom, '--masks', masks, '--out', tmp_path/'prep', '--slab', 'skip30', '--size', 32])
    assert rc == 0, err
    assert 'P1: warning:' in err and 'nodule slices dropped' in err
    assert '1 series without a mask' in err
    assert json.loads((tmp_path/'prep'/'patients'/'P1'/'meta.json').read_text())['z_range'] == [30, 36]

def test_series_folders_named_otherwise_are_matched_by_their_dicom_ids(tmp_path):
    hu, mask = toy_chest(n_slices=12, size=32, seed=6)
    folder = write_series(tmp_path/'dicom'/'some-folder'/'study'/'series-1', hu, patient='LIDC-X')
    uid = pydicom.dcmread(next(folder.glob('*.dcm'))).SeriesInstanceUID
    (tmp_path/'masks'/f'LIDC-X_{uid}').mkdir(parents=True)
    np.save(tmp_path/'masks'/f'LIDC-X_{uid}'/'consensus.npy', mask)
    cases = lidc_cases(tmp_path/'dicom', tmp_path/'masks')
    assert [(c.name, c.patient_id) for c in cases] == [('LIDC-X', 'LIDC-X')]
    vol, loaded = cases[0].load()
    np.testing.assert_array_equal(loaded, mask)

def test_resize_down_and_restore(tmp_path):
    hu, mask = toy_chest(n_slices=20, size=96, seed=5)
    image, meta = preprocess_volume(hu, SPACING, PreprocessConfig(image_size=(64, 48)), mask_zyx=mask)
    assert image.shape[1:] == (64, 48) and image.dtype == np.float32
    restored = restore_mask(preprocess_mask(mask, meta), meta)
    dice = 2*(restored & mask).sum() / (restored.sum() + mask.sum())
    assert restored.shape == mask.shape and dice > 0.7
    z0, z1 = meta['z_range']
    assert not restored[:z0].any() and not restored[z1:].any()

def test_preprocess_is_idempotent_and_split_is_patient_level(tmp_path):
    aff = np.diag([-0.7, -0.7, 2.5, 1]); training = []
    for i in range(5):
        hu, mask = toy_chest(n_slices=12, size=32, seed=10 + i)
        save_nifti(hu, aff, tmp_path/'task'/'imagesTr'/f'lung_{i:03d}.nii.gz'); save_nifti(mask, aff, tmp_path/'task'/'labelsTr'/f'lung_{i:03d}.nii.gz')
        training.append(dict(image=f'./imagesTr/lung_{i:03d}.nii.gz', label=f'./labelsTr/lung_{i:03d}.nii.gz'))
    (tmp_path/'task'/'dataset.json').write_text(json.dumps(dict(training=training)))
    argv = ['--nifti', tmp_path/'task', '--out', tmp_path/'prep', '--size', 32, '--export-slices', tmp_path/'seed_layout']
    rc, out, err = run_cli(argv)
    assert rc == 0, err
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path/'prep'/'patients').rglob('*.npy')}
    split1 = json.loads((tmp_path/'prep'/'split.json').read_text())
    rc, out, err = run_cli(argv)
    assert rc == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path/'prep'/'patients').rglob('*.npy')} == stamps   # nothing recomputed
    split2 = json.loads((tmp_path/'prep'/'split.json').read_text())
    assert split1 == split2
    assert all(split1[k] for k in ('train', 'val', 'test'))
    assert not (set(split1['train']) & set(split1['val']) or set(split1['train']) & set(split1['test']) or set(split1['val']) & set(split1['test']))
    index = pd.read_csv(tmp_path/'prep'/'slices.csv')
    assert len(list((tmp_path/'seed_layout'/'images').rglob('*.npy'))) == len(index)
    assert len(list((tmp_path/'seed_layout'/'masks').rglob('*.npy'))) == len(index)
    # nothing half-written is left behind
    assert not [p for p in (tmp_path/'prep').rglob('*') if '.part' in p.name]

def test_split_never_separates_a_patients_series():
    cases = {f'P{i}': f'P{i}' for i in range(7)} | {'P2_b': 'P2', 'P5_b': 'P5'}
    for seed in range(5):
        s = patient_split(cases, seed)
        for pid in ('P2', 'P5'):
            homes = [k for k in ('train', 'val', 'test') if pid in s[k] or f'{pid}_b' in s[k]]
            assert len(homes) == 1
    assert len({json.dumps(patient_split(cases, seed)) for seed in range(5)}) > 1   # the seed matters

@pytest.mark.skipif(sample_dir() is None, reason=SAMPLE_HINT)
def test_real_sample_dicom_and_nifti_agree_and_keep_every_lung_slice(tmp_path):
    series = next((sample_dir()/'LIDC-IDRI-0001').glob('*/*'))
    vol = dicom_volume(series)
    assert vol.name == 'LIDC-IDRI-0001' and vol.hu.shape == (16, 512, 512)
    back = nifti_volume(save_nifti(vol.hu, vol.affine, tmp_path/'ct.nii.gz'))
    np.testing.assert_array_equal(back.hu, vol.hu)
    image, meta = preprocess_volume(vol.hu, vol.spacing_mm)
    assert meta['z_range'] == [0, 16]                 # 16 slices from the middle of the chest: all hold lung
    assert image.shape == (16, 256, 256)

def _chain_available():
    try: import lung_tumor_seg.annotations, lung_tumor_seg.masks; return sample_dir() is not None
    except ImportError: return False

@pytest.mark.skipif(not _chain_available(), reason=f"needs the annotations and masks modules and the real sample: {SAMPLE_HINT}")
def test_real_sample_annotations_masks_preprocess_chain(tmp_path):
    from lung_tumor_seg.annotations import annotations_main
    from lung_tumor_seg.masks import masks_main
    sd = sample_dir()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert annotations_main([str(sd), '--dicom', str(sd), '--out', str(tmp_path/'ann')]) == 0
        assert masks_main([str(tmp_path/'ann'), '--dicom', str(sd), '--out', str(tmp_path/'masks')]) == 0
    rc, out, err = run_cli(['--dicom', sd, '--masks', tmp_path/'masks', '--out', tmp_path/'prep'])
    assert rc == 0, err
    split = json.loads((tmp_path/'prep'/'split.json').read_text())
    assert sorted(split['train'] + split['val']) == ['LIDC-IDRI-0001', 'LIDC-IDRI-0002'] and split['val']
    for pid in ('LIDC-IDRI-0001', 'LIDC-IDRI-0002'):
        case = tmp_path/'prep'/'patients'/pid
        image, mask = np.load(case/'image.npy').astype(np.float32), np.load(case/'mask.npy')
        meta = json.loads((case/'meta.json').read_text())
        assert mask.sum() > 0
        consensus = np.load(next((tmp_path/'masks').glob(f'{pid}_*'))/'consensus.npy') > 0
        # image and mask stay aligned: the windowed CT under the stored mask matches the original CT under the consensus
        series = next((sd/pid).glob('*/*'))
        original = window_hu(dicom_volume(series).hu)
        assert abs(image[mask > 0].mean() - original[consensus].mean()) < 0.05
        restored = restore_mask(mask, meta).astype(bool)
        assert 2*(restored & consensus).sum() / (restored.sum() + consensus.sum()) > 0.85   # 512 -> 256 -> 512, nearest

def _phantom():
    try: from lung_tumor_seg.phantom import cached_phantom
    except ImportError: return None
    return cached_phantom(2, 0, 48)

def test_phantom_dicom_and_task06_give_the_same_arrays_and_training_data(tmp_path):
    root = _phantom()
    if root is None: pytest.skip("phantom module absent")
    truth = json.loads((root/'truth.json').read_text())
    task = root/'Task06_Lung'
    for entry in truth['patients']:
        from_dicom = dicom_volume(root/entry['series_dir'])
        from_nifti = nifti_volume(task/'imagesTr'/f"{entry['task06']}.nii.gz")
        np.testing.assert_array_equal(from_dicom.hu, from_nifti.hu)          # two writers, two readers, one array
        np.testing.assert_allclose(from_dicom.spacing_mm, from_nifti.spacing_mm, atol=1e-4)
        np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-3)
    rc, out, err = run_cli(['--nifti', task, '--out', tmp_path/'prep', '--size', 128])
    assert rc == 0, err
    index = pd.read_csv(tmp_path/'prep'/'slices.csv')
    for entry in truth['patients']:
        label = nifti_mask(task/'labelsTr'/f"{entry['task06']}.nii.gz", task/'imagesTr'/f"{entry['task06']}.nii.gz")
        meta = json.loads((tmp_path/'prep'/'patients'/entry['task06']/'meta.json').read_text())
        z0, z1 = meta['z_range']
        tumour_slices = set(np.nonzero(label.any((1, 2)))[0])
        assert tumour_slices <= set(range(z0, z1))                          # no nodule slice cropped away
        assert (index[index.patient == entry['task06']].tumor_pixels > 0).sum() >= 0.8*len(tumour_slices)   # tiny caps may vanish at 128 px

def test_parallel_preprocess_equals_serial(tmp_path):
    "Cases preprocessed in two processes give the same arrays, index and split as one after another."
    root = _phantom()
    if root is None: pytest.skip("phantom module absent")
    cases, cfg = task06_cases(root/'Task06_Lung'), PreprocessConfig(image_size=96)
    serial, parallel = (preprocess(cases, tmp_path/name, cfg, workers=w) for name, w in (('serial', 1), ('parallel', 2)))
    assert serial.ok and parallel.ok and [c.name for c, _ in parallel.results] == [c.name for c, _ in serial.results]
    for case in cases:
        for part in ('image.npy', 'mask.npy'):
            np.testing.assert_array_equal(np.load(tmp_path/'serial'/'patients'/case.name/part), np.load(tmp_path/'parallel'/'patients'/case.name/part))
    for name in ('slices.csv', 'split.json'): assert (tmp_path/'serial'/name).read_text() == (tmp_path/'parallel'/name).read_text()
