"""Build the documentation site from the notebooks into `_docs/`, with no network.

1. nbdev's processing (as `nbdev_proc_nbs`): frontmatter from each notebook's title, a `show_doc` reference entry for
   every exported function and class, hidden and exported cells removed, names linked to their entries; written to `_proc/`.
   The `show_doc` entries are computed from the installed modules rather than by re-running notebook cells, so building
   the site runs no notebook code. Exported constants get a reference entry too (nbdev documents only functions and classes).
2. Rendering: with Quarto on PATH (`--renderer quarto`, or `auto`), `quarto render` of `_proc/` as `nbdev_docs` does;
   otherwise a small static renderer below writes one HTML page per notebook (and per Markdown page in `nbs/`), a
   sidebar in notebook order and an API index, with every asset local: no CDN, no fonts, no scripts.

The site that .github/workflows/deploy.yaml publishes is the static renderer's (`--renderer static`), the one tests/test_docs.py
builds and checks in Chromium; the Quarto rendering is for local use (nothing checks it).

Usage: python scripts/build_docs.py [--renderer auto|static|quarto] [--out _docs] [--proc _proc]
"""
from __future__ import annotations
import argparse, ast, base64, html, importlib, inspect, json, os, re, shutil, subprocess, sys, time
from pathlib import Path

os.environ.setdefault('MPLBACKEND', 'Agg')

ROOT = Path(__file__).resolve().parents[1]
COPY_SKIP = {'.ipynb_checkpoints', '__pycache__', '_proc', '_docs', '.quarto'}


# --- 1. nbdev processing -------------------------------------------------------------------------------------------

def _module_namespace(nb, lib_name:str) -> tuple[dict, str|None]:
    "Names of the module a notebook exports to (empty for a notebook that exports nothing), and the module's name."
    from nbdev.processors import _default_exp
    exp = _default_exp(nb)
    if not exp: return {}, None
    name = f"{lib_name}.{exp}"
    return dict(vars(importlib.import_module(name))), name


def _docs_processors():
    "nbdev's `FilterDefaults` with `exec_show_docs` replaced by `show_doc` from the installed module, plus constant entries."
    from execnb.shell import CaptureShell
    from nbdev.config import get_config
    from nbdev.process import Processor
    from nbdev.processors import FilterDefaults, exec_show_docs, add_show_docs, _want_doc, _is_showdoc
    from execnb.nbio import mk_cell
    lib_name = get_config().lib_name

    class show_docs_from_module(Processor):
        "Run each `show_doc` cell in the namespace of the notebook's module (nothing else of the notebook runs)."
        def begin(self):
            self.ns, self.module = _module_namespace(self.nb, lib_name)
            self.nb.metadata['lungseg_module'] = self.module
            self.k = CaptureShell()
            self.k.run_cell('from nbdev.showdoc import show_doc')
            self.k.user_ns.update(self.ns)
        def __call__(self, cell):
            if cell.cell_type != 'code' or not _is_showdoc(cell): return
            self.k.cell(cell)
            if self.k.exc: raise RuntimeError(f"{self.nb.metadata.get('lungseg_path', 'notebook')}: show_doc cell failed:\n{cell.source}") from (self.k.exc[1] if isinstance(self.k.exc, tuple) else self.k.exc)
            # nbdev 2.4 looks the line up under the qualified name and finds none (`...py#LNone`): use the object's own line.
            m = re.search(r'show_doc\(\s*([\w.]+)', cell.source)
            try: line = inspect.getsourcelines(inspect.unwrap(eval(m.group(1), self.ns)))[1] if m else None
            except Exception: line = None
            for o in cell.get('outputs', []):
                md = o.get('data', {}).get('text/markdown')
                if md is None: continue
                fix = lambda s: s.replace('#LNone', f'#L{line}' if line else '')
                o['data']['text/markdown'] = fix(md) if isinstance(md, str) else [fix(s) for s in md]

    class add_constant_docs(Processor):
        "A reference entry (name, its line of source and comment) for each exported constant listed in the module's `__all__`."
        def begin(self):
            ns, module = _module_namespace(self.nb, lib_name)
            exported = set(ns.get('__all__', []))
            for cell in reversed([c for c in self.nb.cells if _want_doc(c)]):
                try: tree = ast.parse(cell.source)
                except SyntaxError: continue
                lines = cell.source.splitlines()
                entries = []
                for node in tree.body:
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
                    for t in targets:
                        if isinstance(t, ast.Name) and t.id in exported and not t.id.startswith('_'):
                            src = lines[node.lineno - 1:node.end_lineno]
                            if len(src) > 12: src = src[:11] + ['    ...']
                            entries.append(f"---\n\n### {t.id}\n\n```python\n" + '\n'.join(src) + "\n```\n\n*Constant of `" + module + "`.*")
                for md in reversed(entries): self.nb.cells.insert(cell.idx_ + 1, mk_cell(md, 'markdown'))

    class DocsFilter(FilterDefaults):
        def base_procs(self):
            procs = []
            for p in super().base_procs():
                if p is exec_show_docs: procs.append(show_docs_from_module)
                else: procs.append(p)
                if p is add_show_docs: procs.append(add_constant_docs)
            return procs
    return DocsFilter()


