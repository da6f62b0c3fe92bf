"""The documentation holds together: the README stays short and keeps the Quick start's two commands (CI runs the
second), every relative link and #anchor in README.md, PRETRAIN.md, FINETUNE.md and docs/ leads somewhere, every
docs/ page opens with a table of contents, no paragraph is written twice, and the docs/ pages that code, help texts
and error messages name exist."""
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted(os.path.join('docs', f) for f in os.listdir(os.path.join(ROOT, 'docs')) if f.endswith('.md'))
PAGES = ['README.md', 'PRETRAIN.md', 'FINETUNE.md'] + DOCS

# The Quick start's two commands, verbatim: the demo job, and the test suite (.ci/run runs the same pytest line).
DEMO_COMMAND = (
    'python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && .venv/bin/python main_pretrain.py '
    '--model mae_vit_tiny_patch4 --input_size 64 --batch_size 8 --epochs 300 --warmup_epochs 20 --blr 1.5e-3 '
    '--norm_pix_loss --data_path demo/data --device cpu --num_workers 0 --output_dir demo_output && '
    '.venv/bin/python demo/visualize.py demo/data/val/color --checkpoint demo_output/checkpoint-last.pth --grid '
    '--mask_ratios 0.5 0.75 0.9 --colors 256 --out demo_output/reconstructions.png')
TEST_COMMAND = ('python3 -m venv .venv && .venv/bin/pip install -r requirements.txt -r requirements-test.txt && '
                '.venv/bin/python -m pytest -q -n auto --dist loadfile tests')

LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)(?:\s+"[^"]*")?\)')  # [text](target) and ![alt](target)
LINK_DEFINITION = re.compile(r'^ {0,3}\[[^\]]+\]:\s*(\S+)', re.M)  # [label]: target
DOCS_MENTION = re.compile(r'\bdocs/[\w.-]+\.md(?:#[\w-]+)?')


def read(path):
    with open(os.path.join(ROOT, path), encoding='utf-8') as f:
        return f.read()


def prose(text):
    """The text outside fenced code blocks, with inline code removed (neither holds links nor headings)."""
    text = re.sub(r'^```.*?^```[^\n]*$', '', text, flags=re.M | re.S)
    return re.sub(r'`[^`\n]*(?:\n[^`\n]*)?`', '', text)


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to '-'."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def anchors(path):
    seen, out = {}, set()
    text = re.sub(r'^```.*?^```[^\n]*$', '', read(path), flags=re.M | re.S)
    for heading in re.findall(r'^#{1,6} +(.+?) *#*$', text, flags=re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f'{base}-{n}')
    return out


def links(path):
    text = read(path)
    code_free = re.sub(r'^```.*?^```[^\n]*$', '', text, flags=re.M | re.S)
    # link text may hold inline code ([`reproduce.py`](docs/studies.md)): take links before removing code spans
    return LINK.findall(code_free) + LINK_DEFINITION.findall(code_free)


def project_files(*endings):
    """The repository's own files ending so (not this test, not data, virtualenvs or run outputs)."""
    skip = {'__pycache__', 'venv', 'data', 'output_dir', 'demo_output', 'reproduce_output'}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.') and d not in skip)
        for f in sorted(files):
            rel = os.path.relpath(os.path.join(folder, f), ROOT)
            if f.endswith(endings) and rel != os.path.join('tests', 'test_docs.py'):
                yield rel


def check_target(source, target):
    """'' when `target`, as written in `source`, leads to an existing file (and heading), else what is wrong."""
    if re.match(r'^[a-z][a-z0-9+.-]*:', target):  # http:, https:, mailto:
        return ''
    file_part, _, anchor = target.partition('#')
    path = os.path.normpath(os.path.join(os.path.dirname(source), file_part)) if file_part else source
    if not os.path.exists(os.path.join(ROOT, path)):
        return f'{source}: {target}: no file {path}'
    if anchor and path.endswith('.md') and anchor not in anchors(path):
        return f'{source}: {target}: no heading #{anchor} in {path}'
    return ''


