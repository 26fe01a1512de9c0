"`lungseg download` end to end against the loopback NBIA server: faults, interruption and resume, bad input."
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest

from lung_tumor_seg.core import LungsegError, sample_dir, SAMPLE_HINT
from lung_tumor_seg.download import (download, download_main, NBIASource, MirrorSource, SeriesInfo, verified_series,
                                     MARKER, STAGING)
from lung_tumor_seg.nbia_testserver import NBIATestServer, Fault, FAULT_KINDS, write_tiny_series

FAST = ['--quiet', '--backoff', '0.01']


def _archive(root, n=4, n_slices=3):
    "Synthetic series of `n` patients; returns {series_uid: source folder}."
    return {f.name: f for f in (write_tiny_series(root, f'SYNTH-{i:04d}', n_slices=n_slices) for i in range(1, n + 1))}


def _assert_identical(src_folders, raw):
    "Every source series is present under `raw` in the download layout, byte for byte, with its record."
    present = verified_series(raw)
    for uid, src in src_folders.items():
        dest = raw/src.relative_to(src.parents[2])
        assert present.get(uid) == dest, f"{uid} missing or misplaced"
        for f in src.iterdir():
            assert (dest/f.name).read_bytes() == f.read_bytes(), f"{dest/f.name} differs from its source"
        assert json.loads((dest/MARKER).read_text())['series_uid'] == uid


def _no_leftovers(raw):
    "No temporary folder or file of an interrupted or failed fetch remains."
    raw = Path(raw)
    if not raw.exists(): return
    assert not (raw/STAGING).exists(), list((raw/STAGING).iterdir())
    assert not list(raw.glob('*/*/.*.part')) and not list(raw.glob('.*.part'))


@pytest.fixture
def archive(tmp_path):
    return _archive(tmp_path/'archive')


def test_every_fault_ends_complete_and_identical(tmp_path, archive, capsys):
    "With every fault switched on, the CLI ends with every series present and identical to its source."
    collections = {'SYNTHETIC': tmp_path/'archive'}
    if sample_dir() is not None: collections['LIDC-IDRI'] = sample_dir()
    uids = list(archive)
    faults = [Fault('error500', 'getSeriesMetadata'), Fault('throttle429', 'getSeriesMetadata'),
              Fault('drop', series_uid=uids[0]), Fault('truncate', series_uid=uids[0]),
              Fault('wrong_series', series_uid=uids[1]), Fault('corrupt', series_uid=uids[1]),
              Fault('error500', series_uid=uids[2]), Fault('throttle429', series_uid=uids[2]),
              Fault('hang', series_uid=uids[3]), Fault('slow', series_uid=uids[3])]
    assert {f.kind for f in faults} == set(FAULT_KINDS)
    with NBIATestServer(collections, faults, retry_after_s=1, slow_chunk_s=0.02, hang_s=10) as server:
        series = uids + ([p.name for p in sample_dir().glob('*/*/*')] if sample_dir() else [])
        rc = download_main(['--out', str(tmp_path/'raw'), '--api-url', server.url, '--series', *series,
                            '--timeout', '3', '--workers', '3', *FAST])
        assert [f.kind for f in server.faults if f.times] == [], "faults never triggered"
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert f"{len(series)} series: {len(series)} downloaded, 0 already present, 0 failed" in out.out
    _assert_identical(archive, tmp_path/'raw')
    if sample_dir() is not None:
        _assert_identical({p.name: p for p in sample_dir().glob('*/*/*')}, tmp_path/'raw')
    _no_leftovers(tmp_path/'raw')


def test_series_failing_every_check_is_reported_and_never_placed(tmp_path, archive, capsys):
    "A series whose ZIP is always corrupt is fetched `--attempts` times, then listed; the others complete."
    bad = list(archive)[1]
    with NBIATestServer({'SYNTHETIC': tmp_path/'archive'}, [Fault('corrupt', series_uid=bad, times=None)]) as server:
        rc = download_main(['--out', str(tmp_path/'raw'), '--api-url', server.url, '--collection', 'SYNTHETIC',
                            '--attempts', '2', *FAST])
        assert server.count('getImage', bad) == 2
    err = capsys.readouterr().err
    assert rc == 1
    assert f"{bad}: series {bad}: MD5 mismatch" in err and "gave up after 2 attempts" in err
    assert not list((tmp_path/'raw').rglob(bad))
    _assert_identical({u: f for u, f in archive.items() if u != bad}, tmp_path/'raw')
    _no_leftovers(tmp_path/'raw')