def _wants_execution(nb) -> bool:
    "A notebook whose raw frontmatter says `docs-execute: true` is run before rendering, so its page shows current outputs."
    first = nb.cells[0] if nb.cells else None
    if first is None or first.cell_type != 'raw': first = next((c for c in nb.cells[:3] if c.cell_type == 'raw'), None)
    return bool(first) and bool(re.search(r'^docs-execute:\s*true\s*$', first.source, re.M))


def _execute(nb, nb_path:Path):
    "Run every code cell of `nb` (outputs replaced), stopping with the notebook's name at the first error."
    from execnb.shell import CaptureShell
    shell = CaptureShell(path=nb_path.parent)
    shell.run_all(nb, exc_stop=True)
    for cell in nb.cells:  # no execution counters or run metadata in the site
        if cell.cell_type == 'code': cell.execution_count = None


def process_notebooks(proc_dir:Path, quiet=False) -> list[Path]:
    "nbdev-process every notebook of the project into `proc_dir` (emptied first); other files of `nbs/` are copied as they are."
    from nbdev.config import get_config
    from nbdev.doclinks import nbglob
    from execnb.nbio import read_nb, write_nb
    cfg = get_config()
    nbs = Path(cfg.nbs_path)
    if proc_dir.exists(): shutil.rmtree(proc_dir)
    proc_dir.mkdir(parents=True)
    for f in sorted(nbs.rglob('*')):
        rel = f.relative_to(nbs)
        if f.is_dir() or f.suffix == '.ipynb' or any(p in COPY_SKIP or p.startswith('.') for p in rel.parts): continue
        (proc_dir/rel).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(f, proc_dir/rel)
    filt = _docs_processors()
    out, cwd = [], os.getcwd()
    os.environ['IN_TEST'] = '1'
    try:
        for nb_path in sorted(nbglob(nbs, func=Path)):
            t0 = time.time()
            nb = read_nb(nb_path)
            nb.metadata['lungseg_path'] = str(nb_path.relative_to(nbs))
            os.chdir(nb_path.parent)  # show_doc and relative paths resolve as they do when the notebook runs
            try:
                if _wants_execution(nb): _execute(nb, nb_path)
                filt(nb)
            finally: os.chdir(cwd)
            dest = proc_dir/nb_path.relative_to(nbs)
            dest.parent.mkdir(parents=True, exist_ok=True)
            write_nb(nb, dest)
            out.append(dest)
            if not quiet: print(f"docs: processed {nb_path.relative_to(nbs)} ({time.time() - t0:.1f} s)", flush=True)
    finally: del os.environ['IN_TEST']
    return out


# --- 2a. Quarto ----------------------------------------------------------------------------------------------------

def render_quarto(proc_dir:Path, out_dir:Path):
    "Render `proc_dir` with Quarto as `nbdev_docs` does (nbdev's `nbdev.yml`, a sidebar in notebook order), then move the site to `out_dir`."
    from nbdev.quarto import refresh_quarto_yml
    from nbdev.config import get_config
    import yaml
    cfg = get_config()
    nbs = Path(cfg.nbs_path)
    refresh_quarto_yml()
    shutil.move(str(nbs/'nbdev.yml'), str(proc_dir/'nbdev.yml'))
    pages = sorted(p.relative_to(proc_dir).as_posix() for p in proc_dir.rglob('*')
                   if p.suffix == '.ipynb' or p.suffix == '.md' and _is_page(p.read_text()))
    pages.sort(key=lambda s: (s != 'index.ipynb', _group(s) == 'More', s))
    (proc_dir/'sidebar.yml').write_text(yaml.safe_dump({'website': {'sidebar': {'contents': pages}}}, sort_keys=False))
    subprocess.run(['quarto', 'render', '--no-cache'], cwd=proc_dir, check=True)
    built = proc_dir/Path(cfg.doc_path).name
    shutil.rmtree(out_dir, ignore_errors=True); shutil.move(str(built), str(out_dir))


