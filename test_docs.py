"""The documentation stays true: README.md's top commands, its examples as written, and every
relative link in README.md and docs/*.md.

Links are checked the way GitHub renders them: a target path is relative to the file that links
to it, and a `#anchor` must be produced by a heading of the target file under GitHub's rule
(the heading's text without markup, lower-cased, every character that is not a letter, digit,
space, hyphen or underscore removed, spaces turned into hyphens, a repeated anchor suffixed
-1, -2, ...). Code blocks and inline code are not markdown, so neither their links nor their
`#` lines count.
"""
import glob
import os
import re

import pytest
import torch

import rope_vit
import swin_rope

from testkit import offline_hub, place_in_hub_cache, published_with_drawn_weights

ROOT = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(ROOT, 'README.md')
DOCS = os.path.join(ROOT, 'docs')
MARKDOWN = [README] + sorted(glob.glob(os.path.join(DOCS, '*.md')))

# The two commands at the very top of the README: each works on a fresh machine.
TOP_COMMANDS = [
    'pip install -r requirements.txt && torchrun --nproc_per_node=2 train.py --pe rope_mixed',
    'pip install -r requirements.txt && python -m pytest -q',
]
FIRST_SCREEN_LINES = 45  # the title, the commands, the plot, the headline table and the usage snippet

_FENCE = re.compile(r'^(```|~~~).*?^\1[ \t]*$', re.M | re.S)
_INLINE_CODE = re.compile(r'(`+)(?!`).*?(?<!`)\1(?!`)', re.S)
# [text](target) or ![alt](target), with an optional "title"; link text may hold one level of [..]
_LINK = re.compile(r'!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+"[^"]*")?\s*\)')
_HEADING = re.compile(r'^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$', re.M)


def _rel(path):
    return os.path.relpath(path, ROOT)


def _without_code(text):
    """Markdown text with fenced blocks blanked (line count kept) and inline code removed."""
    text = _FENCE.sub(lambda m: '\n' * m.group(0).count('\n'), text)
    return _INLINE_CODE.sub(lambda m: '\n' * m.group(0).count('\n'), text)


def github_anchor(heading):
    """The anchor GitHub gives a heading whose source text is `heading`."""
    text = re.sub(r'!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)', r'\1', heading)  # a link: its text
    text = re.sub(r'<[^>]+>', '', text).replace('`', '')  # HTML tags and code marks
    text = re.sub(r'[^\w\- ]', '', text.strip().lower())  # \w: Unicode letters, digits, '_'
    return text.replace(' ', '-')


def anchors(path):
    """Every anchor the headings of markdown file `path` produce, repeats numbered as GitHub does."""
    seen, out = {}, set()
    text = _FENCE.sub(lambda m: '\n' * m.group(0).count('\n'), open(path, encoding='utf-8').read())
    for match in _HEADING.finditer(text):
        base = github_anchor(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f'{base}-{n}')
    return out


def links(path):
    """(line number, target) of every markdown link and image in `path`, code excluded."""
    text = _without_code(open(path, encoding='utf-8').read())
    return [(text.count('\n', 0, m.start()) + 1, m.group(2)) for m in _LINK.finditer(text)]


def broken_links(path):
    """One message per relative link of `path` that points to no file or to no heading."""
    problems = []
    for line, target in links(path):
        where = f'{_rel(path)}:{line}: link ({target})'
        if re.match(r'(https?|mailto):', target, re.I):
            continue
        if not target:
            problems.append(f'{where}: empty target')
            continue
        file_part, _, anchor = target.partition('#')
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(dest):
            problems.append(f'{where}: {_rel(dest)} does not exist')
            continue
        if not anchor:
            continue
        if not dest.endswith('.md') or not os.path.isfile(dest):
            problems.append(f'{where}: #{anchor} on {_rel(dest)}, which is not a markdown file')
        elif anchor not in anchors(dest):
            problems.append(f'{where}: no heading of {_rel(dest)} gives the anchor #{anchor}')
    return problems


@pytest.mark.parametrize('path', MARKDOWN, ids=_rel)
def test_every_relative_link_resolves(path):
    assert os.path.isfile(path)
    problems = broken_links(path)
    assert not problems, 'broken links:\n' + '\n'.join(problems)


