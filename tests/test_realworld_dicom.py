"DICOM as other tools write it: NBIA Data Retriever layouts (classic and descriptive) under the collection's parent, PACS and DCMTK exports with UID file names and no suffix, mixed folders, gaps, slices without position; the commands accept the same roots."
import contextlib, io, json, shutil, warnings
from pathlib import Path
import numpy as np, pandas as pd, pydicom, pytest
from lung_tumor_seg.core import read_series, load_hu, sample_dir, SAMPLE_HINT, LungsegError, dicom_files
from lung_tumor_seg.series_index import build_series_index, copy_as_layout, LAYOUTS
from lung_tumor_seg.annotations import annotations_main
from lung_tumor_seg.masks import masks_main
from lung_tumor_seg.preprocessing import preprocess_main
from lung_tumor_seg.nbia_testserver import write_tiny_series
from conftest import tiny_checkpoint

needs_sample = pytest.mark.skipif(sample_dir() is None, reason=SAMPLE_HINT)

def run(main, argv):
    "Exit code, stdout and stderr of a `lungseg` subcommand."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()

def sample_series():
    "Patient ID -> (files, XML) of each series of the real sample, as TCIA delivers it."
    out = {}
    for pid in ('LIDC-IDRI-0001', 'LIDC-IDRI-0002'):
        folder = next((sample_dir()/pid).glob('*/*'))
        out[pid] = (sorted(folder.glob('*.dcm')), next(folder.glob('*.xml')))
    return out

@needs_sample
@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_each_layout_under_the_collections_parent_gives_the_same_volume(tmp_path, layout):
    "The index, found at any depth below a root above the collection, and read_series give the series and HU of the TCIA layout."
    files, _ = sample_series()['LIDC-IDRI-0001']
    root = tmp_path/'NBIA Downloads (2026)'/'manifest-1700000000000'
    copied = copy_as_layout(files, root, layout)
    if layout in ('patient_series', 'dcmtk_flat'): assert not any(p.name.endswith('.dcm') for p in copied)   # named without .dcm
    index = build_series_index(tmp_path, cache=None)
    reference = read_series(files[0].parent)
    assert index[['patient_id', 'series_uid', 'slice_count']].values.tolist() == [['LIDC-IDRI-0001', reference.series_uid, len(files)]]
    series = read_series(tmp_path)                     # the whole tree: one series, whatever its depth and names
    assert series.sop_uids == reference.sop_uids
    np.testing.assert_array_equal(load_hu(series), load_hu(reference))

@needs_sample
def test_a_root_of_linked_series_folders_is_read_through_its_links(tmp_path):
    "A study folder whose series are symbolic links to the archive (as `cp -s` or a PACS mount makes it), with a link back up: index and read agree."
    files, _ = sample_series()['LIDC-IDRI-0001']
    root = tmp_path/'study'; root.mkdir()
    (root/'CT_1').symlink_to(files[0].parent, target_is_directory=True)
    (root/'CT_1_again').symlink_to(root, target_is_directory=True)   # a loop: must neither hang nor count the series twice
    index = build_series_index(root, cache=None)
    reference = read_series(files[0].parent)
    assert index[['series_uid', 'slice_count']].values.tolist() == [[reference.series_uid, len(files)]]
    series = read_series(root)
    assert series.sop_uids == reference.sop_uids

@needs_sample
def test_the_slice_step_is_the_series_step_when_positions_carry_float32_rounding(tmp_path):
    "Positions as LIDC-IDRI's own headers carry them (float32 printed to six decimals, e.g. -136.570007): the spacing is the series' step."
    files, _ = sample_series()['LIDC-IDRI-0001']
    step = read_series(files[0].parent).geometry.spacing_mm[0]
    written = []
    for f in files:   # the same series moved by 0.43 mm along z, each position rounded through float32
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, f"{np.float32(z + 0.43):.6f}"]
        ds.save_as(tmp_path/f.name)
        written.append(float(ds.ImagePositionPatient[2]))
    z = np.sort(written)
    assert abs((z[-1] - z[0])/(len(z) - 1) - step) > 1e-8   # the rounding is there: the span's average is not the step
    assert read_series(tmp_path).geometry.spacing_mm[0] == pytest.approx(step, abs=1e-12)

def test_a_folder_mixing_two_series_gives_both(tmp_path):
    a = write_tiny_series(tmp_path/'src', 'SYNTH-0001', n_slices=3); b = write_tiny_series(tmp_path/'src', 'SYNTH-0002', n_slices=4, seed=1)
    mixed = tmp_path/'export'; mixed.mkdir()
    for f in [*a.iterdir(), *b.iterdir()]: shutil.copyfile(f, mixed/f'IM_{f.parent.name[-8:]}_{f.stem}')
    index = build_series_index(mixed, cache=None)
    assert sorted(zip(index.patient_id, index.slice_count)) == [('SYNTH-0001', 3), ('SYNTH-0002', 4)]
    for row in index.itertuples(): assert len(read_series(mixed, row.series_uid).files) == row.slice_count
    with pytest.raises(LungsegError, match='holds 2 image series, choose one by SeriesInstanceUID'): read_series(mixed)

