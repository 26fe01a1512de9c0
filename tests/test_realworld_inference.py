"`lungseg predict` on real-world DICOM and NIfTI: anonymized headers, empty patient IDs, outputs all or nothing, broken NIfTI geometry."
import json, warnings
from pathlib import Path
import numpy as np, nibabel as nib, pydicom, pytest, torch
import highdicom as hd
from conftest import tiny_checkpoint, threshold_model
from lung_tumor_seg.core import read_series, sample_dir, SAMPLE_HINT
from lung_tumor_seg.inference import predict, predict_main

# Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1): present in a SEG, possibly empty
TYPE2 = ['PatientName', 'PatientID', 'PatientBirthDate', 'PatientSex', 'StudyDate', 'StudyTime',
         'ReferringPhysicianName', 'StudyID', 'AccessionNumber']
STRIPPED = TYPE2 + ['Manufacturer', 'InstitutionName', 'SeriesDate', 'SeriesTime', 'ContentDate', 'ContentTime']


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    "A small untrained 2.5D SegModule checkpoint whose head predicts tumour everywhere (every slice gets a SEG frame)."
    return tiny_checkpoint(tmp_path_factory.mktemp('ckpt')/'tiny.ckpt')


def _real_series():
    if sample_dir() is None: pytest.skip(SAMPLE_HINT)
    return next((sample_dir()/'LIDC-IDRI-0001').glob('*/*'))


def _phantom_series():
    from lung_tumor_seg.phantom import cached_phantom
    return next(cached_phantom(2).glob('LIDC-IDRI/PHANTOM-0001/*/*'))


@pytest.fixture(params=['real', 'phantom'])
def source_series(request):
    "A real LIDC-IDRI series (skipped when the sample is absent) or a synthetic phantom series."
    return _real_series() if request.param == 'real' else _phantom_series()


def anonymize(folder, dest, strip=STRIPPED, n_slices=None, **replace):
    "Copy a series with the attributes of `strip` deleted (as anonymizers do) and those of `replace` set."
    dest = Path(dest); dest.mkdir(parents=True)
    for f in read_series(folder).files[:n_slices]:     # the first `n_slices` along the normal
        ds = pydicom.dcmread(f)
        for k in strip: ds.pop(k, None)
        for k, v in replace.items(): setattr(ds, k, v)
        ds.save_as(dest/f.name)
    return dest


def _one_line_error(capsys, *parts):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('lungseg: error:'), err
    for p in parts: assert p in err[0], err[0]
    return err[0]


def test_seg_of_an_anonymized_series(checkpoint, source_series, tmp_path, capsys):
    "Patient and study attributes deleted: the CLI writes a SEG that highdicom reads back, with the Type 2 attributes present and empty."
    folder = anonymize(source_series, tmp_path/'anon')
    assert not any(k in pydicom.dcmread(next(folder.glob('*.dcm'))) for k in TYPE2)
    out = tmp_path/'out'
    assert predict_main(['--checkpoint', str(checkpoint), '--input', str(folder), '--out', str(out), '--seg', '--no-animation']) == 0, capsys.readouterr().err
    series = read_series(folder)
    assert not any(k in series.headers[0] for k in TYPE2)                 # the source headers were not changed
    files = sorted(p.name for p in out.iterdir())
    assert files == ['anon_findings.csv', 'anon_findings.json', 'anon_mask.nii.gz', 'anon_prediction.json', 'anon_preview.png', 'anon_seg.dcm']   # no PatientID: named after the folder
    ds = pydicom.dcmread(out/'anon_seg.dcm')
    for k in TYPE2: assert k in ds and ds[k].is_empty, k
    seg = hd.seg.segread(out/'anon_seg.dcm')
    assert hd.seg.Segmentation.from_dataset(ds).SOPInstanceUID == seg.SOPInstanceUID
    refs = {r.ReferencedSOPInstanceUID for r in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == set(series.sop_uids)
    assert {uid for _, _, uid in seg.get_source_image_uids()} == set(series.sop_uids)
    assert (seg.StudyInstanceUID, seg.FrameOfReferenceUID) == (series.study_uid, series.headers[0].FrameOfReferenceUID)
    assert seg.number_of_segments == 1 and int(ds.NumberOfFrames) == len(series.sop_uids)   # the head predicts tumour on every slice
    summary = json.loads((out/'anon_prediction.json').read_text())
    assert summary['name'] == 'anon' and summary['outputs']['seg'] == 'anon_seg.dcm'




@pytest.mark.parametrize('patient_id, folder, expected', [
    ('', 'scan 01 (anon)', 'scan_01_anon'),      # empty PatientID: the folder's name, made safe
    ('../x/PAT 7', 'series', 'x_PAT_7'),         # a patient ID that would escape the output folder
    ('', '---', None)])                           # nothing usable in either: the SeriesInstanceUID
def test_output_names_without_a_usable_patient_id(tmp_path, patient_id, folder, expected):
    src = anonymize(_phantom_series(), tmp_path/folder, strip=[], n_slices=6, PatientID=patient_id)
    uid = str(pydicom.dcmread(next(src.glob('*.dcm'))).SeriesInstanceUID)
    name = expected or uid
    res = predict(threshold_model(), src, tmp_path/'out', animation=False)
    assert res['name'] == name
    assert sorted(p.name for p in (tmp_path/'out').iterdir()) == sorted(f'{name}_{kind}' for kind in
                                                                        ('findings.csv', 'findings.json', 'mask.nii.gz', 'prediction.json', 'preview.png'))


def _listing(folder):
    "Every file and folder under `folder`, hidden ones included, relative to it."
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob('*'))


