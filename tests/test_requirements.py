"""The requirements of settings.ini against the code: each floor at least the release that brought every API the code calls.

Reads settings.ini and the library's source text; installs and imports nothing of the requirements. `make test-min` installs
the floors themselves and runs the fast tests on them.
"""
import ast, re, shlex, sys
from configparser import ConfigParser
from pathlib import Path
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT/'lung_tumor_seg'

ARGS = r'(?:[^()]|\([^()]*\))*'   # a call's arguments, one level of parentheses inside

# (distribution, the release that brought the API, the API, the module that calls it, a pattern of the call in its source).
# The release is read off the library's changelog, docs or the source of its releases, not guessed.
API_FLOORS = [
    ('lightning', '2.6', 'lightning.pytorch.callbacks.EMAWeightAveraging (changelog 2.6.0)', 'training', r'\bEMAWeightAveraging\('),
    ('torch', '2.5', 'torch.serialization.safe_globals, the context manager (2.4 has only add_safe_globals)', 'training',
     r'torch\.serialization\.safe_globals\('),
    ('pydicom', '3.0', 'Dataset.save_as(enforce_file_format=) (versionchanged 3.0)', 'nbia_testserver', rf'save_as\({ARGS}enforce_file_format='),
    ('pydicom', '3.0', 'Dataset.save_as(enforce_file_format=) (versionchanged 3.0)', 'bench_sections', rf'save_as\({ARGS}enforce_file_format='),
    ('pydicom', '3.0', 'pydicom.encaps.generate_frames (2.4 has generate_pixel_data_frame)', 'core', r'from pydicom\.encaps import generate_frames'),
    ('pydicom', '3.0', 'pydicom.pixels.pixel_array(decoding_plugin=) (no pydicom.pixels in 2.4)', 'core',
     rf'pydicom\.pixels\.pixel_array\({ARGS}decoding_plugin='),
    ('pydicom', '3.0.1', 'highdicom 0.23 (the first that imports on pydicom 3) asks pydicom>=3.0.1', 'inference', r'hd\.seg\.Segmentation\('),
    ('highdicom', '0.23', 'hd.seg.Segmentation on pydicom 3 (0.22 imports pydicom._storage_sopclass_uids, gone in pydicom 3)',
     'inference', r'hd\.seg\.Segmentation\('),
    ('albumentations', '1.4.21', 'Compose(seed=) (release notes 1.4.21)', 'dataset', rf'A\.Compose\({ARGS}seed='),
    ('albumentations', '1.4.21', 'Compose.set_random_seed (release notes 1.4.21)', 'dataset', r'\.set_random_seed\('),
    ('albumentations', '1.4.22', 'Affine(fill=, fill_mask=, border_mode=) (1.4.21 has cval, cval_mask, mode)', 'dataset',
     rf'A\.Affine\({ARGS}fill_mask='),
    ('monai', '1.2', 'FocalLoss(use_softmax=)', 'training', r'FocalLoss\(use_softmax='),
    ('monai', '1.2', 'compute_hausdorff_distance(spacing=)', 'evaluation', rf'compute_hausdorff_distance\({ARGS}spacing='),
    ('monai', '1.3.1', 'import monai on Python 3.12 (1.3.0 calls importlib find_module, which 3.12 removed)', 'training',
     r'from monai\.losses import'),
    ('matplotlib', '3.5', "Figure(layout='constrained') (3.4 has no layout keyword)", 'training', rf"Figure\({ARGS}layout='constrained'"),
    ('matplotlib', '3.5', 'Axes.set_xticks(ticks, labels) (3.4 takes no labels)', 'evaluation', r'set_xticks\(\[0, 1\], \['),
    ('pandas', '1.0', 'DataFrame.to_markdown', 'demo', r'\.to_markdown\('),
    ('tabulate', '0.9', 'tabulate behind DataFrame.to_markdown (pandas 2 and 3 refuse an older one)', 'demo', r'\.to_markdown\('),
    ('nibabel', '5.2', 'nibabel that imports on NumPy 2 (5.1 calls np.sctypes)', 'volumes', r'nib\.load\('),
    ('pylibjpeg-openjpeg', '2.2', "Dataset.compress(JPEG2000Lossless): pydicom's JPEG 2000 encoder asks openjpeg 2.2", 'bench_sections',
     r'ds\.compress\(uid\)'),
    ('jsonargparse', '4.20', 'ArgumentParser(exit_on_error=) (4.19 has error_handler)', 'training', rf'ArgumentParser\({ARGS}exit_on_error='),
    ('jsonargparse', '4.39', "add_class_arguments(L.Trainer): Lightning 2.6's LightningCLI asks 4.39 to parse the Trainer's signature",
     'training', r'add_class_arguments\(L\.Trainer'),
    ('jsonargparse', '4.44', "its error wording that _one_line_error rewrites, \"does not accept option\" (4.43: \"does not accept nested key\")",
     'training', r'does not accept option'),
    ('fastcore', '1.5', 'fastcore.basics.patch', 'download', r'from fastcore\.basics import patch'),
]

# Import names that differ from the distribution's name.
DISTRIBUTION_OF = {'cv2': 'opencv-python-headless', 'yaml': 'pyyaml', 'PIL': 'pillow', 'gdcm': 'python-gdcm', 'jpeg_ls': 'pyjpegls',
                   'SimpleITK': 'simpleitk'}