def test_link_checker_catches_missing_files_and_anchors(tmp_path):
    page = tmp_path / 'page.md'
    (tmp_path / 'other.md').write_text('# Other page\n\n## The direction task (`--data shapes`)\n\n## Same\n\n## Same\n')
    page.write_text('# Page\n\n'
                    '[ok](other.md#the-direction-task---data-shapes) [ok](other.md#same-1) [ok](#page)\n'
                    '![missing](figure.png) [bad](other.md#nowhere) [bad](#nothing)\n'
                    '[web](https://example.com/x.md) `[in code](gone.md)`\n'
                    '```bash\n# Not a heading\n[in a block](gone.md)\n```\n'
                    '[bad](#not-a-heading)\n')
    problems = broken_links(str(page))
    assert len(problems) == 4, problems
    assert 'page.md:4: link (figure.png): ' in problems[0] and problems[0].endswith('figure.png does not exist')
    assert 'no heading of' in problems[1] and '#nowhere' in problems[1]
    assert '#nothing' in problems[2] and '#not-a-heading' in problems[3]


def test_github_anchor_rules():
    assert github_anchor("Against the paper's Fig. 3") == 'against-the-papers-fig-3'
    assert github_anchor('The direction task (`--data shapes`)') == 'the-direction-task---data-shapes'
    assert github_anchor('Ablation: what would make extrapolation work here?') == \
        'ablation-what-would-make-extrapolation-work-here'
    assert github_anchor('Every variant, ours and timm\'s') == 'every-variant-ours-and-timms'
    assert github_anchor('`rope_positions` in [the model](x.md)') == 'rope_positions-in-the-model'


def test_every_docs_file_is_linked():
    """Each page and figure under docs/ is reachable from the README or another docs page."""
    targets = set()
    for path in MARKDOWN:
        for _, target in links(path):
            file_part = target.partition('#')[0]
            if file_part and not re.match(r'(https?|mailto):', file_part, re.I):
                targets.add(os.path.normpath(os.path.join(os.path.dirname(path), file_part)))
    orphans = [_rel(p) for p in sorted(glob.glob(os.path.join(DOCS, '*'))) if p not in targets]
    assert not orphans, f'not linked from README.md or docs/*.md: {orphans}'


def _readme():
    return open(README, encoding='utf-8').read()


def test_readme_top_is_the_two_commands():
    text = _readme()
    block = re.search(r'^```bash\n(.*?)^```', text, re.M | re.S)
    assert block, 'README.md has no bash block'
    commands = [line.strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == TOP_COMMANDS, f'README.md: the first bash block holds {commands}, not {TOP_COMMANDS}'
    before = [line for line in text[:block.start()].splitlines() if line.strip()]
    assert len(before) == 1 and before[0].startswith('# '), \
        f'README.md: only the title may come before the two commands, found {before}'


def _first_screen_example():
    """The first python block of the README, which must come before `## Use the model in your code`."""
    text = _readme()
    match = re.search(r'^```python\n(.*?)^```', text, re.M | re.S)
    assert match and match.start() < text.index('## Use the model in your code\n'), \
        'README.md: no usage snippet before "## Use the model in your code"'
    return match, text


def test_readme_first_screen_holds_plot_table_and_snippet():
    match, text = _first_screen_example()
    screen = text.split('\n')[:FIRST_SCREEN_LINES]
    snippet_end = text.count('\n', 0, match.end()) + 1
    assert snippet_end <= FIRST_SCREEN_LINES, \
        f'README.md: the usage snippet ends on line {snippet_end}, after the first {FIRST_SCREEN_LINES}'
    assert any('](docs/demo_multires.png)' in line for line in screen), 'README.md: no plot on the first screen'
    assert sum(line.startswith('| ') for line in screen) >= 4, 'README.md: no headline table on the first screen'


def test_readme_first_screen_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """The snippet as written, with the published file already in torch.hub's cache: any download
    attempt fails, so the weights it loads can only be that file."""
    code = _first_screen_example()[0].group(1)
    name = re.search(r"create_model\('([^']+)', pretrained=True\)", code).group(1)
    offline_hub(monkeypatch, tmp_path)
    published = published_with_drawn_weights(rope_vit, name)
    place_in_hub_cache(rope_vit, name, published.state_dict())  # the released {'model': ...} layout
    namespace = {}
    exec(compile(code, 'README.md', 'exec'), namespace)
    assert capsys.readouterr().out.strip() == 'torch.Size([1, 1000])'
    expected = published.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in namespace['model'].state_dict().items())
    assert not namespace['model'].training


def _readme_example(heading='## Use the model in your code'):
    """The first python block under `heading` in README.md."""
    text = _readme()
    section = text.split(heading + '\n', 1)[1]
    return re.search(r'```python\n(.*?)```', section, re.S).group(1)


@pytest.mark.slow
def test_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    code = _readme_example()
    path = re.search(r"load_checkpoint\(model, '([^']+)'\)", code).group(1)
    # A file in the published layout: {'model': sd} with the official Mixed models' 14x14
    # position buffers, which load_checkpoint must drop.
    torch.manual_seed(0)
    published = rope_vit.create_model('rope_mixed_deit_small_patch16_LS').state_dict()
    grid = torch.arange(196, dtype=torch.float32)
    published['freqs_t_x'], published['freqs_t_y'] = grid % 14, torch.div(grid, 14, rounding_mode='floor')
    torch.save({'model': published}, tmp_path / path)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, 'README.md', 'exec'), {})
    printed = capsys.readouterr().out
    assert printed.split() == ['torch.Size([1,', '1000])', '12', 'torch.Size([1,', '6,', '197,', '197])']


