"`lungseg predict` on small synthetic DICOM series and NIfTI files: output grid, DICOM SEG references, bad inputs."
import json
from pathlib import Path
import numpy as np, nibabel as nib, pandas as pd, pydicom, pytest, torch
from pydicom.dataset import Dataset, FileMetaDataset
from conftest import tiny_checkpoint, threshold_model
from pydicom.uid import ExplicitVRLittleEndian, generate_uid, CTImageStorage
from lung_tumor_seg.core import read_series, load_hu, save_nifti
from lung_tumor_seg.inference import predict, predict_main, read_volume, load_model
from lung_tumor_seg.core import remove_small_components

def write_series(folder, hu_zyx, spacing_mm=(2.5, 0.8, 0.8), iop=(1, 0, 0, 0, 1, 0), origin=(-100., -120., -50.), patient_id='SYNTH-0001'):
    "A minimal axial CT series written with pydicom (synthetic test data), slices written in a shuffled order."
    folder = Path(folder); folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    normal = np.cross(iop[:3], iop[3:])
    for k in np.random.default_rng(1).permutation(len(hu_zyx)):
        meta = FileMetaDataset(); meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = uid = generate_uid(); meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset(); ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, uid, 'CT'
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient_id, 'Synthetic^Phantom', '', 'O'
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = '20260101', '120000', '1', '', ''
        ds.SeriesNumber, ds.InstanceNumber = 1, int(k) + 1
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k*spacing_mm[0]*normal]
        ds.ImageOrientationPatient, ds.PixelSpacing, ds.SliceThickness = list(iop), list(spacing_mm[1:]), spacing_mm[0]
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = *hu_zyx[k].shape, 1, 'MONOCHROME2'
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.PixelData = 1, 0, np.asarray(hu_zyx[k], np.int16).tobytes()
        ds.save_as(folder/f'{k:04d}.dcm', enforce_file_format=True)
    return folder

def synthetic_ct(shape=(10, 48, 48)):
    "Synthetic chest-like volume: body, two lungs of different size (not mirror-symmetric), a tumour; int16 HU."
    ct = np.full(shape, -1000, np.int16)
    ct[:, 6:42, 4:46] = 30                                         # edges on even indices: 2x2 blocks stay uniform
    ct[:, 12:36, 8:22] = -850; ct[:, 14:30, 28:42] = -850
    ct[3:6, 16:22, 12:18] = 40
    return np.maximum(ct + np.random.default_rng(0).normal(0, 8, shape), -1024).astype(np.int16)


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    "A small untrained 2.5D SegModule checkpoint whose head is set to predict tumour everywhere."
    return tiny_checkpoint(tmp_path_factory.mktemp('ckpt')/'tiny.ckpt')

def test_predict_dicom_cli_grid_and_seg(checkpoint, tmp_path, capsys):
    folder = write_series(tmp_path/'series', synthetic_ct())
    out = tmp_path/'out'
    assert predict_main(['--checkpoint', str(checkpoint), '--input', str(folder), '--out', str(out), '--seg', '--prob', '--sr']) == 0
    series = read_series(folder)
    mask = nib.load(out/'SYNTH-0001_mask.nii.gz')
    assert mask.shape == series.geometry.shape[::-1]
    assert np.allclose(mask.affine, series.geometry.affine, atol=1e-4)
    assert nib.load(out/'SYNTH-0001_prob.nii.gz').shape == mask.shape
    data = np.asarray(mask.dataobj)
    assert data.min() == 1                          # the head predicts tumour everywhere: nothing lost in crop/resize
    seg = pydicom.dcmread(out/'SYNTH-0001_seg.dcm')
    assert seg.Modality == 'SEG' and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    assert seg.FrameOfReferenceUID == series.headers[0].FrameOfReferenceUID
    refs = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == set(series.sop_uids)
    per_frame = [f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID for f in seg.PerFrameFunctionalGroupsSequence]
    assert sorted(per_frame) == sorted(series.sop_uids)
    assert (out/'SYNTH-0001_overlay.gif').exists()
    summary = json.loads((out/'SYNTH-0001_prediction.json').read_text())
    assert summary['tumour_voxels'] == int(data.sum())
    import highdicom as hd   # the nodules' measurement report reads back and references the SEG and the CT
    sr = hd.sr.srread(out/'SYNTH-0001_sr.dcm')
    text = str(sr)
    assert seg.SOPInstanceUID in text and series.sop_uids[0] in text
    findings = pd.read_csv(out/'SYNTH-0001_findings.csv')
    assert len(findings) == summary['nodules'] == 1 and f"{findings.long_axis_mm[0]:g}"[:3] in text