def test_killed_run_resumes_without_refetching(tmp_path, archive):
    "Kill the CLI mid-run; a second run fetches only what was not finished, and completes the set."
    with NBIATestServer({'SYNTHETIC': tmp_path/'archive'}, [Fault('slow', times=None)], slow_chunk_s=0.15) as server:
        code = "import sys; from lung_tumor_seg.download import download_main; sys.exit(download_main(sys.argv[1:]))"
        proc = subprocess.Popen([sys.executable, '-c', code, '--out', str(tmp_path/'raw'), '--api-url', server.url,
                                 '--collection', 'SYNTHETIC', '--workers', '1', *FAST],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 40
            while not verified_series(tmp_path/'raw') and time.monotonic() < deadline and proc.poll() is None: time.sleep(0.05)
            while server.count('getImage') < len(verified_series(tmp_path/'raw')) + 1 and time.monotonic() < deadline: time.sleep(0.05)
            time.sleep(0.3)  # well inside the next series' slow transfer
        finally:
            proc.send_signal(signal.SIGKILL); proc.wait(10)
        done_before = verified_series(tmp_path/'raw')
        assert 1 <= len(done_before) < len(archive), "the kill should land between the first and the last series"
        fetched_before = {u: server.count('getImage', u) for u in archive}
        server.faults.clear()
        report = download(tmp_path/'raw', NBIASource(server.url, timeout_s=5, backoff_s=0.01), collection='SYNTHETIC', progress=False)
        assert sorted(u for u, _ in report.skipped) == sorted(done_before)
        for u in done_before: assert server.count('getImage', u) == fetched_before[u] == 1, f"{u} fetched again"
        assert sorted(u for u, _ in report.results) == sorted(set(archive) - set(done_before))
    _assert_identical(archive, tmp_path/'raw')
    _no_leftovers(tmp_path/'raw')


def test_leftovers_of_an_interrupted_run_are_cleared(tmp_path, archive):
    "Temporary folders of a killed run, and a series folder without its record, are cleared and fetched anew."
    uid, src = next(iter(archive.items()))
    raw = tmp_path/'raw'
    (raw/STAGING/f'{uid}.abc123'/'files').mkdir(parents=True)
    (raw/STAGING/f'{uid}.abc123'/'series.zip').write_bytes(b'PK\x03\x04 half')
    half = raw/src.relative_to(src.parents[2])
    half.mkdir(parents=True)
    (half/'001.dcm').write_bytes((src/'001.dcm').read_bytes())  # a copy stopped after one file, no record
    (half.parent/f'.{uid}.xyz.part').mkdir()
    assert verified_series(raw) == {}
    report = download(raw, MirrorSource(tmp_path/'archive'), progress=False)
    assert report.ok and len(report.results) == len(archive)
    _assert_identical(archive, raw)
    _no_leftovers(raw)


def test_full_disk_is_reported_with_nothing_half_written(tmp_path, archive):
    "An OSError while writing (a full disk) fails that series with its message and leaves no partial files."
    class FullDisk(MirrorSource):
        def fetch(self, info, work, on_bytes=None):
            (work/'files').mkdir(); (work/'files'/'001.dcm').write_bytes(b'partial')
            raise OSError(28, 'No space left on device')
    report = download(tmp_path/'raw', FullDisk(tmp_path/'archive'), progress=False)
    assert len(report.failures) == len(archive) and 'No space left on device' in report.failures[0][1]
    assert not list((tmp_path/'raw').rglob('*.dcm'))
    _no_leftovers(tmp_path/'raw')


@pytest.mark.parametrize('args,message', [
    (['--collection', 'NOPE'], "unknown collection 'NOPE'"),
    (['--collection', 'SYNTHETIC', '--patient', 'SYNTH-0001', 'SYNTH-0099'], '1 patient not found in collection SYNTHETIC'),
    (['--collection', 'SYNTHETIC', '--modality', 'MR'], "no series match collection 'SYNTHETIC', modality MR"),
    (['--series', '1.2.826.0.1.999'], '1 series not found'),
    (['--manifest', 'MANIFEST'], "is not a SeriesInstanceUID"),
    (['--manifest', 'EMPTY'], "lists no series"),
])
def test_bad_input_one_line_error(tmp_path, archive, capsys, args, message):
    "Bad input: one line naming the problem, exit code 1, nothing written."
    (tmp_path/'bad.tcia').write_text("manifestVersion=3.0\nListOfSeriesToDownload=\n1.2.3\n<html>oops</html>\n")
    (tmp_path/'empty.tcia').write_text("manifestVersion=3.0\nListOfSeriesToDownload=\n")
    args = [{'MANIFEST': str(tmp_path/'bad.tcia'), 'EMPTY': str(tmp_path/'empty.tcia')}.get(a, a) for a in args]
    with NBIATestServer({'SYNTHETIC': tmp_path/'archive'}) as server:
        rc = download_main(['--out', str(tmp_path/'raw'), '--api-url', server.url, *args, *FAST])
        assert server.count('getImage') == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith('lungseg: error: ') and message in err[0], err
    assert not (tmp_path/'raw').exists()


def test_server_that_never_answers(tmp_path, archive, capsys):
    "A server that accepts connections but never answers: the client gives up after its retries, with one line."
    with NBIATestServer({'SYNTHETIC': tmp_path/'archive'}, [Fault('hang', endpoint='', times=None)], hang_s=5) as server:
        t0 = time.monotonic()
        rc = download_main(['--out', str(tmp_path/'raw'), '--api-url', server.url, '--collection', 'SYNTHETIC',
                            '--timeout', '0.3', '--retries', '1', *FAST])
        assert time.monotonic() - t0 < 5  # bounded by timeout × attempts, not by the server
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and 'no answer within 0.3 s (gave up after 2 attempts)' in err[0], err
    assert not (tmp_path/'raw').exists()


def test_server_down(tmp_path, capsys):
    "Nothing listening at the API URL: one line, exit 1."
    with NBIATestServer({}) as server: url = server.url  # the port is free again once the server stops
    rc = download_main(['--out', str(tmp_path/'raw'), '--api-url', url, '--collection', 'X', '--retries', '1', *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and 'connection failed' in err[0], err


def test_manifest_without_md5_and_limit(tmp_path, archive, capsys):
    "A .tcia manifest, `--no-md5` (plain getImage) and `--limit` select and fetch exactly the first series."
    uids = sorted(archive)
    manifest = tmp_path/'cart.tcia'
    manifest.write_text("downloadServerUrl=https://example.invalid/servlet\nincludeAnnotation=true\nnoOfrRetry=4\n"
                        "databasevarsion=\nmanifestVersion=3.0\nListOfSeriesToDownload=\n" + '\n'.join(uids) + '\n')
    with NBIATestServer({'SYNTHETIC': tmp_path/'archive'}) as server:
        rc = download_main(['--out', str(tmp_path/'raw'), '--api-url', server.url, '--manifest', str(manifest),
                            '--no-md5', '--limit', '2', *FAST])
        assert (server.count('getImageWithMD5Hash'), server.count('getImage')) == (0, 2)
    assert rc == 0, capsys.readouterr().err
    assert sorted(verified_series(tmp_path/'raw')) == uids[:2]
    _assert_identical({u: archive[u] for u in uids[:2]}, tmp_path/'raw')


def test_default_api_url_is_never_contacted_by_default_in_tests():
    "The default base URL is TCIA's public NBIA v4 API (the one tcia-utils 3.x calls); tests only read the constant."
    from lung_tumor_seg.download import DEFAULT_API_URL
    assert DEFAULT_API_URL.startswith('https://') and DEFAULT_API_URL.endswith('/nbia-api/services/v4')


@pytest.mark.skipif(sample_dir() is None, reason=SAMPLE_HINT)
def test_mirror_of_real_sample(tmp_path, capsys):
    "`--mirror` copies the real sample through the same checks: slices and the LIDC XML, byte for byte; a re-run copies nothing."
    args = ['--out', str(tmp_path/'raw'), '--mirror', str(sample_dir()), '--quiet']
    assert download_main(args) == 0
    _assert_identical({p.name: p for p in sample_dir().glob('*/*/*')}, tmp_path/'raw')
    assert download_main(args) == 0
    assert '2 series: 0 downloaded, 2 already present, 0 failed' in capsys.readouterr().out


def _series_zip(path, files, md5_csv):
    "A series ZIP as NBIA sends it: the files, flat, and an `md5hashes.csv` of the given text."
    import zipfile
    with zipfile.ZipFile(path, 'w') as z:
        for f in files: z.write(f, f.name)
        z.writestr('md5hashes.csv', md5_csv)
    return path


@pytest.mark.parametrize('header', ['Filename,MD5Hash', 'filename,md5hash', 'FILENAME,MD5HASH', 'File Name, MD5 Hash', ''])
def test_md5_list_header_in_any_case(tmp_path, header):
    "The header of md5hashes.csv is recognised whatever its case; the hashes check every file of the series."
    import hashlib
    from lung_tumor_seg.download import extract_series_zip, verify_series_files
    src = write_tiny_series(tmp_path/'archive', n_slices=3)
    files = sorted(src.iterdir())
    rows = ''.join(f"{f.name},{hashlib.md5(f.read_bytes()).hexdigest()}\n" for f in files)
    md5s = extract_series_zip(_series_zip(tmp_path/'series.zip', files, f"{header}\n{rows}"), tmp_path/'files')
    assert sorted(md5s) == [f.name for f in files]
    assert verify_series_files(tmp_path/'files', SeriesInfo(src.name, image_count=3), md5s)['image_count'] == 3


def test_malformed_md5_row_fails_the_series_naming_the_row(tmp_path, archive, capsys):
    "A row that is not `name,32-hex` is reported with the file and the row number, and the series is never placed."
    from lung_tumor_seg.download import extract_series_zip, SeriesCheckError
    src = next(iter(archive.values()))
    files = sorted(src.iterdir())
    text = 'filename,md5hash\n' + f"{files[0].name},{'0'*32}\n" + 'Service Unavailable\n'
    with pytest.raises(SeriesCheckError, match=r"series\.zip/md5hashes\.csv: row 3 is not 'file name,32-hex MD5': 'Service Unavailable'"):
        extract_series_zip(_series_zip(tmp_path/'series.zip', files, text), tmp_path/'files')
    class BadList(NBIASource):
        "A server whose MD5 lists end in a line of an error page."
        def fetch(self, info, work, on_bytes=None):
            folder = self.client_files[info.series_uid]
            return work/'files', extract_series_zip(_series_zip(work/'series.zip', sorted(folder.iterdir()), text), work/'files')
    with NBIATestServer({'SYNTHETIC': tmp_path/'archive'}) as server:
        source = BadList(server.url, timeout_s=5, backoff_s=0.01); source.client_files = archive
        report = download(tmp_path/'raw', source, series_uids=[src.name], attempts=1, progress=False)
    assert len(report.failures) == 1 and 'md5hashes.csv: row 3 is not' in report.failures[0][1]
    assert verified_series(tmp_path/'raw') == {}
    _no_leftovers(tmp_path/'raw')


def test_mirror_finds_dicom_by_content(tmp_path):
    "A mirror whose slices carry no `.dcm` suffix (or no Part 10 preamble) is found, counted and copied; other files are not counted."
    import pydicom
    src = write_tiny_series(tmp_path/'archive', n_slices=3)
    files = sorted(src.glob('*.dcm'))
    files[0].rename(src/'IM0001')                                   # no suffix
    ds = pydicom.dcmread(files[1]); files[1].unlink()
    ds.preamble = None; del ds.file_meta                            # no preamble, no file meta: a bare implicit-VR dataset
    ds.save_as(src/'IM0002', enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert (src/'IM0002').read_bytes()[128:132] != b'DICM'
    (src/'notes.dcm').write_text('not DICOM, whatever its name')
    mirror = MirrorSource(tmp_path/'archive')
    [info] = mirror.find()
    assert (info.series_uid, info.image_count) == (src.name, 3)
    report = download(tmp_path/'raw', mirror, progress=False)
    assert report.ok, report.failures
    _assert_identical({src.name: src}, tmp_path/'raw')
