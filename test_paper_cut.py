"""Each model file's paper section is a working file by itself.

A user copies rope_vit.py or swin_rope.py up to its "End of the paper" banner into a file of their
own. The cut must import alone, build every paper variant, load the whole file's weights strictly
and compute what the whole file computes: the same logits and gradients as the whole file's
readable path (bit for bit), and its fused default within float round-off.
"""
import importlib.util
import pathlib
import re

import pytest
import torch

import rope_vit

_HERE = pathlib.Path(__file__).resolve().parent
# The paper sections may not grow: their length when this test was written.
_PAPER_LINES = {'rope_vit.py': 578, 'swin_rope.py': 834}


def _paper_cut(file_name: str, tmp_path: pathlib.Path):
    """The lines of file_name before its 'End of the paper' banner, imported as a module of its own."""
    lines = (_HERE / file_name).read_text().splitlines(keepends=True)
    banner = next(i for i, line in enumerate(lines) if re.match(r'# *End of the paper', line))
    assert banner <= _PAPER_LINES[file_name], f'{file_name}: the paper section grew to {banner} lines'
    name = f'paper_cut_{file_name[:-3]}'
    path = tmp_path / f'{name}.py'
    path.write_text(''.join(lines[:banner]))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _logits_and_grads(model, x):
    model.zero_grad()
    logits = model(x)
    logits.square().sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


_VIT_CUT_CONFIG = dict(embed_dim=64, depth=2, num_heads=4, img_size=32, patch_size=8, num_classes=5)


@pytest.mark.parametrize('pe', [pe for pe in rope_vit.PE_VARIANTS if pe != 'none'])
def test_vit_paper_section_stands_alone(pe, tmp_path):
    cut = _paper_cut('rope_vit.py', tmp_path)
    assert not hasattr(cut, 'ROPE_POSITIONS') and not hasattr(cut, 'fused_block_ropes')  # really cut
    torch.manual_seed(0)
    full = rope_vit.create_model('vit_tiny', pe=pe, **_VIT_CUT_CONFIG)
    torch.manual_seed(0)
    paper = cut.create_model('vit_tiny', pe=pe, **_VIT_CUT_CONFIG)
    assert type(paper) is cut.RopeViT and not paper.fused  # the paper's class, readable path
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
