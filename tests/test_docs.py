"""The documentation site: built from the notebooks (`scripts/build_docs.py`, as `make docs`), complete, and sound in a real browser.

The site is built once into a temporary folder (the checkout's `_docs/` is left alone), served on 127.0.0.1, and every page
is loaded in headless Chromium (Debian's `chromium` and `chromium-driver`, driven by selenium): broken internal links,
missing images and JavaScript errors fail. A screenshot of the home page is saved to `outputs/docs-home.png`.
"""
import functools, html.parser, importlib, json, os, pkgutil, re, shutil, subprocess, sys, threading
from http.server import ThreadingHTTPServer, SimpleHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlsplit, unquote
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((shutil.which(n) for n in ('chromium', 'chromium-browser', 'google-chrome') if shutil.which(n)), None)
CHROMEDRIVER = shutil.which('chromedriver') or shutil.which('chromedriver', path=os.environ.get('CHROMEWEBDRIVER', ''))
SCREENSHOT = ROOT/'outputs'/'docs-home.png'


@pytest.fixture(scope='session')
def site(tmp_path_factory):
    "The site built from the checkout into a temporary folder."
    tmp = tmp_path_factory.mktemp('docs')
    res = subprocess.run([sys.executable, str(ROOT/'scripts'/'build_docs.py'), '--renderer', 'static', '--quiet',
                          '--out', str(tmp/'site'), '--proc', str(tmp/'proc')], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"build_docs.py failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return tmp/'site'


class _Page(html.parser.HTMLParser):
    "The ids, links, image and script sources and `data-module` of one HTML page."
    def __init__(self):
        super().__init__(); self.ids, self.links, self.resources, self.module, self.h1 = set(), [], [], None, []
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if 'id' in a: self.ids.add(a['id'])
        if tag == 'a' and a.get('href'): self.links.append(a['href'])
        if tag in ('img', 'script', 'iframe', 'source') and a.get('src'): self.resources.append(a['src'])
        if tag == 'link' and a.get('href'): self.resources.append(a['href'])
        if tag == 'main' and a.get('data-module') is not None: self.module = a['data-module']


def _parse(path:Path) -> _Page:
    p = _Page(); p.feed(path.read_text(encoding='utf-8')); return p


def _pages(site:Path) -> dict:
    return {p.relative_to(site).as_posix(): _parse(p) for p in sorted(site.rglob('*.html'))}


def _numbered_notebooks():
    return sorted(p for p in (ROOT/'nbs').glob('[0-9]*.ipynb'))


# The pages that must show pictures: each stage's notebook keeps the outputs of its drawing cells, `make figures` redraws them;
# scripts/figures.py lists those notebooks. A figure (an image) on each page, a table output on the pages whose picture is a table.
def _figures_script():
    import importlib.util
    spec = importlib.util.spec_from_file_location('lungseg_figures', ROOT/'scripts'/'figures.py')
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    return module

_drawing = _figures_script()
FIGURE_NOTEBOOKS = tuple(f'{n}.ipynb' for n in _drawing.FIGURE_NOTEBOOKS if n not in _drawing.TABLE_ONLY)
TABLE_NOTEBOOKS = tuple(f'{n}.ipynb' for n in _drawing.TABLE_ONLY)


def _page_of_source(site:Path) -> dict:
    "Notebook name -> its page, from each page's `data-source`."
    out = {}
    for p in sorted(site.rglob('*.html')):
        if m := re.search(r'data-source="([^"]*)"', p.read_text()): out[m.group(1)] = p.relative_to(site).as_posix()
    return out


def test_every_notebook_has_a_page_in_order(site):
    "Home from index.ipynb, then one page per numbered notebook, in the notebooks' order in the sidebar."
    pages = _pages(site)
    assert 'index.html' in pages
    sources = {}
    for name in pages:
        m = re.search(r'data-source="([^"]*)"', (site/name).read_text())
        if m: sources[m.group(1)] = name
    missing = [p.name for p in _numbered_notebooks() if p.name not in sources]
    assert not missing, f"notebooks without a page: {missing}"
    nav = re.search(r'<nav class="sidebar">(.*?)</nav>', (site/'index.html').read_text(), re.S).group(1)
    order = re.findall(r'href="([^"]+)"', nav)
    wanted = [sources[p.name] for p in _numbered_notebooks()]
    positions = [order.index(w) for w in wanted]
    assert positions == sorted(positions), f"sidebar out of notebook order: {order}"
    assert order.index('index.html') < positions[0]


def test_every_exported_name_has_a_reference_entry(site):
    "Each name in each module's `__all__` has an entry (a heading with its id) on the page of the module's notebook."
    import lung_tumor_seg
    by_module = {p.module: (name, p) for name, p in _pages(site).items() if p.module}
    modules = [m.name for m in pkgutil.iter_modules(lung_tumor_seg.__path__, 'lung_tumor_seg.') if not m.name.rsplit('.', 1)[1].startswith('_')]
    assert len(modules) > 10
    missing = []
    for mod_name in modules:
        names = getattr(importlib.import_module(mod_name), '__all__', [])
        if not names: continue
        if mod_name not in by_module: missing.append(f"{mod_name}: no page"); continue
        page_name, page = by_module[mod_name]
        for n in names:
            anchor = re.sub(r'[^\w.-]', '', n.lower()).lstrip('_')
            if anchor not in page.ids: missing.append(f"{mod_name}.{n} (no #{anchor} on {page_name})")
    assert not missing, "exported names without a reference entry:\n" + '\n'.join(missing)


def test_content_pages(site):
    "The benchmark table, the LIDC-IDRI attribution and the full-scale recipes are on the site."
    text = {name: (site/name).read_text() for name in _pages(site)}
    everything = '\n'.join(text.values())
    assert re.search(r'<table>.*masks_speedup_vs_pylidc', text['bench_sections.html'], re.S), "benchmark table missing"
    assert 'Armato' in everything and 'Clark' in everything and 'CC BY 3.0' in everything, "LIDC-IDRI attribution missing"
    assert any('lidc_full' in t and 'task06_full' in t for t in text.values()), "full-scale recipes missing"
    home = _parse(site/'index.html')
    assert any(r.endswith(('.png', '.svg', '.jpg')) for r in home.resources), "the home page has no figure"


def test_offline_static_checks(site):
    "Every page's internal links resolve to an existing page and anchor; no page loads anything from another host."
    pages = _pages(site)
    broken, remote = [], []
    for name, page in pages.items():
        for r in page.resources:
            if re.match(r'^(https?:)?//', r): remote.append(f"{name}: {r}")
            elif not (site/Path(name).parent/unquote(urlsplit(r).path)).exists(): broken.append(f"{name}: resource {r}")
        for href in page.links:
            if re.match(r'^[a-z][a-z0-9+.-]*:', href): continue  # another site, mailto:
            parts = urlsplit(href)
            target = (Path(name).parent/unquote(parts.path)).as_posix() if parts.path else name
            target = os.path.normpath(target)
            if target not in pages: broken.append(f"{name}: {href} (no page {target})"); continue
            if parts.fragment and unquote(parts.fragment) not in pages[target].ids: broken.append(f"{name}: {href} (no anchor)")
    assert not remote, "pages load resources from other hosts (the site must work offline):\n" + '\n'.join(remote[:20])
    assert not broken, "broken internal links or resources:\n" + '\n'.join(broken[:40])


def test_stage_pages_have_figures(site):
    "Each stage's page shows the figures (or the table) its notebook draws: committed outputs, files present in the site."
    pages, missing = _page_of_source(site), []
    for nb in FIGURE_NOTEBOOKS + TABLE_NOTEBOOKS:
        assert (ROOT/'nbs'/nb).exists(), f"{nb}: listed as a page with figures, but there is no such notebook"
        if nb not in pages: missing.append(f"{nb}: no page"); continue
        text = (site/pages[nb]).read_text()
        figures = re.findall(r'<div class="output figure"><img src="([^"]+)"', text)
        if nb in FIGURE_NOTEBOOKS and not figures:
            missing.append(f"{pages[nb]} ({nb}): no figure (run `make figures NOTEBOOKS={Path(nb).stem}` and commit the notebook)")
        for src in figures:
            if not (site/Path(pages[nb]).parent/src).is_file(): missing.append(f"{pages[nb]}: figure {src} not in the site")
        if nb in TABLE_NOTEBOOKS and not re.search(r'<div class="output html">(?:(?!</div>\s*</div>).){0,4000}?<table', text, re.S):
            missing.append(f"{pages[nb]} ({nb}): no table output")
    assert not missing, "stage pages without their pictures:\n" + '\n'.join(missing)


def _browser_missing():
    if not CHROMIUM or not CHROMEDRIVER:
        return "headless Chromium is not installed (Debian: apt-get install chromium chromium-driver; `make test` does it as root)"
    try: import selenium  # noqa: F401
    except ImportError: return "selenium is not installed (pip install -e '.[dev]')"
    return None


@pytest.fixture(scope='module')
def served(site):
    "The site on 127.0.0.1 at a free port, for the time of the module."
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args): pass
    server = ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True); thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown(); server.server_close()