def test_readme_is_short_and_narrow():
    lines = read('README.md').split('\n')
    assert len(lines) <= 250, f'README.md has {len(lines)} lines; the rest belongs in docs/'
    wide = [i + 1 for i, line in enumerate(lines)
            if len(line) > 120 and line not in (DEMO_COMMAND, TEST_COMMAND)]
    assert not wide, f'README.md lines over 120 columns: {wide}'


def test_quick_start_commands():
    text = read('README.md')
    blocks = re.findall(r'^```[^\n]*\n(.*?)^```', text, flags=re.M | re.S)
    lines = [line for block in blocks for line in block.split('\n')]
    assert DEMO_COMMAND in lines, 'the Quick start demo command changed: README.md and this test go together'
    assert TEST_COMMAND in lines, 'the Quick start test command changed: README.md, .ci/run and this test go together'
    # CI runs "exactly the README's test command" in its own virtualenv
    assert '.ci-venv/bin/python -m pytest -q -n auto --dist loadfile tests' in read('.ci/run')


@pytest.mark.parametrize('page', PAGES)
def test_links_resolve(page):
    found = links(page)
    assert found, f'{page} links nowhere'
    problems = [p for p in (check_target(page, t) for t in found) if p]
    assert not problems, '\n'.join(problems)


def test_slug_follows_github():
    assert slug('Quick start (CPU, a few minutes)') == 'quick-start-cpu-a-few-minutes'
    assert slug('A shared --log_dir') == 'a-shared---log_dir'
    assert slug('Warm starts (`--init_from`)') == 'warm-starts---init_from'
    assert slug('Partial fine-tuning [new]') == 'partial-fine-tuning-new'


def test_broken_links_are_caught(tmp_path, monkeypatch):
    # the checker itself: a missing file and a missing heading are both reported
    (tmp_path / 'docs').mkdir()
    (tmp_path / 'docs' / 'a.md').write_text('# A\n\n## Here\n\n[ok](#here) [bad](#there) [gone](b.md)\n')
    monkeypatch.setattr(sys.modules[__name__], 'ROOT', str(tmp_path))
    problems = [p for p in (check_target('docs/a.md', t) for t in links('docs/a.md')) if p]
    assert problems == ['docs/a.md: #there: no heading #there in docs/a.md', 'docs/a.md: b.md: no file docs/b.md']


@pytest.mark.parametrize('page', DOCS)
def test_docs_page_opens_with_its_contents(page):
    text = re.sub(r'^```.*?^```[^\n]*$', '', read(page), flags=re.M | re.S)
    first_section = re.search(r'^## ', text, flags=re.M)
    assert first_section, f'{page} has no sections'
    contents = set(re.findall(r'\]\(#([\w-]+)\)', text[:first_section.start()]))
    sections = {slug(h) for h in re.findall(r'^## +(.+?) *$', text, flags=re.M)}
    assert sections <= contents, f'{page}: sections missing from its table of contents: {sorted(sections - contents)}'


def test_no_paragraph_written_twice():
    where = {}
    for page in PAGES:
        for paragraph in re.split(r'\n\s*\n', prose(read(page))):
            words = ' '.join(paragraph.split())
            if len(words) >= 150:
                where.setdefault(words, []).append(page)
    repeated = {p[:80]: pages for p, pages in where.items() if len(pages) > 1}
    assert not repeated, f'paragraphs written twice (link to one place instead): {repeated}'


def test_docs_named_in_code_exist():
    # help texts, error messages and comments point readers at docs/ pages: those pages (and headings) exist
    named = [(rel, m) for rel in project_files('.py', '.txt') for m in DOCS_MENTION.findall(read(rel))]
    named += [('.ci/run', m) for m in DOCS_MENTION.findall(read('.ci/run'))]
    assert named, 'no help text names a docs/ page any more: drop this test or the pages'
    problems = [p for p in (check_target('README.md', m) for _, m in named) if p]
    assert not problems, '\n'.join(problems)


def test_no_code_cites_a_readme_section():
    # the README keeps only the Quick start and the commands; what code cites as 'README, "Long runs"' lives in docs/
    cited = [f'{rel}: {m}' for rel in project_files('.py', '.md', '.txt')
             for m in re.findall(r'README(?:, |\'s )"[^"]+"', read(rel))]
    assert not cited, '\n'.join(cited)
