"""Each model file's paper section is a working file by itself.

A user copies rope_vit.py or swin_rope.py up to its "End of the paper" banner into a file of their
own. The cut must import alone, build every paper variant, load the whole file's weights strictly
and compute what the whole file computes: the same logits and gradients as the whole file's
readable path (bit for bit), and its fused default within float round-off. It reads no name
defined after the banner but the fast path's, behind the `fused` switch that the cut leaves off.
"""
import builtins
import importlib.util
import re
import symtable
import sys

import pytest
import torch

import rope_vit
import swin_rope
from testkit import swin_redraw

_BANNER = re.compile(r'^# *End of the paper')
# The paper sections may not grow: their length in lines before this test was written.
_PAPER_LINES = {'rope_vit.py': 578, 'swin_rope.py': 834}


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


# Per file: the module, its config and model class names, the fast path's names behind `fused`.
_FILES = {'rope_vit.py': (rope_vit, ('ViTConfig', 'RopeViT'), {'rotate_qkv_fused', 'fused_block_ropes'}),
          'swin_rope.py': (swin_rope, ('SwinConfig', 'SwinTransformer'), {'fused_window_attention', 'cached_mask'})}


@pytest.fixture(scope='module')
def paper_cuts(tmp_path_factory):
    """File name -> (the cut imported alone, its source), each cut once for this module."""
    return {name: _import_paper_cut(module, tmp_path_factory.mktemp(name[:-3]), f'{name[:-3]}_paper_cut')
            for name, (module, _, _) in _FILES.items()}


@pytest.mark.parametrize('file_name', list(_FILES))
def test_paper_section_is_no_longer_than_before_and_reads_nothing_defined_later(paper_cuts, file_name):
    cut, source = paper_cuts[file_name]
    _, classes, fast_path_names = _FILES[file_name]
    assert source.count('\n') <= _PAPER_LINES[file_name], f'{file_name}: the paper section grew'
    for name in ('PE_VARIANTS', *classes, 'SIZES', 'PUBLISHED', 'list_models', 'create_model'):
        assert hasattr(cut, name), name
    assert getattr(cut, classes[1]).fused is False  # the readable path
    missing = {n for n in _globals_used(source, cut.__file__) if not hasattr(cut, n) and not hasattr(builtins, n)}
    # only the fast path behind the `fused` switch, which the cut never takes
    assert missing == fast_path_names, missing
    with pytest.raises(TypeError, match='rope_positions'):  # beyond the paper: the full file's
        cut.create_model('vit_tiny' if file_name == 'rope_vit.py' else 'swin_tiny',
                         pe='rope_mixed', rope_positions='ntk')


def _logits_and_grads(model, x):
    model.zero_grad()
    logits = model(x)
    logits.square().sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ViT: 4 x 4 patches of 8 px at 32 x 32; 48 x 80 is a larger, non-square grid.
_VIT_CUT_CONFIG = dict(embed_dim=64, depth=2, num_heads=4, img_size=32, patch_size=8, num_classes=5)


@pytest.mark.parametrize('pe', [pe for pe in rope_vit.PE_VARIANTS if pe != 'none'])
def test_vit_paper_section_stands_alone(paper_cuts, pe):
    cut = paper_cuts['rope_vit.py'][0]
    torch.manual_seed(0)
    full = rope_vit.create_model('vit_tiny', pe=pe, **_VIT_CUT_CONFIG)
    torch.manual_seed(0)
    paper = cut.create_model('vit_tiny', pe=pe, **_VIT_CUT_CONFIG)
    assert type(paper).__module__ == cut.__name__ and not paper.fused  # the paper's class, readable path
    assert list(paper.state_dict()) == list(full.state_dict())
    for key, value in paper.state_dict().items():  # the same seed draws the same weights
        assert torch.equal(value, full.state_dict()[key]), key
    with torch.no_grad():  # then the full file's weights, moved off the seed's, load strictly
        for p in full.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    paper.load_state_dict(full.state_dict(), strict=True)

    readable = rope_vit.create_model('vit_tiny', pe=pe, **_VIT_CUT_CONFIG)
    readable.load_state_dict(full.state_dict())
    readable.fused = False  # the whole file's readable path: one flag on a built model
    for size in [(32, 32), (48, 80)]:  # the training size and a non-square other one
        torch.manual_seed(1)
        x = torch.randn(2, 3, *size)
        for mode in ('eval', 'train'):
            for model in (paper, full, readable):
                model.train(mode == 'train')
            got, got_grads = _logits_and_grads(paper, x)
            want, want_grads = _logits_and_grads(readable, x)
            assert torch.equal(got, want), (size, mode)
            assert got_grads.keys() == want_grads.keys() and len(got_grads) == len(list(paper.parameters()))
            for name, grad in got_grads.items():
                assert torch.equal(grad, want_grads[name]), (size, mode, name)
            fused, fused_grads = _logits_and_grads(full, x)
            torch.testing.assert_close(fused, got, atol=2e-5, rtol=1e-5)
            for name, grad in got_grads.items():
                torch.testing.assert_close(fused_grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)


# Swin: the model file's settings for a small model (testkit.swin_small_model): built for 64 x 64,
# window 4; 96 x 96 runs window 6, 64 x 128 window 4 on a non-square grid.
_SWIN_TINY = dict(img_size=64, patch_size=4, embed_dim=16, depths=(2, 2, 2), num_heads=(2, 4, 8),
                  window_size=4, num_classes=7, drop_path_rate=0.0)
_SWIN_PAPER_PES = [pe for pe in swin_rope.PE_VARIANTS if pe != 'none']


@pytest.mark.parametrize('pe', _SWIN_PAPER_PES)
def test_swin_paper_section_stands_alone(paper_cuts, pe):
    """The cut builds the variant with the full file's weights (the same seed draws the same
    ones), loads the full file's state dict strictly, and gives the full file's logits and
    gradients: bit for bit against its readable path, to float rounding against the fused one."""
    cut = paper_cuts['swin_rope.py'][0]
    torch.manual_seed(0)
    full = swin_rope.create_model('swin_tiny', pe=pe, **_SWIN_TINY)
    torch.manual_seed(0)
    paper = cut.create_model('swin_tiny', pe=pe, **_SWIN_TINY)
    assert type(paper).__module__ == cut.__name__
    full_sd, paper_sd = full.state_dict(), paper.state_dict()
    assert list(full_sd) == list(paper_sd)
    assert all(torch.equal(full_sd[k], paper_sd[k]) for k in full_sd)  # the same random draws
    swin_redraw(full)  # weights that make position mistakes show
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