@pytest.mark.slow
def test_readme_published_weights_example_runs_offline(tmp_path, monkeypatch, capsys):
    """The example as written, with the two released files already in torch.hub's cache (no
    network) and timm's model.safetensors in the working directory."""
    st = pytest.importorskip('safetensors.torch')
    offline_hub(monkeypatch, tmp_path)
    for module, name in ((rope_vit, 'rope_mixed_deit_small_patch16_LS'),
                         (swin_rope, 'swin_rope_mixed_tiny_patch4_window7_224')):
        model = published_with_drawn_weights(module, name)
        place_in_hub_cache(module, name, model.state_dict())
        if module is rope_vit:  # timm's layout of the same weights
            timm_sd = dict(model.state_dict())
            timm_sd['rope.freqs'] = timm_sd.pop('freqs').unflatten(-1, (6, 32)).contiguous()
            st.save_file(timm_sd, str(tmp_path / 'model.safetensors'))
            vit_sd = model.state_dict()
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(_readme_example('## Use the published weights'), 'README.md', 'exec'), namespace)
    assert capsys.readouterr().out.strip() == rope_vit.pretrained_cache_path('rope_mixed_deit_small_patch16_LS')
    for key in ('vit', 'timm_copy'):
        assert all(torch.equal(v, vit_sd[k]) for k, v in namespace[key].state_dict().items()), key
    assert namespace['head10'].num_classes == 10 and namespace['swin'].pe == 'rope_mixed'


@pytest.mark.slow
def test_readme_dense_backbone_example_runs_as_written(capsys):
    exec(compile(_readme_example('## Backbone for detection and segmentation'), 'README.md', 'exec'), {})
    assert capsys.readouterr().out.strip() == '[(256, 256), (128, 128), (64, 64), (32, 32)]'


@pytest.mark.slow
def test_readme_swin_detector_example_runs_offline(tmp_path, monkeypatch, capsys):
    """The Swin detector example as written, with the released file already in torch.hub's cache
    (no network): the weights it runs are that file's, under the dense window rule."""
    offline_hub(monkeypatch, tmp_path)
    name = 'swin_rope_mixed_tiny_patch4_window7_224'
    published = published_with_drawn_weights(swin_rope, name)
    place_in_hub_cache(swin_rope, name, published.state_dict())
    namespace = {}
    exec(compile(_readme_example('### Swin at any image size inside a torchvision detector'), 'README.md', 'exec'),
         namespace)
    assert capsys.readouterr().out.splitlines() == [
        '[(94, 125), (47, 63), (24, 32), (12, 16)]', "['boxes', 'labels', 'scores'] 4"]
    expected = published.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in namespace['swin'].state_dict().items())
    assert namespace['swin'].window_rule == 'dense' and not namespace['detector'].training


def test_rope_vit_docstring_own_attention_snippet_runs_and_rotates_by_eq14():
    """The module docstring's "RoPE-Mixed in your own attention" lines, run as written."""
    doc = rope_vit.__doc__
    start = doc.index('RoPE-Mixed in your own attention')
    block = doc[doc.index('::\n', start) + 3:doc.index('\n\n', doc.index('::\n', start) + 4)]
    code = '\n'.join(line[4:] for line in block.splitlines())
    assert 'apply_rope(q, cos, sin)' in code and 'init_rope_freqs' in code
    namespace = {}
    torch.manual_seed(0)
    exec(compile(code, 'rope_vit docstring', 'exec'), namespace)
    torch.manual_seed(0)
    q0 = torch.randn(2, 6, 196, 64)  # the snippet's q, drawn again
    freqs, q = namespace['freqs'].detach(), namespace['q']
    # independent formulation: pair j of token n = (row n // 14, column n % 14) times e^{i phi},
    # phi = theta^x_j x + theta^y_j y (Eq. 14), as a complex product in float64
    n = torch.arange(196)
    phi = (n % 14).double()[:, None] * freqs[0].double()[:, None] + (n // 14).double()[:, None] * freqs[1].double()[:, None]
    want = torch.view_as_real(torch.view_as_complex(q0.double().unflatten(-1, (-1, 2))) * torch.polar(
        torch.ones_like(phi), phi)).flatten(-2)
    torch.testing.assert_close(q.double(), want, atol=1e-4, rtol=1e-5)
    assert (q - q0).abs().max() > 0.1  # it did rotate