def settings():
    config = ConfigParser(delimiters=['='])
    config.read(ROOT/'settings.ini', encoding='utf-8')
    return config['DEFAULT']

def requirements(key='requirements') -> dict:
    "The requirements under `key` of settings.ini, by canonical distribution name."
    return {canonicalize_name(r.name): r for r in map(Requirement, shlex.split(settings().get(key, '')))}

def extras() -> dict:
    "Each extra's requirements, as setup.py builds them: every `NAME_requirements` key but the runtime ones."
    cfg = settings()
    return {k[:-len('_requirements')]: requirements(k) for k in cfg
            if k.endswith('_requirements') and k not in ('requirements', 'pip_requirements', 'conda_requirements')}

def floor(req:Requirement) -> Version|None:
    "The lowest version `req` admits by a `>=` or `==` bound, None without one."
    bounds = [Version(s.version) for s in req.specifier if s.operator in ('>=', '==', '~=')]
    return max(bounds) if bounds else None

def caps(req:Requirement) -> list:
    return [str(s) for s in req.specifier if s.operator in ('<', '<=', '==', '===', '~=')]

def source(module:str) -> str: return (LIB/f'{module}.py').read_text(encoding='utf-8')

@pytest.mark.parametrize('dist,version,api,module,pattern', API_FLOORS, ids=[f'{r[0]}-{r[1]}-{r[3]}' for r in API_FLOORS])
def test_floor_covers_the_api(dist, version, api, module, pattern):
    req = requirements().get(canonicalize_name(dist))
    assert req is not None, f"{module}.py calls {api}, but {dist} is not in settings.ini's requirements"
    have = floor(req)
    assert have is not None and have >= Version(version), \
        f"settings.ini asks {req}, but {module}.py calls {api}, which needs {dist}>={version}: raise the floor"

@pytest.mark.parametrize('dist,version,api,module,pattern', API_FLOORS, ids=[f'{r[0]}-{r[1]}-{r[3]}' for r in API_FLOORS])
def test_the_table_names_apis_the_code_calls(dist, version, api, module, pattern):
    "A row whose call is gone from its module is stale: remove it (and maybe lower the floor) or point it where the call moved."
    assert re.search(pattern, source(module)), f"{module}.py no longer calls {api} (/{pattern}/): update API_FLOORS"

def test_no_runtime_requirement_is_capped_without_a_reason():
    "An upper cap holds every user of the library to old releases: it needs a comment in settings.ini that names it and says why."
    comments = [l for l in (ROOT/'settings.ini').read_text(encoding='utf-8').splitlines() if l.lstrip().startswith('#')]
    for name, req in requirements().items():
        if not caps(req): continue
        said = [l for l in comments if re.search(rf'\b{re.escape(req.name)}\b', l, re.I) and re.search(r'\bcap', l, re.I)]
        assert said, f"runtime requirement {req} has an upper bound but no settings.ini comment naming it and its cap"

def test_nbdev_pins_are_for_development_only():
    runtime, dev = requirements(), extras()['dev']
    for name in ('nbdev', 'execnb'): assert name not in runtime and name in dev
    assert not caps(runtime['fastcore']) and caps(dev['fastcore'])

def test_extras_the_code_and_notebooks_treat_as_optional():
    ex, runtime = extras(), requirements()
    assert 'ipywidgets' in ex['widgets'] and 'ipywidgets' not in runtime
    assert re.search(r'try: import ipywidgets', source('masks')), "masks.slice_browser no longer imports ipywidgets optionally"
    assert set(ex['widgets']) <= set(ex['dev']), "notebook 03 builds the slice browser: dev brings the widgets"
    assert set(ex['test']) <= set(ex['dev'])
    assert {'simpleitk', 'sqlalchemy'} <= set(ex['bench'])

def _optional(tree) -> set:
    "Ids of the import statements inside a `try` that catches ImportError: the code runs without them."
    out = set()
    for t in ast.walk(tree):
        if isinstance(t, ast.Try) and any(isinstance(h.type, ast.Name) and h.type.id in ('ImportError', 'ModuleNotFoundError')
                                          for h in t.handlers):
            out |= {id(n) for stmt in t.body for n in ast.walk(stmt)}
    return out

def third_party_imports() -> dict:
    "{import name: [modules]} of every import in the library that is not the standard library, the library, nor optional."
    found = {}
    for path in sorted(LIB.glob('*.py')):
        tree = ast.parse(path.read_text(encoding='utf-8'))
        optional = _optional(tree)
        for node in ast.walk(tree):
            if id(node) in optional: continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for top in {n.split('.')[0] for n in names}:
                if top in sys.stdlib_module_names or top in ('lung_tumor_seg', '__future__'): continue
                found.setdefault(top, []).append(path.stem)
    return found

def test_every_import_is_a_requirement_or_an_extra():
    declared = set(requirements()) | {n for reqs in extras().values() for n in reqs}
    missing = {name: mods for name, mods in third_party_imports().items()
               if canonicalize_name(DISTRIBUTION_OF.get(name, name)) not in declared}
    assert not missing, f"imported but required nowhere in settings.ini: {missing}"
