"`lungseg masks` on bad input and on the real sample: clear messages naming file and nodule, the rest processed, no partial output."
import copy, json
from pathlib import Path
import numpy as np, pandas as pd
import pydicom, pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from lung_tumor_seg.core import DicomSeries, LungsegError, sample_dir, SAMPLE_HINT, read_series
from lung_tumor_seg.masks import series_masks, masks_main
from lung_tumor_seg.annotations import parse_lidc_xml, write_read

SHAPE = (6, 48, 48)  # synthetic series: slices, rows, columns

def _headers(series_uid, patient_id='SYNTH-0001', n=SHAPE[0]):
    "Header-only synthetic CT slices (2 mm apart), enough for alignment and masks."
    out = []
    for k in range(n):
        ds = Dataset()
        ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = patient_id, '1.2.826.0.1.3680043.8.498.1', series_uid
        ds.SOPInstanceUID, ds.SOPClassUID = f'{series_uid}.{k + 1}', '1.2.840.10008.5.1.4.1.1.2'
        ds.Modality, ds.ImagePositionPatient, ds.ImageOrientationPatient = 'CT', [-100.0, -100.0, 10.0 + 2*k], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness, ds.Rows, ds.Columns = [0.8, 0.8], 2.0, SHAPE[1], SHAPE[2]
        out.append(ds)
    return out

def _write_series(folder, headers):
    folder.mkdir(parents=True)
    for k, ds in enumerate(headers):
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID, ds.file_meta.MediaStorageSOPClassUID = ExplicitVRLittleEndian, ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 16, 16, 15, 1, 1
        ds.PhotometricInterpretation, ds.PixelData = 'MONOCHROME2', np.zeros(SHAPE[1:], np.int16).tobytes()
        ds.save_as(folder/f'{k}.dcm', enforce_file_format=True)
    return folder

def _square(x0, y0, side=8):
    "Outline traced pixel by pixel, LIDC style (first point repeated last)."
    top = [[x, y0] for x in range(x0, x0 + side)]; right = [[x0 + side, y] for y in range(y0, y0 + side)]
    bottom = [[x, y0 + side] for x in range(x0 + side, x0, -1)]; left = [[x0, y] for y in range(y0 + side, y0, -1)]
    pts = top + right + bottom + left
    return pts + [pts[0]]

def _read(series_uid, file='synthetic.xml'):
    "A synthetic annotations read: two readers outlining one nodule on slices 2-3, one small nodule, one non-nodule."
    def roi(k, xy, inclusion=True): return dict(z_mm=10.0 + 2*k, sop_uid=f'{series_uid}.{k + 1}', inclusion=inclusion, edge_map=xy,
                                               slice_index=None, slice_match=None)
    def nodule(nid, rois, small=False, position=None):
        return dict(nodule_id=nid, small=small, characteristics=None if small else dict(malignancy=3, subtlety=4), position=position, rois=rois)
    sessions = [dict(reader_id=f'R{r}', annotation_version=None, nodules=[nodule(f'N{r}', [roi(2, _square(10, 10)), roi(3, _square(11, 10))])],
                     non_nodules=[]) for r in (1, 2)]
    sessions[0]['nodules'].append(nodule('S1', [roi(4, [[30, 30]])], small=True,
                                         position=dict(x=30, y=30, z_mm=18.0, sop_uid=f'{series_uid}.5', slice_index=None)))
    sessions[1]['non_nodules'].append(dict(non_nodule_id='NN1', z_mm=12.0, sop_uid=f'{series_uid}.2', locus=[5, 40], slice_index=None, slice_match=None))
    return dict(schema_version='1.0', source_file=file, message_uid=None, series_uid=series_uid, study_uid=None, patient_id=None,
                reading_sessions=sessions, warnings=[], alignment=None)

UID = '1.2.826.0.1.3680043.8.498.77'

@pytest.fixture
def series(): return DicomSeries(Path('synthetic'), [Path(f'{k}.dcm') for k in range(SHAPE[0])], _headers(UID))

def test_synthetic_read(series):
    "Two agreeing readers give one nodule of 2 readers; the small nodule and the non-nodule stay out of the masks but are listed."
    sm = series_masks(_read(UID), series)
    assert sm.readers.shape == SHAPE and sm.readers.max() == 2 and sm.readers[[0, 1, 4, 5]].sum() == 0
    assert len(sm.nodules) == 1 and sm.nodules.n_readers[0] == 2 and sm.nodules.malignancy[0] == 3
    assert (sm.consensus[2] == 1).sum() == 7*7  # interior of an 8-pixel square outline, outline excluded
    assert sorted(sm.small.kind) == ['non_nodule', 'small_nodule'] and sm.consensus[4, 30, 30] == 0 and not sm.problems

def _bad(read, reader=0, nodule=0, roi=0, **change):
    read = copy.deepcopy(read); read['reading_sessions'][reader]['nodules'][nodule]['rois'][roi].update(change); return read

