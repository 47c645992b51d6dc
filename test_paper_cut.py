"""Each model file's paper section, cut at its banner, is a working file on its own (issue #31)."""
import builtins
import importlib.util
import re
import symtable
import sys

import pytest
import torch

import swin_rope
from testkit import _swin_redraw

_BANNER = re.compile(r'^# *End of the paper')


def _import_paper_cut(module, tmp_path, name):
    """The lines of `module` before its banner, written to tmp_path/name.py and imported under a
    unique module name. Returns (the module, its source)."""
    lines = open(module.__file__).read().splitlines(keepends=True)
    end = next(i for i, line in enumerate(lines) if _BANNER.match(line))
    source = ''.join(lines[:end])
    path = tmp_path / f'{name}.py'
    path.write_text(source)
    unique = f'{name}_{abs(hash(str(path)))}'
    spec = importlib.util.spec_from_file_location(unique, path)
    cut = importlib.util.module_from_spec(spec)
    sys.modules[unique] = cut  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(cut)
    finally:
        del sys.modules[unique]
    return cut, source


def _globals_used(source, filename):
    """Global names that the functions and classes of `source` read."""
    used, todo = set(), [symtable.symtable(source, filename, 'exec')]
    while todo:
        table = todo.pop()
        if table.get_type() != 'module':
            used |= {s.get_name() for s in table.get_symbols() if s.is_global() and s.is_referenced()}
        todo += table.get_children()
    return used


# Swin: the model file's settings for a small model (testkit._swin_small_model): built for 64 x 64,
# window 4; 96 x 96 runs window 6, 64 x 128 window 4 on a non-square grid.
_SWIN_TINY = dict(img_size=64, patch_size=4, embed_dim=16, depths=(2, 2, 2), num_heads=(2, 4, 8),
                  window_size=4, num_classes=7, drop_path_rate=0.0)
_SWIN_PAPER_PES = [pe for pe in swin_rope.PE_VARIANTS if pe != 'none']


@pytest.fixture(scope='module')
def swin_cut(tmp_path_factory):
    return _import_paper_cut(swin_rope, tmp_path_factory.mktemp('swin_cut'), 'swin_paper_cut')


def test_swin_paper_section_is_no_longer_than_before_and_reads_nothing_defined_later(swin_cut):
    cut, source = swin_cut
    assert source.count('\n') <= 834
    for name in ('PE_VARIANTS', 'SwinConfig', 'SwinTransformer', 'SIZES', 'PUBLISHED', 'list_models',
                 'create_model'):
        assert hasattr(cut, name), name
    assert cut.SwinTransformer.fused is False  # the readable path
    missing = {n for n in _globals_used(source, cut.__file__) if not hasattr(cut, n) and not hasattr(builtins, n)}
    # only the fast path behind `if fused:`, which the cut never takes
    assert missing == {'fused_window_attention', 'cached_mask'}, missing
    with pytest.raises(TypeError, match='rope_positions'):  # beyond the paper: the full file's
        cut.create_model('swin_tiny', pe='rope_mixed', rope_positions='ntk')


@pytest.mark.parametrize('pe', _SWIN_PAPER_PES)
def test_swin_paper_section_stands_alone(swin_cut, pe):
    """The cut builds the variant with the full file's weights (the same seed draws the same
    ones), loads the full file's state dict strictly, and gives the full file's logits and
    gradients: bit for bit against its readable path, to float rounding against the fused one."""
    cut = swin_cut[0]
    torch.manual_seed(0)
    full = swin_rope.create_model('swin_tiny', pe=pe, **_SWIN_TINY)
    torch.manual_seed(0)
    paper = cut.create_model('swin_tiny', pe=pe, **_SWIN_TINY)
    assert type(paper).__module__ == cut.__name__
    full_sd, paper_sd = full.state_dict(), paper.state_dict()
    assert list(full_sd) == list(paper_sd)
    assert all(torch.equal(full_sd[k], paper_sd[k]) for k in full_sd)  # the same random draws
    _swin_redraw(full)  # weights that make position mistakes show
    paper.load_state_dict(full.state_dict(), strict=True)

    for size in ((64, 64), (96, 96), (64, 128)):  # the training size, a larger window, non-square
        x = torch.randn(2 if size == (64, 64) else 1, 3, *size)
        for model in (full, paper):
            model.eval()
        with torch.no_grad():
            fused = full(x)
            full.fused = False
            readable = full(x)
            del full.fused  # back to the full file's default, the fused path
            cut_logits = paper(x)
        assert torch.equal(cut_logits, readable), size
        torch.testing.assert_close(cut_logits, fused, atol=1e-5, rtol=1e-5)

        if size == (64, 128):
            continue  # gradients at two windows are enough
        grads = []
        for model, fused_path in ((full, True), (full, False), (paper, False)):
            model.train()
            model.fused = fused_path
            model.zero_grad()
            model(x).square().sum().backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            del model.fused
        fused_grads, readable_grads, cut_grads = grads
        assert list(cut_grads) == list(readable_grads)
        for n in cut_grads:
            assert torch.equal(cut_grads[n], readable_grads[n]), (size, n)
            torch.testing.assert_close(cut_grads[n], fused_grads[n], atol=1e-4, rtol=1e-4)