# --- 2b. Static renderer -------------------------------------------------------------------------------------------

def slug(text:str) -> str:
    "Pandoc's (and so Quarto's) identifier for a heading: lower case, spaces to dashes, only letters, digits, `_-.` kept."
    s = re.sub(r'<[^>]+>', '', html.unescape(text)).strip().lower()
    s = re.sub(r'[^\w\s.-]', '', s)
    s = re.sub(r'\s+', '-', s)
    s = re.sub(r'^[^a-z]+', '', s)
    return s or 'section'


def _frontmatter_of(text:str) -> tuple[dict, str]:
    "YAML frontmatter between `---` lines at the top of `text`, and the rest."
    import yaml
    m = re.match(r'\s*---\s*\n(.*?)\n---\s*\n?', text, re.S)
    if not m: return {}, text
    return (yaml.safe_load(m.group(1)) or {}), text[m.end():]


_DIRECTIVE = re.compile(r'^\s*#\|\s*([\w-]+)\s*:\s*(.*?)\s*$')

def _split_directives(src:str) -> tuple[dict, str]:
    "Quarto cell options (`#| echo: false`) at the top of a code cell, and the code without them."
    opts, lines = {}, src.splitlines()
    while lines and (m := _DIRECTIVE.match(lines[0])):
        opts[m.group(1)] = m.group(2).strip('"\''); lines.pop(0)
    return opts, '\n'.join(lines)