def test_outline_outside_image(series):
    "An outline reaching outside the image: the annotation is left out, named; the other reader's annotation still counts."
    sm = series_masks(_bad(_read(UID), edge_map=_square(44, 10)), series)
    assert any('synthetic.xml' in p and 'N1' in p and 'outside' in p for p in sm.problems), sm.problems
    assert sm.readers.max() == 1 and len(sm.nodules) == 1 and sm.nodules.n_readers[0] == 1

def test_two_point_outline(series):
    "A two-point outline encloses nothing: named and left out; the annotation keeps its other outline."
    sm = series_masks(_bad(_read(UID), roi=1, edge_map=[[11, 10], [19, 18]]), series)
    assert any('N1' in p and '2-point' in p for p in sm.problems), sm.problems
    assert sm.readers[3].max() == 1 and sm.readers[2].max() == 2

def test_self_intersecting_outline(series):
    "A bow-tie outline is reported by file and nodule and filled by the even-odd rule (as pylidc)."
    bowtie = [[10, 10], [20, 20], [20, 10], [10, 20], [10, 10]]
    sm = series_masks(_bad(_read(UID), edge_map=bowtie), series)
    assert any('synthetic.xml' in p and 'N1' in p and 'self-intersecting' in p for p in sm.problems), sm.problems
    assert len(sm.nodules) == 1

def test_roi_on_missing_slice(series):
    "An outline on a slice the series lacks is named and left out; the rest of the read is processed."
    sm = series_masks(_bad(_read(UID), roi=1, sop_uid='9.9.9', z_mm=99.0), series)
    assert any('synthetic.xml' in p and 'N1' in p and 'absent' in p for p in sm.problems), sm.problems
    assert sm.readers[2].max() == 2 and sm.readers[3].max() == 1

def test_cli_series_missing_and_no_partial_output(tmp_path, capsys):
    "A read whose series is absent and a malformed read fail with their files named; the good read is written completely; exit 1."
    _write_series(tmp_path/'dicom'/'SYNTH-0001'/'study'/'series', _headers(UID))
    write_read(_read(UID), tmp_path/'json'/'good.json')
    write_read(_read('1.2.826.0.1.3680043.8.498.99', file='lost.xml'), tmp_path/'json'/'lost.json')
    broken = _read(UID, file='broken.xml'); del broken['reading_sessions'][0]['nodules'][0]['rois'][0]['edge_map']
    write_read(broken, tmp_path/'json'/'broken.json')
    rc = masks_main([str(tmp_path/'json'), '--dicom', str(tmp_path/'dicom'), '--out', str(tmp_path/'masks')])
    err = capsys.readouterr().err
    assert rc == 1 and 'lost.json' in err and '1.2.826.0.1.3680043.8.498.99' in err
    assert 'broken.json' in err and 'malformed' in err
    out = tmp_path/'masks'
    assert sorted(p.name for p in out.iterdir()) == [f'SYNTH-0001_{UID}', 'nodules.csv', 'problems.txt', 'small_findings.csv']
    assert not list(out.rglob('*.part*'))
    assert np.load(out/f'SYNTH-0001_{UID}'/'consensus.npy').shape == SHAPE
    assert len(pd.read_csv(out/'nodules.csv')) == 1 and 'lost.json' in (out/'problems.txt').read_text()

@pytest.mark.skipif(sample_dir() is None, reason=SAMPLE_HINT)
def test_cli_real_sample(tmp_path):
    "On the real LIDC sample, patient 0001's consensus is non-empty exactly on sample slices its readers outlined; NIfTI overlays the CT."
    import nibabel as nib
    root = sample_dir()
    for xml in sorted(root.rglob('*.xml')): write_read(parse_lidc_xml(xml), tmp_path/'json'/f'{xml.stem}.json')
    assert masks_main([str(tmp_path/'json'), '--dicom', str(root), '--out', str(tmp_path/'masks')]) == 0
    table = pd.read_csv(tmp_path/'masks'/'nodules.csv')
    assert sorted(table.patient_id) == ['LIDC-IDRI-0001', 'LIDC-IDRI-0002']
    xml = next((root/'LIDC-IDRI-0001').rglob('*.xml'))
    series = read_series(xml.parent)
    folder = tmp_path/'masks'/f'LIDC-IDRI-0001_{series.series_uid}'
    consensus, readers = np.load(folder/'consensus.npy'), np.load(folder/'readers.npy')
    assert consensus.shape == readers.shape == series.geometry.shape
    outlined = (readers >= 2).any(axis=(1, 2))
    assert outlined.sum() >= 5 and (consensus > 0).any(axis=(1, 2))[outlined].all()
    img = nib.load(folder/'consensus.nii.gz')
    np.testing.assert_allclose(img.affine, series.geometry.affine)
    np.testing.assert_array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), consensus)
