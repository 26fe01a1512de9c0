"""Compressed DICOM through `core.read_series` + `core.load_hu`: each transfer syntax a CT archive sends, built here from an
uncompressed series, against the HU volume of its uncompressed twin (lossless: identical; lossy: within a stated error).

The series are encoded here: RLE, JPEG-LS and JPEG 2000 by pydicom's own `Dataset.compress` (its RLE encoder, pyjpegls,
pylibjpeg-openjpeg), deflate by pydicom's writer, and the JPEG processes 1, 2-4 and 14, which pydicom cannot encode, by
libjpeg-turbo through imagecodecs (a dev requirement): a different library from the decoder that `load_hu` uses."""
from __future__ import annotations
import subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (UID, generate_uid, CTImageStorage, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless,
                         JPEGLSLossless, JPEG2000Lossless, JPEG2000, JPEGLossless, JPEGLosslessSV1, JPEGBaseline8Bit, JPEGExtended12Bit)
from lung_tumor_seg.core import AIR_HU, LungsegError, SAMPLE_HINT, sample_dir, read_series, load_hu

JPEG_PROCESSES = (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1)   # encoded with imagecodecs

# Lossless syntaxes and the encoder options that make them; process 14 with predictor 6 is the general JPEG Lossless
# (1.2.840.10008.1.2.4.57), predictor 1 its Selection Value 1 form (1.2.840.10008.1.2.4.70).
LOSSLESS = {DeflatedExplicitVRLittleEndian: {}, RLELossless: {}, JPEGLSLossless: {}, JPEG2000Lossless: {},
            JPEGLosslessSV1: dict(lossless=True, predictor=1), JPEGLossless: dict(lossless=True, predictor=6)}
LOSSLESS_IDS = ['deflate', 'rle', 'jpeg-ls', 'j2k-lossless', 'jpeg-lossless-sv1', 'jpeg-lossless-p14']

# Real slices where the sample is present: LIDC-IDRI-0001 stores signed pixels with PixelPaddingValue written unsigned (63536),
# LIDC-IDRI-0002 signed pixels down to -2000 (padding). The synthetic series runs everywhere.
SOURCES = ['synthetic', 'LIDC-IDRI-0001', 'LIDC-IDRI-0002']

def synthetic_series(folder:Path, n_slices:int=6, size:int=256, seed:int=0) -> Path:
    "A small axial CT series written with pydicom: signed 16-bit, padding outside the field of view, air, lung, soft tissue, bone and noise."
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] / size - 0.5
    hu = np.full((size, size), -1000.0)                                             # air
    hu[(x/0.45)**2 + (y/0.35)**2 < 1] = 40                                          # body
    hu[((x + 0.18)/0.15)**2 + (y/0.22)**2 < 1] = hu[((x - 0.18)/0.15)**2 + (y/0.22)**2 < 1] = -850   # lungs
    hu[(np.hypot(x, y + 0.25) < 0.05)] = 1200                                        # vertebra
    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(n_slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID, ds.file_meta.MediaStorageSOPClassUID = ExplicitVRLittleEndian, CTImageStorage
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.InstanceNumber = 'CT', 'SYNTHETIC-CODECS', k + 1
        ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [-90.0, -90.0, 2.5*k]
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 2.5
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Rows, ds.Columns = 1, 'MONOCHROME2', size, size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.PixelPaddingValue = -1024, 1, -2000
        stored = np.clip(hu + rng.normal(0, 20, hu.shape) + 30*k, -1024, 3071) + 1024
        stored[np.hypot(x, y) > 0.5] = -2000                                         # outside the reconstructed circle
        ds.PixelData = stored.astype('<i2').tobytes()
        ds.save_as(folder/f'slice-{k:03d}.dcm', enforce_file_format=True)
    return folder

@pytest.fixture(scope='module')
def source(request, tmp_path_factory) -> Path:
    "Folder of an uncompressed series: the synthetic one, or a patient of the LIDC-IDRI sample (skipped when absent)."
    if request.param == 'synthetic': return synthetic_series(tmp_path_factory.mktemp('synthetic')/'series')
    if sample_dir() is None: pytest.skip(f"real LIDC-IDRI slices absent: {SAMPLE_HINT}")
    return next(p.parent for p in sorted((sample_dir()/request.param).rglob('*.dcm')))

@pytest.fixture(scope='module')
def synthetic(tmp_path_factory) -> Path: return synthetic_series(tmp_path_factory.mktemp('synthetic')/'series')

def requantised(ds:Dataset, bits:int) -> Dataset:
    "`ds` stored unsigned in `bits` bits (intercept -1024; 8 bits: 16 HU a step), as 12-bit CT and 8-bit secondary captures are."
    hu = ds.pixel_array.astype(np.float64)*float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    slope = 1 if bits > 8 else 16
    stored = np.clip(np.round((hu + 1024)/slope), 0, 2**bits - 1).astype(np.uint16 if bits > 8 else np.uint8)
    for k in ('PixelPaddingValue', 'SmallestImagePixelValue', 'LargestImagePixelValue'):
        if k in ds: del ds[k]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (16 if bits > 8 else 8), bits, bits - 1, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, -1024
    ds.PixelData = stored.tobytes(); ds['PixelData'].VR = 'OW' if bits > 8 else 'OB'
    return ds

def encode(ds:Dataset, syntax:UID, **options) -> Dataset:
    "`ds` re-encoded in place in `syntax`."
    if syntax == DeflatedExplicitVRLittleEndian: ds.file_meta.TransferSyntaxUID = syntax    # pydicom's writer deflates the dataset
    elif syntax in JPEG_PROCESSES:
        imagecodecs = pytest.importorskip('imagecodecs', reason='imagecodecs (dev requirement) encodes the JPEG process 1, 2-4 and 14 test files')
        pixels = ds.pixel_array
        if pixels.dtype.kind == 'i': pixels = pixels.view(pixels.dtype.str.replace('i', 'u'))  # JPEG codes the bit pattern of signed samples
        frame = imagecodecs.jpeg8_encode(pixels, bitspersample=int(ds.BitsStored), **options)
        assert frame[:2] == b'\xff\xd8' and (b'\xff\xc3' in frame) == (syntax in (JPEGLossless, JPEGLosslessSV1))   # SOF3: process 14
        ds.PixelData = encapsulate([frame]); ds['PixelData'].VR = 'OB'; ds.file_meta.TransferSyntaxUID = syntax
    elif syntax != ExplicitVRLittleEndian: ds.compress(syntax, **options)
    if syntax in (JPEG2000, JPEGBaseline8Bit, JPEGExtended12Bit): ds.LossyImageCompression = '01'
    return ds

def transcode(src:Path, out:Path, syntax:UID, bits:int|None=None, **options) -> Path:
    "The series of `src` written into `out` in `syntax` (re-quantised to `bits` first when given)."
    out.mkdir(parents=True)
    for f in sorted(src.glob('*.dcm')):
        ds = pydicom.dcmread(f)
        encode(requantised(ds, bits) if bits else ds, syntax, **options).save_as(out/f.name, enforce_file_format=True)
    written = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in out.glob('*.dcm')}
    assert written == {syntax}, written
    return out