@pytest.fixture(scope='module')
def browser(tmp_path_factory):
    reason = _browser_missing()
    if reason: pytest.skip(reason)
    os.environ.setdefault('SE_AVOID_STATS', 'true')
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-quic', '--no-first-run',
                '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-extensions',
                '--window-size=1280,1000', f'--user-data-dir={tmp_path_factory.mktemp("chromium-profile")}'):
        opts.add_argument(arg)
    opts.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


_IMAGES = """return Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute('src'));"""
_LINKS = """return Array.from(document.querySelectorAll('a[href]')).map(a => a.href);"""
_FAILED = """return performance.getEntriesByType('resource').filter(r => r.responseStatus >= 400).map(r => r.name);"""


def test_pages_in_chromium(site, served, browser):
    "Crawl from the home page: every page reachable, no JavaScript error, no missing image, every internal link and anchor resolves."
    base = served
    todo, seen, problems, anchors = ['index.html'], set(), [], {}
    while todo:
        page = todo.pop(0)
        if page in seen: continue
        seen.add(page)
        browser.get(base + page)
        for entry in browser.get_log('browser'):
            if entry.get('level') == 'SEVERE': problems.append(f"{page}: console error: {entry.get('message')}")
        for src in browser.execute_script(_IMAGES): problems.append(f"{page}: image not loaded: {src}")
        for url in browser.execute_script(_FAILED): problems.append(f"{page}: request failed: {url}")
        anchors[page] = set(browser.execute_script("return Array.from(document.querySelectorAll('[id]')).map(e => e.id);"))
        for url in browser.execute_script(_LINKS):
            if not url.startswith(base): continue
            parts = urlsplit(url)
            target = unquote(parts.path[len(urlsplit(base).path):]) or 'index.html'
            if target.endswith('/'): target += 'index.html'
            if not (site/target).is_file(): problems.append(f"{page}: link to a missing page {url}"); continue
            if target.endswith('.html'):
                todo.append(target)
                if parts.fragment: anchors.setdefault('_wanted', set()).add((page, target, unquote(parts.fragment)))
    for page, target, frag in sorted(anchors.pop('_wanted', set())):
        if frag not in anchors.get(target, set()): problems.append(f"{page}: link to a missing anchor {target}#{frag}")
    all_pages = {p.relative_to(site).as_posix() for p in site.rglob('*.html')}
    unreachable = sorted(all_pages - seen)
    assert not unreachable, f"pages not linked from the site: {unreachable}"
    assert not problems, f"{len(problems)} problems in Chromium:\n" + '\n'.join(problems[:40])