def test_failing_seg_leaves_nothing_behind(checkpoint, tmp_path, capsys, monkeypatch):
    "highdicom refusing the SEG: exit 1, one line naming the input and the problem, no mask, summary or temporary folder."
    folder = anonymize(_phantom_series(), tmp_path/'series', strip=[], n_slices=8)
    out = tmp_path/'out'; out.mkdir(); (out/'notes.txt').write_text('kept')
    def refuse(*args, **kwargs): raise ValueError("Source images must have the same\nframe of reference")
    monkeypatch.setattr(hd.seg, 'Segmentation', refuse)
    argv = ['--checkpoint', str(checkpoint), '--input', str(folder), '--out', str(out), '--seg', '--prob']
    assert predict_main(argv) == 1
    line = _one_line_error(capsys, str(folder), 'DICOM SEG', 'Source images must have the same frame of reference', 'no outputs written')
    assert line.count(str(folder)) == 1
    assert _listing(out) == ['notes.txt']
    assert predict_main([*argv, '--out', str(tmp_path/'new')]) == 1
    assert not (tmp_path/'new').exists()          # a folder made for this run is removed again


def test_failing_rerun_keeps_the_previous_outputs(checkpoint, tmp_path, capsys, monkeypatch):
    "A run that fails at its last step (the animation, disk full) leaves the complete outputs of the run before untouched."
    import lung_tumor_seg.inference as inference
    folder = anonymize(_phantom_series(), tmp_path/'series', strip=[], n_slices=8)
    out = tmp_path/'out'
    argv = ['--checkpoint', str(checkpoint), '--input', str(folder), '--out', str(out), '--seg']
    assert predict_main(argv) == 0
    before = {p: p.read_bytes() for p in out.iterdir()}
    assert len(before) >= 4 and any(p.name.endswith('_overlay.gif') for p in before)
    def disk_full(frames, path, *args, **kwargs): raise OSError(28, 'No space left on device', str(path))
    monkeypatch.setattr(inference, 'save_animation', disk_full)
    assert predict_main(argv) == 1
    _one_line_error(capsys, str(folder), 'No space left on device', 'no outputs written')
    assert {p: p.read_bytes() for p in out.iterdir()} == before