@pytest.mark.parametrize('iop', [(1, 0, 0, 0, 1, 0), (-1, 0, 0, 0, -1, 0)], ids=['head-first', 'rotated-180'])
def test_mask_lands_on_the_input_voxels(tmp_path, iop):
    "With a model of known answer (HU > -600), the written mask equals that rule applied to the input's own voxels."
    ct = synthetic_ct()
    folder = write_series(tmp_path/'series', ct, iop=iop)
    res = predict(threshold_model(), folder, tmp_path/'out', seg=True, animation=False)
    series = read_series(folder)
    written = np.asarray(nib.load(res['files']['mask']).dataobj).transpose(2, 1, 0)
    expected = load_hu(series) > -600
    assert written.shape == expected.shape
    assert (written == expected).mean() > 0.99       # resizing 48x48 -> 24x24 and back blurs only edges
    seg = pydicom.dcmread(res['files']['seg'])
    per_frame = {f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID for f in seg.PerFrameFunctionalGroupsSequence}
    assert per_frame == {series.sop_uids[k] for k in np.nonzero(written.any((1, 2)))[0]}

def test_nifti_in_any_orientation(tmp_path):
    ct = synthetic_ct()
    affine = np.array([[0, 0.8, 0, -20], [-0.8, 0, 0, 30], [0, 0, -2.5, 40], [0, 0, 0, 1.]])   # axes swapped and flipped
    path = tmp_path/'scan.nii.gz'; nib.save(nib.Nifti1Image(ct.transpose(2, 1, 0), affine), path)
    res = predict(threshold_model(), path, tmp_path/'out', prob=True, min_volume_mm3=5, animation=False)
    out = nib.load(res['files']['mask'])
    assert out.shape == ct.transpose(2, 1, 0).shape and np.allclose(out.affine, affine)
    written = np.asarray(out.dataobj).transpose(2, 1, 0)
    assert (written == (ct > -600)).mean() > 0.99
    assert read_volume(path).spacing_mm == pytest.approx((2.5, 0.8, 0.8))

def test_remove_small_components_by_volume():
    m = np.zeros((6, 20, 20), np.uint8); m[1:4, 2:6, 2:6] = 1; m[5, 15:17, 15:17] = 1
    assert remove_small_components(m, (2.0, 0.5, 0.5), 2.1).sum() == 48      # 4 voxels × 0.5 mm³ = 2 mm³ removed
    assert remove_small_components(m, (2.0, 0.5, 0.5), 1.9).sum() == 52

def _one_line_error(capsys, *parts):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('lungseg: error:'), err
    for p in parts: assert p in err[0], err[0]

def test_bad_inputs(checkpoint, tmp_path, capsys):
    out = str(tmp_path/'out')
    four_d = tmp_path/'rgb.nii.gz'; nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 3), np.float32), np.eye(4)), four_d)
    assert predict_main(['--checkpoint', str(checkpoint), '--input', str(four_d), '--out', out]) == 1
    _one_line_error(capsys, 'rgb.nii.gz', '3 channels')
    blank = tmp_path/'blank.nii.gz'; nib.save(nib.Nifti1Image(np.full((8, 8, 4), -1000, np.int16), np.diag([0.7, 0.7, 2.5, 1])), blank)
    assert predict_main(['--checkpoint', str(checkpoint), '--input', str(blank), '--out', out]) == 1
    _one_line_error(capsys, 'blank.nii.gz', 'empty volume')
    tiny = tmp_path/'units.nii.gz'; nib.save(nib.Nifti1Image(synthetic_ct().transpose(2, 1, 0), np.diag([0.05, 0.05, 0.1, 1])), tiny)   # cm read as mm, or worse
    assert predict_main(['--checkpoint', str(checkpoint), '--input', str(tiny), '--out', out]) == 1
    _one_line_error(capsys, 'units.nii.gz', 'spacing')
    good = tmp_path/'good.nii.gz'; nib.save(nib.Nifti1Image(synthetic_ct().transpose(2, 1, 0), np.diag([-0.8, -0.8, 2.5, 1])), good)
    assert predict_main(['--checkpoint', str(checkpoint), '--input', str(good), '--out', out, '--seg']) == 1
    _one_line_error(capsys, 'DICOM')
    corrupt = tmp_path/'corrupt.ckpt'; corrupt.write_bytes(Path(checkpoint).read_bytes()[:4000])
    assert predict_main(['--checkpoint', str(corrupt), '--input', str(good), '--out', out]) == 1
    _one_line_error(capsys, 'corrupt.ckpt')
    other = torch.load(checkpoint, weights_only=False); other['hyper_parameters']['context_slices'] = 2
    torch.save(other, tmp_path/'other.ckpt')
    assert predict_main(['--checkpoint', str(tmp_path/'other.ckpt'), '--input', str(good), '--out', out]) == 1
    _one_line_error(capsys, 'other.ckpt', 'weights do not match')
    foreign = tmp_path/'foreign.ckpt'; torch.save({'state_dict': {}, 'epoch': 3}, foreign)
    assert predict_main(['--checkpoint', str(foreign), '--input', str(good), '--out', out]) == 1
    _one_line_error(capsys, 'foreign.ckpt')
    assert not (tmp_path/'out').exists() or not any((tmp_path/'out').iterdir())   # failures write nothing