class Renderer:
    "Markdown, code and outputs of processed notebooks to HTML, with local figures and local links."
    def __init__(self, out_dir:Path, site_url:str, page_of:dict):
        from markdown_it import MarkdownIt
        from pygments.formatters import HtmlFormatter
        self.md = MarkdownIt('commonmark', {'html': True}).enable(['table', 'strikethrough'])
        self.fmt = HtmlFormatter(nowrap=True)
        self.out_dir, self.site_url, self.page_of = out_dir, site_url.rstrip('/') + '/', page_of

    def highlight(self, code:str, lang:str='python') -> str:
        from pygments import highlight
        from pygments.lexers import get_lexer_by_name, TextLexer
        try: lexer = get_lexer_by_name(lang or 'text')
        except Exception: lexer = TextLexer()
        return f'<pre class="highlight"><code>{highlight(code, lexer, self.fmt)}</code></pre>'

    def markdown(self, text:str) -> str:
        "Markdown (with nbdev's and Quarto's extras: `{...}` link attributes, `:::` divs, `$math$`) to HTML."
        text = re.sub(r'\)\{[^}\n]*\}', ')', text)                       # [source](url){target="_blank" ...}
        out = []
        for line in text.split('\n'):
            m = re.match(r'^\s*:::+\s*(\{[^}]*\}|[\w.-]+)?\s*$', line)
            if m and m.group(1):
                classes = re.findall(r'[.]([\w-]+)', m.group(1)) or [m.group(1).strip('{}')]
                out += ['', '<div class="' + ' '.join(classes) + '">', '']
            elif m: out += ['', '</div>', '']
            else: out.append(line)
        text = '\n'.join(out)
        text = re.sub(r'(?<![\\$\w])\$([^$\n]+?)\$(?!\w)', lambda m: f'<span class="math">{html.escape(m.group(1))}</span>', text)
        env = {}
        tokens = self.md.parse(text, env)
        for tok in tokens:
            if tok.type == 'fence':  # nbdev links names even inside signatures: back to plain `name` there
                code = re.sub(r'\[(`[^`\]]+`)\]\([^)\s]+\)', r'\1', tok.content.rstrip('\n'))
                tok.type = 'html_block'; tok.content = self.highlight(code, tok.info.strip() or 'text') + '\n'
        return self.md.renderer.render(tokens, self.md.options, env)

    def figure(self, data:str, ext:str, stem:str, n:int) -> str:
        (self.out_dir/'figures').mkdir(parents=True, exist_ok=True)
        name = f'figures/{stem}-{n}.{ext}'
        if ext == 'svg': (self.out_dir/name).write_text(data if isinstance(data, str) else ''.join(data))
        else: (self.out_dir/name).write_bytes(base64.b64decode(data if isinstance(data, str) else ''.join(data)))
        return f'<img src="{name}" alt="figure {n} of this page">'

    def output(self, o, stem:str, counter:list, asis:bool) -> str:
        kind = o.get('output_type')
        if kind == 'stream':
            return f'<pre class="output stream-{o.get("name", "stdout")}">{html.escape("".join(o.get("text", "")))}</pre>'
        if kind == 'error':
            return f'<pre class="output error">{html.escape(o.get("ename", ""))}: {html.escape(o.get("evalue", ""))}</pre>'
        data = o.get('data', {})
        join = lambda v: v if isinstance(v, str) else ''.join(v)
        if 'application/vnd.jupyter.widget-view+json' in data: return ''  # live widgets need a kernel: nothing to show here
        for mime, ext in (('image/png', 'png'), ('image/jpeg', 'jpg'), ('image/svg+xml', 'svg')):
            if mime in data:
                counter[0] += 1
                return f'<div class="output figure">{self.figure(data[mime], ext, stem, counter[0])}</div>'
        if 'text/markdown' in data:
            cls = 'output markdown' + (' asis' if asis else '')
            return f'<div class="{cls}">{self.markdown(join(data["text/markdown"]))}</div>'
        if 'text/html' in data:
            return f'<div class="output html">{join(data["text/html"])}</div>'
        if 'text/plain' in data:
            return f'<pre class="output">{html.escape(join(data["text/plain"]))}</pre>'
        return ''

    def notebook(self, nb:dict, stem:str) -> tuple[dict, str]:
        "Frontmatter and HTML body of a processed notebook."
        fm, parts, counter = {}, [], [0]
        for i, cell in enumerate(nb['cells']):
            src = ''.join(cell.get('source', ''))
            if cell['cell_type'] == 'raw':
                if i == 0 and not fm: fm = _frontmatter_of(src)[0]
                continue
            if cell['cell_type'] == 'markdown':
                if src.strip(): parts.append(self.markdown(src))
                continue
            opts, code = _split_directives(src)
            if opts.get('include') == 'false': continue
            asis = opts.get('output') == 'asis'
            html_cell = []
            if opts.get('echo') != 'false' and code.strip():
                if opts.get('code-fold') in ('true', 'show'):
                    open_attr = ' open' if opts['code-fold'] == 'show' else ''
                    html_cell.append(f'<details{open_attr}><summary>{html.escape(opts.get("code-summary", "Code"))}</summary>{self.highlight(code)}</details>')
                else: html_cell.append(self.highlight(code))
            if opts.get('output') != 'false':
                html_cell += [self.output(o, stem, counter, asis) for o in cell.get('outputs', [])]
            html_cell = [h for h in html_cell if h]
            if html_cell: parts.append('<div class="cell' + (' doc' if asis else '') + '">' + '\n'.join(html_cell) + '</div>')
        return fm, '\n'.join(parts)

    def localize(self, body:str) -> str:
        "Links to the published site, to notebooks and to Markdown pages become links between the local pages."
        def fix(m):
            attr, url = m.group(1), html.unescape(m.group(2))
            if url.startswith(self.site_url): url = url[len(self.site_url):] or 'index.html'
            if not re.match(r'^[a-z]+:|^#|^/', url):
                path, _, frag = url.partition('#')
                name = Path(path).name
                if name in self.page_of: path = str(Path(path).parent/self.page_of[name]).removeprefix('./')
                url = path + ('#' + frag if frag else '')
            return f'{attr}="{html.escape(url, quote=True)}"'
        return re.sub(r'\b(href)="([^"]*)"', fix, body)