def test_series_a_seg_cannot_reference(checkpoint, tmp_path, capsys):
    "A header without its FrameOfReferenceUID (Type 1): one line naming the slice, nothing written."
    folder = anonymize(_phantom_series(), tmp_path/'series', strip=STRIPPED + ['FrameOfReferenceUID'], n_slices=8)
    assert predict_main(['--checkpoint', str(checkpoint), '--input', str(folder), '--out', str(tmp_path/'out'), '--seg']) == 1
    _one_line_error(capsys, str(folder), 'FrameOfReferenceUID')
    assert not (tmp_path/'out').exists()


def _ct_nifti(path, affine=np.diag([-0.8, -0.8, 2.5, 1.]), pixdim=None, sform=None):
    "A small chest-like NIfTI whose header is set field by field: qform from `affine` (code 1), `sform` (affine, code) or none."
    from lung_tumor_seg.volumes import toy_chest
    hu, _ = toy_chest(n_slices=8, size=48)
    img = nib.Nifti1Image(hu.transpose(2, 1, 0), None)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(*(sform or (None, 0)))
    if pixdim is not None: img.header['pixdim'][1:4] = pixdim
    nib.save(img, path)
    return path


@pytest.mark.parametrize('pixdim, problem', [((0, 0.8, 2.5), 'is zero'), ((0.8, -0.8, 2.5), 'is negative'),
                                             ((0.8, 0.8, np.nan), 'is not a number')])
def test_nifti_with_a_broken_voxel_size_is_refused(checkpoint, tmp_path, capsys, pixdim, problem):
    "nibabel reads a zero voxel size as 1 mm and a negative one as its absolute value; predict refuses both, naming the file and the value."
    path = _ct_nifti(tmp_path/'ct.nii.gz', pixdim=pixdim)
    assert predict_main(['--checkpoint', str(checkpoint), '--input', str(path), '--out', str(tmp_path/'out')]) == 1
    shown = ' x '.join('nan' if np.isnan(v) else f'{v:g}' for v in pixdim)
    _one_line_error(capsys, str(path), f'voxel size (pixdim) {shown} mm', problem)
    assert not (tmp_path/'out').exists()


def test_nifti_with_a_singular_or_implausible_affine_is_refused(checkpoint, tmp_path, capsys):
    flat = np.array([[-0.8, 0, 0, 0], [0, -0.8, 0, 0], [-0.8, -0.8, 0, 0], [0, 0, 0, 1]])   # the slice axis lies in the x-y plane
    path = _ct_nifti(tmp_path/'flat.nii.gz', sform=(flat, 1))
    assert predict_main(['--checkpoint', str(checkpoint), '--input', str(path), '--out', str(tmp_path/'out')]) == 1
    _one_line_error(capsys, str(path), 'singular affine', 'sform')
    path = _ct_nifti(tmp_path/'wide.nii.gz', affine=np.diag([-25., -25., 2.5, 1]))        # 25 mm pixels: metres read as mm?
    assert predict_main(['--checkpoint', str(checkpoint), '--input', str(path), '--out', str(tmp_path/'out')]) == 1
    _one_line_error(capsys, str(path), 'in-plane voxel size 25 mm')


def test_nifti_whose_qform_and_sform_disagree(checkpoint, tmp_path, capsys):
    "qform and sform 10 mm apart: the sform is used, as nibabel does, and the choice is printed and kept in the summary."
    qform = np.diag([-0.8, -0.8, 2.5, 1.])
    sform = qform.copy(); sform[:3, 3] = [0, 0, 10]
    path = _ct_nifti(tmp_path/'both.nii.gz', affine=qform, sform=(sform, 2))
    res = predict(checkpoint, path, tmp_path/'out', animation=False)
    assert np.allclose(nib.load(res['files']['mask']).affine, sform)
    out = capsys.readouterr().out
    assert 'warning' in out and 'qform and sform' in out and 'sform is used' in out and str(path) in out
    assert any('qform and sform' in w for w in json.loads(Path(res['files']['summary']).read_text())['warnings'])
    near = sform.copy(); near[:3, 3] = [0, 0, 0.5]                              # within a voxel: no note
    res = predict(checkpoint, _ct_nifti(tmp_path/'near.nii.gz', affine=qform, sform=(near, 2)), tmp_path/'out2', animation=False)
    assert not any('qform' in w for w in res['warnings'])