def test_spacing_outside_chest_ct_warns(checkpoint, tmp_path, capsys):
    thick = tmp_path/'thick.nii.gz'; nib.save(nib.Nifti1Image(synthetic_ct().transpose(2, 1, 0), np.diag([-0.8, -0.8, 10.0, 1])), thick)
    assert predict_main(['--checkpoint', str(checkpoint), '--input', str(thick), '--out', str(tmp_path/'out'), '--no-animation']) == 0
    assert 'slice spacing 10 mm is outside' in capsys.readouterr().out

def test_phantom_dicom_and_nifti_give_the_same_mask(tmp_path):
    "On a synthetic phantom patient the DICOM series and its Task06 NIfTI twin yield the same mask, each on its own grid."
    from lung_tumor_seg.phantom import cached_phantom
    phantom = cached_phantom(2)     # shared with the other tests that need the phantom
    folder = next(phantom.glob('LIDC-IDRI/PHANTOM-0001/*/*'))
    entry = next(e for e in json.loads((phantom/'truth.json').read_text())['patients'] if e['patient_id'] == 'PHANTOM-0001')
    image = phantom/'Task06_Lung'/'imagesTr'/f"{entry['task06']}.nii.gz"
    model = threshold_model()
    from_dicom = predict(model, folder, tmp_path/'dicom', seg=True, animation=False)
    from_nifti = predict(model, image, tmp_path/'nifti', animation=False)
    series = read_series(folder)
    a, b = nib.load(from_dicom['files']['mask']), nib.load(from_nifti['files']['mask'])
    assert a.shape == series.geometry.shape[::-1] and np.allclose(a.affine, series.geometry.affine, atol=1e-4)
    assert b.shape == nib.load(image).shape and np.allclose(b.affine, nib.load(image).affine, atol=1e-4)
    # both grids hold the same voxels: compare in world space through the affines
    to_b = np.linalg.inv(b.affine) @ a.affine
    ijk = np.argwhere(np.asarray(a.dataobj) > 0)[::97]
    mapped = np.rint(ijk @ to_b[:3, :3].T + to_b[:3, 3]).astype(int)
    assert np.asarray(b.dataobj)[tuple(mapped.T)].mean() > 0.99
    seg = pydicom.dcmread(from_dicom['files']['seg'])
    per_frame = {f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID for f in seg.PerFrameFunctionalGroupsSequence}
    marked = np.asarray(a.dataobj).any((0, 1))
    assert per_frame == {series.sop_uids[k] for k in np.nonzero(marked)[0]}

from lung_tumor_seg.core import sample_dir, SAMPLE_HINT

@pytest.mark.skipif(sample_dir() is None, reason=SAMPLE_HINT)
def test_predict_on_the_real_sample(tmp_path):
    "Real LIDC-IDRI slices (GE padding, real headers): mask on the series grid, SEG frames referencing real SOP instances."
    folder = next((sample_dir()/'LIDC-IDRI-0001').glob('*/*'))
    res = predict(threshold_model(), folder, tmp_path, seg=True, animation=False)
    series = read_series(folder)
    mask = nib.load(res['files']['mask'])
    assert mask.shape == (512, 512, 16) and np.allclose(mask.affine, series.geometry.affine, atol=1e-4)
    seg = pydicom.dcmread(res['files']['seg'])
    per_frame = {f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID for f in seg.PerFrameFunctionalGroupsSequence}
    assert per_frame == {series.sop_uids[k] for k in np.nonzero(np.asarray(mask.dataobj).any((0, 1)))[0]}
    assert seg.PatientID == 'LIDC-IDRI-0001' and seg.StudyInstanceUID == series.study_uid

def test_a_scan_without_nodules_gets_its_outputs_and_no_sr(tmp_path):
    "Nothing found: mask, empty findings, SEG and RT Structure Set written; no SR (TID 1500 needs a measurement), said in the summary."
    from lung_tumor_seg.phantom import cached_phantom
    folder = next(cached_phantom(2).glob('LIDC-IDRI/PHANTOM-0001/*/*'))
    model = threshold_model()
    with torch.no_grad(): model.conv.bias.fill_(-1000.)   # sees nothing anywhere
    res = predict(model, folder, tmp_path, sr=True, rtstruct=True, animation=False)
    assert res['nodules'] == 0 and 'sr' not in res['files'] and {'mask', 'seg', 'rtstruct', 'findings_csv', 'summary'} <= set(res['files'])
    assert any('no DICOM SR written' in w for w in json.loads(res['files']['summary'].read_text())['warnings'])
    assert len(pd.read_csv(res['files']['findings_csv'])) == 0
    rt = pydicom.dcmread(res['files']['rtstruct'])
    assert rt.Modality == 'RTSTRUCT' and len(rt.get('StructureSetROISequence', [])) == 0
    assert not (np.asarray(nib.load(res['files']['mask']).dataobj)).any()