_FIGURES = """return Array.from(document.querySelectorAll('main .output.figure img')).map(
    i => ({src: i.getAttribute('src'), loaded: i.complete && i.naturalWidth > 0, w: i.naturalWidth}));"""


def test_stage_figures_in_chromium(site, served, browser):
    "In the browser, each page listed in FIGURE_NOTEBOOKS shows at least one figure that loaded, and none of its links is broken."
    pages, problems = _page_of_source(site), []
    for nb in FIGURE_NOTEBOOKS:
        page = pages.get(nb)
        if page is None: problems.append(f"{nb}: no page"); continue
        browser.get(served + page)
        figures = browser.execute_script(_FIGURES)
        if not any(f['loaded'] for f in figures): problems.append(f"{page}: no figure loaded ({len(figures)} in the page)")
        problems += [f"{page}: figure not loaded: {f['src']}" for f in figures if not f['loaded']]
        for url in browser.execute_script(_LINKS):
            if not url.startswith(served): continue
            parts = urlsplit(url)
            target = unquote(parts.path[len(urlsplit(served).path):]) or 'index.html'
            if not (site/target).is_file(): problems.append(f"{page}: broken link {url}"); continue
            if parts.fragment and target.endswith('.html') and unquote(parts.fragment) not in _parse(site/target).ids:
                problems.append(f"{page}: link to a missing anchor {target}#{parts.fragment}")
    assert not problems, "stage pages without a working figure:\n" + '\n'.join(problems[:40])


def test_home_screenshot(site, served, browser):
    "The home page shows its figure in the first screen; its screenshot is saved for a person to look at."
    browser.set_window_size(1280, 1000)
    browser.get(served + 'index.html')
    fig = browser.execute_script("""const i = document.querySelector('main img'); if (!i) return null;
        const r = i.getBoundingClientRect();
        return {w: i.naturalWidth, h: i.naturalHeight, top: r.top, bottom: r.bottom, shown_w: r.width, screen_h: window.innerHeight};""")
    assert fig is not None, "no figure on the home page"
    assert fig['w'] > 100 and fig['h'] > 50 and fig['shown_w'] > 300, f"home figure not shown: {fig}"
    assert fig['top'] < fig['screen_h'] / 2, f"the home figure is not in the first screen: {fig}"
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))
    print(f"home page screenshot: {SCREENSHOT}")
    assert SCREENSHOT.stat().st_size > 10_000