def test_a_folder_of_only_non_dicom_files_says_so_in_one_line(tmp_path):
    for name in ('report.pdf', 'notes.txt', 'IM00001'): (tmp_path/name).write_bytes(b'%PDF-1.4 not dicom at all')
    with pytest.raises(LungsegError) as e: read_series(tmp_path)
    assert str(e.value) == f"{tmp_path}: no DICOM files found (3 file(s) looked at)"
    assert dicom_files(tmp_path) == ([], 3)

@needs_sample
def test_a_slice_without_position_is_set_aside_and_counted_as_a_gap(tmp_path):
    files, _ = sample_series()['LIDC-IDRI-0001']
    reference = read_series(files[0].parent)
    for k, f in enumerate(reference.files):
        ds = pydicom.dcmread(f)
        if k == 5: del ds.ImagePositionPatient
        ds.save_as(tmp_path/f'CT.{ds.SOPInstanceUID}')
    with pytest.warns(UserWarning, match='without ImagePositionPatient set aside'): series = read_series(tmp_path)
    assert [Path(p).name for p in series.set_aside] == [f'CT.{reference.sop_uids[5]}']
    assert series.gaps and series.gaps[0]['missing'] == 1 and series.geometry.shape == reference.geometry.shape
    hu, ref = load_hu(series), load_hu(reference)
    present = [k for k in range(len(ref)) if k != 5]
    np.testing.assert_array_equal(hu[present], ref[present])
    expected = np.rint((ref[4].astype(float) + ref[6])/2)                    # the missing plane: halfway between its neighbours
    assert np.abs(hu[5] - expected).max() <= 1

def _write_root(root:Path, drop_sop:str|None=None) -> Path:
    "The sample's two patients in two layouts (NBIA classic, DCMTK flat), the XML beside the slices; one slice left out if asked."
    for pid, layout in (('LIDC-IDRI-0001', 'nbia_classic'), ('LIDC-IDRI-0002', 'dcmtk_flat')):
        files, xml = sample_series()[pid]
        files = [f for f in files if drop_sop is None or pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID != drop_sop]
        copied = copy_as_layout(files, root/pid.lower(), layout)
        shutil.copy(xml, copied[0].parent)
    return root

@needs_sample
def test_annotations_masks_and_preprocess_accept_one_deep_oddly_named_root(tmp_path, capfd):
    root = _write_root(tmp_path/'PACS export 2026-12'/'Study (anonymized)')
    rc, out, err = run(annotations_main, [root, '--out', tmp_path/'json', '--dicom', root])
    assert rc == 0, err
    names = sorted(p.stem for p in (tmp_path/'json').glob('*.json'))
    assert [n.split('_')[0] for n in names] == ['LIDC-IDRI-0001', 'LIDC-IDRI-0002']
    rc, out, err = run(masks_main, [tmp_path/'json', '--dicom', root, '--out', tmp_path/'masks', '--workers', 1])
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path/'masks').iterdir() if p.is_dir()) == names    # the same series, found again
    rc, out, err = run(preprocess_main, ['--dicom', root, '--masks', tmp_path/'masks', '--out', tmp_path/'prep', '--size', 64, '--workers', 1])
    assert rc == 0, err + capfd.readouterr().err
    metas = [json.loads(p.read_text()) for p in sorted((tmp_path/'prep'/'patients').glob('*/meta.json'))]
    assert [m['patient_id'] for m in metas] == ['LIDC-IDRI-0001', 'LIDC-IDRI-0002']

