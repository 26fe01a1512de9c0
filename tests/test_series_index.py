"The local series index (headers only, cached) and resolution of SeriesInstanceUIDs to local series."
import shutil
from pathlib import Path
import pytest

from lung_tumor_seg.core import LungsegError, read_series, sample_dir, SAMPLE_HINT
from lung_tumor_seg.download import NBIASource, verified_series
from lung_tumor_seg.nbia_testserver import NBIATestServer, write_tiny_series
from lung_tumor_seg.series_index import build_series_index, resolve_series, missing_series, INDEX_COLUMNS


def _write_archive(root, n_patients=6):
    "Synthetic series (two for every other patient, varying slice counts); returns the expected index rows."
    truth = []
    for i in range(1, n_patients + 1):
        for seed in range(1 + i % 2):
            n = 2 + (i + seed) % 4
            folder = write_tiny_series(root, f'SYNTH-{i:04d}', n_slices=n, seed=seed)
            truth.append((f'SYNTH-{i:04d}', folder.parent.name, folder.name, 'CT', n, str(folder)))
    return sorted(truth)


def test_index_rows_match_the_written_series(tmp_path):
    truth = _write_archive(tmp_path/'raw')
    (tmp_path/'raw'/'SYNTH-0001'/'notes.txt').write_text('not DICOM')
    index = build_series_index(tmp_path/'raw', cache=None)
    assert list(index.columns) == INDEX_COLUMNS
    assert [tuple(r) for r in index.drop(columns='files').itertuples(index=False)] == truth
    assert [sorted(Path(f).parent for f in files) == [Path(p)]*n for files, p, n in zip(index.files, index.path, index.slice_count)]
    assert index.attrs['folders_read'] == len(truth) + 1 and index.attrs['skipped'] == 1   # the notes' folder, looked at and skipped


def test_cache_is_reused_and_refreshed_on_change(tmp_path):
    truth = _write_archive(tmp_path/'raw')
    cache = tmp_path/'cache'/'index.json'
    first = build_series_index(tmp_path/'raw', cache=cache)
    assert cache.exists() and first.attrs['folders_read'] == len(truth) and first.attrs['headers_read'] == sum(r[4] for r in truth)
    second = build_series_index(tmp_path/'raw', cache=cache)
    assert second.attrs['headers_read'] == 0 and second.equals(first)
    # slices added to one series, one series removed, one series added
    grown = write_tiny_series(tmp_path/'raw', 'SYNTH-0001', n_slices=7, seed=0)
    uid = grown.name
    assert dict((r[2], r[4]) for r in truth)[uid] < 7
    shutil.rmtree(truth[-1][5])
    new = write_tiny_series(tmp_path/'raw', 'SYNTH-0100', n_slices=2)
    third = build_series_index(tmp_path/'raw', cache=cache)
    assert third.attrs['folders_read'] == 2 and third.attrs['headers_read'] == 7 + 2
    counts = dict(zip(third.series_uid, third.slice_count))
    assert counts[uid] == 7 and truth[-1][2] not in counts and counts[new.name] == 2
    # a damaged cache is rebuilt from the folders
    cache.write_text('{"version": 1, "root": ')
    assert build_series_index(tmp_path/'raw', cache=cache).equals(third)


def test_folders_without_series_and_bad_roots(tmp_path):
    with pytest.raises(LungsegError, match='DICOM folder not found'): build_series_index(tmp_path/'absent', cache=None)
    (tmp_path/'a'/'b').mkdir(parents=True)
    (tmp_path/'a'/'b'/'scan.dcm').write_bytes(b'\0' * 200)  # named .dcm but not DICOM
    assert len(build_series_index(tmp_path, cache=None)) == 0


@pytest.mark.skipif(sample_dir() is None, reason=SAMPLE_HINT)
def test_real_sample_index_agrees_with_full_header_read():
    "First-header index rows agree with core.read_series, which reads every header."
    index = build_series_index(sample_dir(), cache=None)
    assert len(index) == 2
    for row in index.itertuples():
        series = read_series(row.path)
        assert (row.series_uid, row.study_uid, row.patient_id, row.slice_count) == \
               (series.series_uid, series.study_uid, series.patient_id, len(series.files))


def test_resolve_lists_every_missing_series_in_one_error(tmp_path):
    truth = _write_archive(tmp_path/'raw', n_patients=2)
    index = build_series_index(tmp_path/'raw', cache=None)
    wanted = [truth[0][2], '1.2.3.4', truth[1][2], '1.2.3.5']
    assert missing_series(wanted, index) == ['1.2.3.4', '1.2.3.5']
    with pytest.raises(LungsegError, match=r'2 series not under .* no download source given: 1\.2\.3\.4 1\.2\.3\.5$'):
        resolve_series(wanted, index)
    assert resolve_series(wanted[::2], index) == {truth[0][2]: Path(truth[0][5]), truth[1][2]: Path(truth[1][5])}


def test_resolve_downloads_only_the_missing_series(tmp_path):
    "With a source, missing series come from the (loopback) NBIA server; local ones are not fetched."
    archive = _write_archive(tmp_path/'archive', n_patients=3)
    local = archive[0]
    shutil.copytree(Path(local[5]), tmp_path/'raw'/local[0]/local[1]/local[2])
    index = build_series_index(tmp_path/'raw', cache=None)
    with NBIATestServer({'SYNTHETIC': tmp_path/'archive'}) as server:
        folders = resolve_series([r[2] for r in archive], index, source=NBIASource(server.url, timeout_s=5, backoff_s=0.01),
                                 progress=False)
        assert server.count('getImage', local[2]) == 0 and server.count('getImage') == len(archive) - 1
        with pytest.raises(LungsegError, match='1 series not found'):
            resolve_series(['1.2.3.4'], index, source=NBIASource(server.url, timeout_s=5, backoff_s=0.01), progress=False)
    assert set(folders) == {r[2] for r in archive}
    assert all(f.is_relative_to(tmp_path/'raw') for f in folders.values())
    assert set(verified_series(tmp_path/'raw')) == {r[2] for r in archive[1:]}
    assert len(build_series_index(tmp_path/'raw', cache=None)) == len(archive)


@pytest.mark.slow
def test_phantom_index_of_100_series(tmp_path):
    "The index of 100 phantom series (written once, minutes) lists each patient once, CT only; a second run reads no header."
    from lung_tumor_seg.phantom import cached_phantom
    root = cached_phantom(n_patients=100)/'LIDC-IDRI'
    index = build_series_index(root, cache=tmp_path/'index.json')
    assert len(index) == 100 and index.patient_id.is_unique and set(index.modality) == {'CT'}
    assert build_series_index(root, cache=tmp_path/'index.json').attrs['headers_read'] == 0