def add_heading_ids(body:str) -> tuple[str, list]:
    "Give every heading a unique Pandoc-style id; returns the body and the (level, id, text) of each heading."
    seen, heads = {}, []
    def fix(m):
        level, attrs, inner = m.group(1), m.group(2), m.group(3)
        if 'id=' in attrs: return m.group(0)
        base = slug(inner); n = seen.get(base, 0); seen[base] = n + 1
        hid = base if n == 0 else f'{base}-{n}'
        heads.append((int(level), hid, re.sub(r'<[^>]+>', '', inner)))
        return f'<h{level}{attrs} id="{hid}"><a class="anchor" href="#{hid}">{inner}</a></h{level}>'
    return re.sub(r'<h([1-6])([^>]*)>(.*?)</h\1>', fix, body, flags=re.S), heads


SITE_CSS = """
:root { --side: 17rem; --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --accent: #2780e3; --code: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; font: 16px/1.55 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: var(--fg); }
a { color: var(--accent); text-decoration: none; } a:hover { text-decoration: underline; }
nav.sidebar { position: fixed; top: 0; bottom: 0; left: 0; width: var(--side); overflow-y: auto; padding: 1rem 0.8rem; border-right: 1px solid var(--line); background: #fafbfc; font-size: 0.9rem; }
nav.sidebar .site { display: block; font-weight: 700; font-size: 1.1rem; margin-bottom: 0.8rem; color: var(--fg); }
nav.sidebar ul { list-style: none; margin: 0; padding: 0; }
nav.sidebar li a { display: block; padding: 0.15rem 0.4rem; border-radius: 4px; color: var(--fg); }
nav.sidebar li a.current { background: #e7f0fb; color: var(--accent); font-weight: 600; }
nav.sidebar .group { margin: 0.9rem 0 0.3rem 0.4rem; color: var(--muted); font-size: 0.75rem; text-transform: uppercase; letter-spacing: 0.05em; }
main { margin-left: var(--side); padding: 1.5rem 2.5rem 4rem; max-width: calc(var(--side) + 62rem); }
main > h1.title { margin-bottom: 0.2rem; } p.description { font-size: 1.2rem; color: var(--muted); font-style: italic; margin-top: 0; }
h1 a.anchor, h2 a.anchor, h3 a.anchor, h4 a.anchor { color: inherit; }
pre { background: var(--code); padding: 0.6rem 0.8rem; overflow-x: auto; border-radius: 4px; font-size: 0.85rem; line-height: 1.4; }
code { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 0.9em; }
.cell { margin: 0.8rem 0 1.2rem; } .cell > pre.highlight { margin-bottom: 0.3rem; }
pre.output { background: none; border-left: 2px solid lightsalmon; margin-left: 0.8rem; }
pre.error { border-left-color: #d62728; }
.output.figure img { max-width: 100%; height: auto; }
main img { max-width: 100%; height: auto; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.85rem; display: block; overflow-x: auto; }
th, td { border: 1px solid var(--line); padding: 0.25rem 0.5rem; vertical-align: top; } th { background: var(--code); }
.cell.doc { border-top: 1px solid var(--line); padding-top: 0.2rem; } .cell.doc hr { display: none; }
.cell.doc h3, .cell.doc h4 { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 1.05rem; }
.cell.doc p > a[href*="github.com"]:first-child { float: right; font-size: 0.8rem; }
span.math { font-family: "DejaVu Serif", Georgia, serif; font-style: italic; }
details > summary { cursor: pointer; color: var(--muted); font-size: 0.9rem; }
footer { margin-top: 3rem; padding-top: 0.8rem; border-top: 1px solid var(--line); color: var(--muted); font-size: 0.8rem; }
.api-module { margin-bottom: 1.2rem; } .api-module ul { columns: 2; }
@media (max-width: 60rem) { nav.sidebar { position: static; width: auto; border-right: 0; } main { margin-left: 0; padding: 1rem; } }
"""

FAVICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" fill="#2780e3"/>'
           '<circle cx="8" cy="8" r="4" fill="none" stroke="#fff" stroke-width="1.6"/></svg>')

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} – {site}</title>
<link rel="stylesheet" href="site.css">
<link rel="icon" href="favicon.svg" type="image/svg+xml">
</head>
<body>
<nav class="sidebar">{nav}</nav>
<main data-module="{module}" data-source="{source}">
<h1 class="title">{title}</h1>
{description}
{body}
<footer>{site} {version} · generated from <code>nbs/{source}</code> by <code>scripts/build_docs.py</code></footer>
</main>
</body>
</html>
"""


def _is_page(text:str) -> bool:
    "A Markdown file in `nbs/` is a page when it has a title (frontmatter or a first `# ` heading); others are data files."
    fm, rest = _frontmatter_of(text)
    return bool(fm.get('title')) or bool(re.match(r'\s*#\s+\S', rest))


def _group(source:str) -> str:
    if source == 'index.ipynb': return ''
    return 'Notebooks' if re.match(r'^\d', source) else 'More'


def render_static(proc_dir:Path, out_dir:Path, quiet=False) -> list[dict]:
    "Write the static site into `out_dir` (emptied first) from the processed notebooks and Markdown pages in `proc_dir`."
    from nbdev.config import get_config
    from pygments.formatters import HtmlFormatter
    cfg = get_config()
    site_url = f"{cfg.doc_host.rstrip('/')}{cfg.doc_baseurl.rstrip('/')}/"
    if out_dir.exists(): shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    sources = sorted(p for p in proc_dir.rglob('*') if not p.name.startswith(('_', '.')) and
                     (p.suffix == '.ipynb' or p.suffix == '.md' and _is_page(p.read_text())))
    pages = []
    for p in sources:
        rel = p.relative_to(proc_dir)
        if p.suffix == '.ipynb':
            nb = json.loads(p.read_text())
            fm = _frontmatter_of(''.join(nb['cells'][0]['source']))[0] if nb['cells'] and nb['cells'][0]['cell_type'] == 'raw' else {}
        else: nb, fm = None, _frontmatter_of(p.read_text())[0]
        stem = re.sub(r'^\d+[a-z]?_', '', p.stem) if p.suffix == '.ipynb' else p.stem
        out_name = str(rel.parent/Path(fm.get('output-file') or f'{stem}.html')).removeprefix('./')
        pages.append(dict(path=p, source=str(rel), out=out_name, nb=nb, fm=fm, module=(nb or {}).get('metadata', {}).get('lungseg_module')))
    pages.sort(key=lambda d: (d['source'] != 'index.ipynb', _group(d['source']) == 'More', d['source']))
    page_of = {Path(d['source']).name: d['out'] for d in pages}
    page_of.update({Path(d['source']).with_suffix('.md').name: d['out'] for d in pages if d['source'].endswith('.md')})
    r = Renderer(out_dir, site_url, page_of)
    bodies = {}
    for d in pages:
        if d['nb'] is not None: fm, body = r.notebook(d['nb'], Path(d['out']).stem)
        else:
            fm, text = _frontmatter_of(d['path'].read_text())
            if not fm.get('title') and (m := re.match(r'\s*#\s+(.+)\n', text)): fm['title'], text = m.group(1).strip(), text[m.end():]
            if not fm.get('description') and (m := re.match(r'\s*>\s*(.+)\n', text)): fm['description'], text = m.group(1).strip(), text[m.end():]
            body = r.markdown(text)
        d['fm'] = {**d['fm'], **fm}
        d['title'] = d['fm'].get('title') or Path(d['out']).stem
        body, d['headings'] = add_heading_ids(r.localize(body))
        bodies[d['out']] = body
    # The API index: every name each module exports (`__all__`), linked to its entry on the module's page.
    api = _api_index(pages)
    pages.append(dict(source='(generated)', out='api.html', title='API reference', module='', headings=[],
                      fm=dict(description='Every function, class and constant the library exports, by module, linked to its reference entry.')))
    bodies['api.html'], pages[-1]['headings'] = add_heading_ids(api)
    ids = {d['out']: {hid for _, hid, _ in d['headings']} | set(re.findall(r'\bid="([^"]+)"', bodies[d['out']])) for d in pages}
    for d in pages: bodies[d['out']] = _fix_fragments(bodies[d['out']], d['out'], ids)
    for d in pages:
        nav = _nav(pages, d['out'], cfg.title)
        desc = d['fm'].get('description')
        text = PAGE.format(title=html.escape(d['title']), site=html.escape(cfg.title), version=html.escape(cfg.version), nav=nav,
                           module=d.get('module') or '', source=html.escape(d['source']),
                           description=f'<p class="description">{html.escape(desc)}</p>' if desc else '', body=bodies[d['out']])
        (out_dir/d['out']).parent.mkdir(parents=True, exist_ok=True)
        (out_dir/d['out']).write_text(text)
    (out_dir/'site.css').write_text(SITE_CSS + HtmlFormatter(style='default').get_style_defs('pre.highlight'))
    for f in proc_dir.rglob('*'):  # images and other files the pages may link to
        rel = f.relative_to(proc_dir)
        if f.is_file() and f.suffix.lower() in ('.png', '.jpg', '.jpeg', '.svg', '.gif', '.json', '.csv', '.yaml', '.css') \
                and not rel.parts[0].startswith(('_', '.')):
            (out_dir/rel).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(f, out_dir/rel)
    (out_dir/'.nojekyll').write_text('')
    (out_dir/'favicon.svg').write_text(FAVICON)
    if not quiet: print(f"docs: {len(pages)} pages written to {out_dir}")
    return pages


def _fix_fragments(body:str, page:str, ids:dict) -> str:
    "A link to an entry the target page lacks (a method or property without its own entry, a private helper) goes to its class's entry, else to the page."
    def fix(m):
        path, frag = m.group(1), m.group(2)
        target = path or page
        if target not in ids or frag in ids[target]: return m.group(0)
        parent = frag.split('.')[0]
        return f'href="{path}#{parent}"' if parent in ids[target] else f'href="{path or page}"'
    return re.sub(r'href="([^":#"]*\.html|)#([^"]+)"', fix, body)


def _nav(pages:list, current:str, site:str) -> str:
    items, group = [f'<a class="site" href="index.html">{html.escape(site)}</a>', '<ul>'], None
    for d in pages:
        g = 'Reference' if d['out'] == 'api.html' else _group(d['source'])
        if g != group and g:
            items.append(f'</ul><div class="group">{g}</div><ul>'); group = g
        label = d['title'] if d['source'] != 'index.ipynb' else 'Home'
        num = re.match(r'^(\d+[a-z]?)_', d['source'])
        if num: label = f'{num.group(1)} · {label}'
        cls = ' class="current"' if d['out'] == current else ''
        items.append(f'<li><a{cls} href="{html.escape(d["out"])}">{html.escape(label)}</a></li>')
    return '\n'.join(items + ['</ul>'])


def _api_index(pages:list) -> str:
    "HTML listing each module's exported names with a link to the entry; a name without an entry stops the build."
    parts, missing = ['<p>Each module is documented on the page of the notebook it is exported from.</p>'], []
    for d in pages:
        if not d.get('module'): continue
        mod = importlib.import_module(d['module'])
        ids = {hid for _, hid, _ in d['headings']}
        links = []
        for name in sorted(getattr(mod, '__all__', []), key=str.lower):
            hid = slug(name)
            if hid not in ids: missing.append(f"{d['module']}.{name} ({d['source']})"); continue
            links.append(f'<li><a href="{d["out"]}#{hid}"><code>{html.escape(name)}</code></a></li>')
        parts.append(f'<div class="api-module"><h2><code>{d["module"]}</code></h2><p>From <a href="{d["out"]}">{html.escape(d["title"])}</a>'
                     f' (<code>nbs/{html.escape(d["source"])}</code>)</p><ul>{"".join(links)}</ul></div>')
    if missing: raise SystemExit("docs: exported names without a reference entry:\n  " + '\n  '.join(missing))
    return '\n'.join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog='build_docs.py', description=__doc__.split('\n\n')[0])
    ap.add_argument('--renderer', choices=('auto', 'static', 'quarto'), default='auto', help="auto: Quarto when it is on PATH, else static")
    ap.add_argument('--out', type=Path, default=None, help="site folder (default: doc_path of settings.ini, _docs)")
    ap.add_argument('--proc', type=Path, default=None, help="folder for the processed notebooks (default: _proc)")
    ap.add_argument('--quiet', action='store_true')
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    from nbdev.config import get_config
    cfg = get_config()
    out = (args.out or Path(cfg.doc_path)).resolve()
    proc = (args.proc or cfg.config_path/'_proc').resolve()
    renderer = args.renderer
    if renderer == 'auto': renderer = 'quarto' if shutil.which('quarto') else 'static'
    t0 = time.time()
    process_notebooks(proc, quiet=args.quiet)
    if renderer == 'quarto': render_quarto(proc, out)
    else: render_static(proc, out, quiet=args.quiet)
    print(f"docs: site in {os.path.relpath(out)} ({renderer} renderer, {time.time() - t0:.0f} s); open {os.path.relpath(out)}/index.html")
    return 0


if __name__ == '__main__':
    sys.exit(main())