@needs_sample
def test_a_one_slice_gap_through_annotations_masks_and_preprocess(tmp_path, capfd):
    "Without one slice that holds contours, masks equal the gap-free ones on every slice present; the gap is named and recorded."
    files, xml = sample_series()['LIDC-IDRI-0001']
    full = read_series(files[0].parent)
    roots = {'full': _write_root(tmp_path/'full')}
    # the slice of the sample with the most contours of the XML, not at either end
    json_dir = tmp_path/'full-json'; run(annotations_main, [roots['full'], '--out', json_dir, '--dicom', roots['full']])
    read = json.loads(next(json_dir.glob('LIDC-IDRI-0001_*.json')).read_text())
    counts = pd.Series([r['slice_index'] for s in read['reading_sessions'] for n in s['nodules'] for r in n['rois']]).value_counts()
    k = int(counts[(counts.index > 0) & (counts.index < len(full.files) - 1)].idxmax())
    roots['gap'] = _write_root(tmp_path/'gap', drop_sop=full.sop_uids[k])
    masks = {}
    for name, root in roots.items():
        assert run(annotations_main, [root, '--out', tmp_path/f'{name}-json', '--dicom', root])[0] == 0
        rc, _, err = run(masks_main, [tmp_path/f'{name}-json', '--dicom', root, '--out', tmp_path/f'{name}-masks', '--workers', 1])
        assert rc == 0, err
        folder = next((tmp_path/f'{name}-masks').glob('LIDC-IDRI-0001_*'))
        masks[name] = (np.load(folder/'readers.npy'), np.load(folder/'consensus.npy'))
    present = [i for i in range(len(full.files)) if i != k]
    assert masks['full'][0][k].any()                                       # the dropped slice held contours
    for full_mask, gap_mask in zip(masks['full'], masks['gap']):
        assert gap_mask.shape == full_mask.shape
        np.testing.assert_array_equal(gap_mask[present], full_mask[present])
    problems = (tmp_path/'gap-masks'/'problems.txt').read_text()
    assert '1 missing slice(s) between z' in problems
    with pytest.warns(UserWarning, match=r'1 missing slice\(s\) between z'):
        rc, _, err = run(preprocess_main, ['--dicom', roots['gap'], '--masks', tmp_path/'gap-masks', '--out', tmp_path/'prep', '--size', 64, '--workers', 1])
    assert rc == 0, err
    meta = json.loads((tmp_path/'prep'/'patients'/'LIDC-IDRI-0001'/'meta.json').read_text())
    assert meta['original_shape'][0] == len(full.files) and len(meta['gaps']) == 1
    index = pd.read_csv(tmp_path/'prep'/'slices.csv')
    assert index[(index.patient == 'LIDC-IDRI-0001')].gap_filled.sum() >= 1

@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    "A small untrained 2.5D SegModule checkpoint (the prediction itself means nothing here, its files and grids do)."
    return tiny_checkpoint(tmp_path_factory.mktemp('ckpt')/'tiny.ckpt')

@needs_sample
def test_predict_accepts_the_same_deep_root_and_writes_each_series(tmp_path, checkpoint):
    from lung_tumor_seg.inference import predict_main
    import nibabel as nib
    root = _write_root(tmp_path/'PACS export 2026-12'/'Study (anonymized)')
    index = build_series_index(root, cache=None)
    rc, out, err = run(predict_main, ['--checkpoint', checkpoint, '--input', root, '--out', tmp_path/'pred', '--no-animation'])
    assert rc == 0, err
    written = sorted(p.name for p in (tmp_path/'pred').iterdir() if p.is_dir())
    assert written == sorted(f'{r.patient_id}_{r.series_uid}' for r in index.itertuples())   # the series the other commands found
    for row in index.itertuples():
        mask = nib.load(tmp_path/'pred'/f'{row.patient_id}_{row.series_uid}'/f'{row.patient_id}_mask.nii.gz')
        assert mask.shape[2] == row.slice_count
    rc, out, err = run(predict_main, ['--checkpoint', checkpoint, '--input', root, '--series', index.series_uid[1], '--out', tmp_path/'one', '--no-animation'])
    assert rc == 0 and (tmp_path/'one'/f'{index.patient_id[1]}_mask.nii.gz').exists(), err
    rc, out, err = run(predict_main, ['--checkpoint', checkpoint, '--input', root, '--series', '1.2.3', '--out', tmp_path/'none'])
    assert rc == 1 and err.count('\n') == 1 and 'no CT series 1.2.3' in err

@needs_sample
def test_predict_a_series_with_a_gap_and_its_seg(tmp_path, checkpoint):
    "The mask covers the regular grid (the gap's plane included); the SEG has a frame for each slice that exists, none for the gap."
    from lung_tumor_seg.inference import predict
    import highdicom as hd, nibabel as nib
    files, _ = sample_series()['LIDC-IDRI-0002']
    full = read_series(files[0].parent)
    for f in full.files[:5] + full.files[6:]: shutil.copy(f, tmp_path/Path(f).name)
    out = predict(checkpoint, tmp_path, tmp_path/'out', seg=True, animation=False)   # the gap is printed and kept in the summary
    assert any('1 missing slice(s)' in w for w in json.loads((tmp_path/'out'/'LIDC-IDRI-0002_prediction.json').read_text())['warnings'])
    assert nib.load(out['files']['mask']).shape[2] == len(full.files)
    seg = hd.seg.segread(out['files']['seg'])
    referenced = {str(r.ReferencedSOPInstanceUID) for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(full.sop_uids) - {full.sop_uids[5]}