def hu_of(folder:Path) -> np.ndarray: return load_hu(read_series(folder))

@pytest.mark.parametrize('syntax', LOSSLESS, ids=LOSSLESS_IDS)
@pytest.mark.parametrize('source', SOURCES, indirect=True)
def test_lossless_syntax_loads_the_uncompressed_hu(source, syntax, tmp_path):
    "Every lossless syntax gives the HU volume of the uncompressed series, voxel for voxel."
    twin = hu_of(source)
    assert twin.std() > 100 and (twin > 0).any() and (twin < -500).any()        # a real range of tissue, not a blank image
    compressed = transcode(source, tmp_path/'compressed', syntax, **LOSSLESS[syntax])
    hu = hu_of(compressed)
    assert hu.dtype == twin.dtype and hu.shape == twin.shape
    assert np.array_equal(hu, twin), f"{syntax.name}: {np.count_nonzero(hu != twin)} voxels differ, max |diff| {np.abs(hu.astype(int) - twin).max()} HU"

# Lossy syntaxes: (syntax, stored bits of the uncompressed twin (None: the source's 16), encoder options, RMS error bound in HU).
# The bounds are loose for the settings (observed on the sample: 6, 3 and 16 HU) and far below what a decoding fault gives
# (wrong sign, byte order, bit depth or rescale: hundreds of HU).
LOSSY = [pytest.param(JPEG2000, None, dict(j2k_cr=[10]), 20, id='j2k-10to1'),
         pytest.param(JPEGExtended12Bit, 12, dict(level=90), 10, id='jpeg-extended-12bit-q90'),
         pytest.param(JPEGBaseline8Bit, 8, dict(level=90), 40, id='jpeg-baseline-8bit-q90')]

def reference_decoded(lossy:Path, out:Path) -> Path:
    "The series of `lossy` decoded by imagecodecs (libjpeg-turbo, OpenJPEG) and written uncompressed into `out`."
    imagecodecs = pytest.importorskip('imagecodecs', reason='imagecodecs (dev requirement) is the reference decoder')
    out.mkdir(parents=True)
    for f in sorted(lossy.glob('*.dcm')):
        ds = pydicom.dcmread(f)
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        pixels = imagecodecs.jpeg2k_decode(frame) if ds.file_meta.TransferSyntaxUID == JPEG2000 else imagecodecs.jpeg8_decode(frame)
        if ds.PixelRepresentation == 1: pixels = pixels.view(pixels.dtype.str.replace('u', 'i'))
        ds.PixelData = pixels.tobytes(); ds['PixelData'].VR = 'OW' if ds.BitsAllocated > 8 else 'OB'
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(out/f.name, enforce_file_format=True)
    return out

@pytest.mark.parametrize('syntax, bits, options, rms_hu', LOSSY)
@pytest.mark.parametrize('source', SOURCES, indirect=True)
def test_lossy_syntax_within_tolerance(source, syntax, bits, options, rms_hu, tmp_path):
    "A lossy series loads close to its uncompressed twin, without bias, and as another decoder of the same codestreams reads it."
    native = transcode(source, tmp_path/'native', ExplicitVRLittleEndian, bits)   # the twin: same bit depth, uncompressed
    lossy = transcode(native, tmp_path/'lossy', syntax, **options)
    twin, hu = hu_of(native), hu_of(lossy)
    err = hu.astype(np.float64) - twin
    rms = float(np.sqrt(np.mean(err**2)))
    assert 0 < rms <= rms_hu, f"{syntax.name}: RMS error {rms:.1f} HU (bound {rms_hu})"
    assert abs(err.mean()) <= 2, f"{syntax.name}: mean error {err.mean():.2f} HU"   # a wrong intercept or sign shifts every voxel
    # Two decoders of one codestream differ at most by the rounding of the inverse transform: two stored steps, in few voxels.
    ref = hu_of(reference_decoded(lossy, tmp_path/'reference'))
    step = float(pydicom.dcmread(next(lossy.glob('*.dcm')), stop_before_pixels=True).RescaleSlope)
    above_air = (ref > AIR_HU) & (hu > AIR_HU)    # lossy padding no longer equals PixelPaddingValue: both clip it to air
    diff = np.abs(hu.astype(np.float64) - ref)[above_air]
    assert above_air.mean() > 0.3 and diff.max() <= 2*step and np.mean(diff > 0) < 0.1, (diff.max(), np.mean(diff > 0))

def test_frame_split_over_fragments_and_mixed_syntaxes(synthetic, tmp_path):
    "A JPEG 2000 frame in several fragments, and a series whose slices mix syntaxes, load to the uncompressed HU."
    twin = hu_of(synthetic)
    out = tmp_path/'mixed'; out.mkdir()
    syntaxes = [JPEG2000Lossless, RLELossless, ExplicitVRLittleEndian, JPEGLSLossless, DeflatedExplicitVRLittleEndian, JPEG2000Lossless]
    for k, f in enumerate(sorted(synthetic.glob('*.dcm'))):
        ds = encode(pydicom.dcmread(f), syntaxes[k % len(syntaxes)])
        if k == 0:   # the codestream cut into 4 fragments
            frame = next(generate_frames(ds.PixelData, number_of_frames=1))
            ds.PixelData = encapsulate([frame], fragments_per_frame=4)
            assert len(list(pydicom.encaps.generate_fragments(ds.PixelData))) == 4 + 1   # basic offset table item + 4 fragments
        ds.save_as(out/f.name, enforce_file_format=True)
    assert np.array_equal(hu_of(out), twin)

def truncate_first_frame(path:Path):
    "Rewrite the DICOM file at `path` with its (single) compressed frame cut to half its length; the header stays valid."
    ds = pydicom.dcmread(path)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[:len(frame)//2]])
    ds.save_as(path)

@pytest.mark.parametrize('syntax', [JPEG2000Lossless, RLELossless, JPEGLSLossless, JPEGLosslessSV1],
                         ids=['j2k-lossless', 'rle', 'jpeg-ls', 'jpeg-lossless-sv1'])
def test_truncated_frame_names_file_and_syntax(synthetic, syntax, tmp_path):
    "A slice whose compressed frame is cut short: `LungsegError`, one line naming the file and its transfer syntax."
    folder = transcode(synthetic, tmp_path/'compressed', syntax, **LOSSLESS[syntax])
    bad = sorted(folder.glob('*.dcm'))[2]
    truncate_first_frame(bad)
    series = read_series(folder)                      # the headers are intact: the fault shows when the pixels are decoded
    assert bad in [Path(f) for f in series.files]
    try: load_hu(series)
    except LungsegError as e: msg = str(e)
    else: pytest.fail(f"{syntax.name}: a frame cut to half its length loaded without an error (its missing part filled in silently)")
    assert '\n' not in msg and bad.name in msg and syntax.name in msg, msg

def test_syntax_without_installed_decoder_names_the_syntax(synthetic, tmp_path):
    "JPEG-LS with its decoders hidden (as if pyjpegls, pylibjpeg and GDCM were not installed): one line naming the syntax."
    folder = transcode(synthetic, tmp_path/'jpeg-ls', JPEGLSLossless)
    script = ("import sys\n"
              "for name in ('jpeg_ls', 'pylibjpeg', 'libjpeg', 'gdcm'): sys.modules[name] = None   # imports of these now fail\n"
              "from lung_tumor_seg.core import LungsegError, read_series, load_hu\n"
              "try: load_hu(read_series(sys.argv[1]))\n"
              "except LungsegError as e: print(e); sys.exit(3)\n")
    r = subprocess.run([sys.executable, '-c', script, str(folder)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, f"expected LungsegError, got rc {r.returncode}: {r.stdout[-500:]} {r.stderr[-2000:]}"
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and JPEGLSLossless.name in lines[0] and str(folder) in lines[0], lines
