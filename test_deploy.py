"""Deploy: torch.compile, torch.export and ONNX of every PE variant of both model files
(they trace the readable, real-valued formula). All slow.
"""
import warnings

import numpy as np
import pytest
import torch

import rope_vit
import swin_rope

from testkit import swin_redraw, swin_small_model, tiny_vit

# Slow: compile and export trace whole models: tens of seconds each on 2 cores.
pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------------
# ViT: compile with a dynamic size, inductor, export and ONNX
# ---------------------------------------------------------------------------------------

def _recording_backend(complex_nodes):
    """A torch.compile backend: notes every node of the captured graph that makes a complex
    tensor, then runs that graph as it is (dynamo's capture only: no AOT tracing, no code generation)."""
    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            value = node.meta.get('example_value', node.meta.get('val'))
            values = value if isinstance(value, (tuple, list)) else [value]
            complex_nodes.extend(node.format_node() for v in values if isinstance(v, torch.Tensor) and v.is_complex())
        return gm.forward
    return backend


def _compiled_matches_eager(model, compiled, eval_sizes, train_size, tol):
    """Logits at eval_sizes and a training step's gradients of the compiled model equal eager's."""
    model.eval()
    with torch.no_grad():
        for size in eval_sizes:
            x = torch.randn(2, 3, *size)
            torch.testing.assert_close(compiled(x), model(x), atol=tol, rtol=tol)
    model.train()
    x = torch.randn(2, 3, *train_size)
    compiled(x).square().mean().backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, atol=tol, rtol=tol, msg=name)
    model.eval()


@pytest.mark.parametrize('pe', rope_vit.PE_VARIANTS)
def test_vit_compile_fullgraph_dynamic_every_pe(pe):
    """torch.compile(fullgraph=True, dynamic=True) of every PE variant with a recording backend:
    dynamo captures the whole forward (fullgraph raises on any graph break) and the graph runs
    as captured. Inductor would add tens of seconds of code generation per compile on CPU, so it
    runs once, in test_vit_compile_inductor_warns_nothing. Checks: no complex tensor in the
    captured graphs (inductor cannot generate code for them), logits at two sizes and the
    gradients of a training step equal eager."""
    torch._dynamo.reset()
    model = tiny_vit(pe, patch_size=8, img_size=32)
    complex_nodes = []
    compiled = torch.compile(model, backend=_recording_backend(complex_nodes), fullgraph=True, dynamic=True)
    _compiled_matches_eager(model, compiled, [(32, 48), (64, 40)], (48, 32), tol=1e-4)
    assert complex_nodes == []


def _inductor_run(model, eval_sizes, train_size):
    """Compile with inductor (fullgraph, dynamic) and return the warnings raised while it ran."""
    import torch._inductor.lowering as lowering
    torch._dynamo.reset()
    if hasattr(lowering, '_warn_complex_not_supported'):  # it warns once per process
        lowering._warn_complex_not_supported.cache_clear()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        _compiled_matches_eager(model, compiled, eval_sizes, train_size, tol=1e-4)
    return [str(w.message) for w in caught]


def test_vit_compile_inductor_warns_nothing():
    """Inductor, fullgraph, dynamic (main warned 'does not support code generation for complex
    operators'): RoPE-Mixed + APE with one block (each block compiles to the same kernels),
    eval and a training step, equal to eager. The costliest test (about a minute on 2 cores)."""
    messages = _inductor_run(tiny_vit('rope_mixed_ape', patch_size=8, img_size=32, depth=1), [(32, 48)], (48, 32))
    assert not [m for m in messages if 'complex' in m.lower()], messages


@pytest.mark.parametrize('pe', rope_vit.PE_VARIANTS)
def test_vit_export_dynamic_size_and_onnxruntime(pe, tmp_path):
    """torch.export with dynamic height and width (multiples of the patch size), traced at 32x48
    and run at two other sizes; then that one program to ONNX (dynamo exporter) and run with
    onnxruntime on CPU at the same two sizes: max |logit difference| to eager <= 1e-4."""
    model = tiny_vit(pe, patch_size=8, img_size=32)
    height, width = torch.export.Dim('height', min=1, max=64), torch.export.Dim('width', min=1, max=64)
    program = torch.export.export(model, (torch.randn(2, 3, 32, 48),),
                                  dynamic_shapes={'x': {2: 8 * height, 3: 8 * width}})
    inputs = [torch.randn(2, 3, 56, 24), torch.randn(2, 3, 40, 72)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    for x, want in zip(inputs, expected):
        torch.testing.assert_close(program.module()(x), want, atol=1e-5, rtol=1e-5)
    _check_onnxruntime(program, inputs, expected, tmp_path / f'vit_{pe}.onnx')


def _check_onnxruntime(program, inputs, expected, path):
    """Export a torch.export program to ONNX and compare onnxruntime's outputs (max |diff| <= 1e-4)."""
    pytest.importorskip('onnxscript')
    ort = pytest.importorskip('onnxruntime')
    torch.onnx.export(program, dynamo=True).save(str(path))
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for x, want in zip(inputs, expected):
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert np.abs(got - want.numpy()).max() <= 1e-4, (tuple(x.shape), np.abs(got - want.numpy()).max())


# ----------------------------------------------------------------------------------------------
# Swin: compile per size and with a symbolic side, export and ONNX per resolution
# ----------------------------------------------------------------------------------------------
# Swin's window follows the input size (r / 32 for the published models), so a graph with a
# symbolic size carries symbolic window shapes through every partition, shift and mask. Tracing
# that is slow on 2 CPU cores (about 30 s for dynamo's capture, 40-60 s for torch.export, one
# stage), so the per-variant tests trace per size (dynamic=False, one export per resolution),
# and two tests trace one stage (a plain and a shifted block) of the richest variant,
# RoPE-Mixed + RPB, with a symbolic square size. ONNX stays per resolution: its Roll has no
# symbolic shift.

def _swin_one_stage():
    """RoPE-Mixed + RPB, one stage of a plain and a shifted block, built for 64 x 64 with window 4:
    (window, shift) (4, 2) at 64, (6, 3) at 96, (8, 4) at 128."""
    return swin_redraw(swin_small_model('rope_mixed_rpb', depths=(2,), num_heads=(2,)))


@pytest.mark.parametrize('pe', swin_rope.PE_VARIANTS)
def test_swin_compile_fullgraph_every_pe(pe):
    """torch.compile(fullgraph=True, dynamic=False) of every PE variant with the recording backend
    of the ViT tests (dynamo's capture, no code generation): no graph break, no complex tensor in
    the graphs, logits at two sizes and a training step's gradients equal eager."""
    torch._dynamo.reset()
    model = swin_redraw(swin_small_model(pe))
    complex_nodes = []
    compiled = torch.compile(model, backend=_recording_backend(complex_nodes), fullgraph=True, dynamic=False)
    _compiled_matches_eager(model, compiled, [(64, 64), (96, 96)], (64, 64), tol=1e-4)
    assert complex_nodes == []


def test_swin_compile_inductor_warns_nothing():
    """Inductor, fullgraph (static sizes, see above): RoPE-Mixed + RPB, one stage of a plain and a
    shifted block (the others compile to the same kernels), eval and a training step equal to
    eager, and no 'complex operators' warning. About a minute on 2 cores."""
    model = _swin_one_stage()
    torch._dynamo.reset()
    import torch._inductor.lowering as lowering
    if hasattr(lowering, '_warn_complex_not_supported'):  # it warns once per process
        lowering._warn_complex_not_supported.cache_clear()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        _compiled_matches_eager(model, compiled, [(64, 64)], (64, 64), tol=1e-4)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if 'complex' in m.lower()], messages


def test_swin_compile_fullgraph_dynamic_one_graph_for_every_size():
    """torch.compile(fullgraph=True, dynamic=True), recording backend: one captured graph serves
    64, 96 and 128 (windows 4, 6, 8 with their shifts) with logits equal to eager, no complex
    tensor in it, and a training step's gradients equal eager. About 40-80 s on 2 cores."""
    torch._dynamo.reset()
    model = _swin_one_stage()
    complex_nodes, graphs = [], []
    record = _recording_backend(complex_nodes)

    def backend(gm, example_inputs):
        graphs.append(gm)
        return record(gm, example_inputs)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for size in (64, 96, 128):
            x = torch.randn(2, 3, size, size)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert len(graphs) == 1, 'a new size recompiled'
    _compiled_matches_eager(model, compiled, [], (96, 96), tol=1e-4)
    assert complex_nodes == []


def test_swin_export_dynamic_square_size():
    """torch.export with one symbolic side r = 16 k (H = W; the window 4 r / 64 must be an integer),
    traced at 64 and run at 96 and 128: logits equal eager (<= 1e-5). About 40-60 s on 2 cores."""
    model = _swin_one_stage()
    side = torch.export.Dim('side', min=2, max=32)
    program = torch.export.export(model, (torch.randn(2, 3, 64, 64),),
                                  dynamic_shapes={'x': {2: 16 * side, 3: 16 * side}})
    for size in (96, 128):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            want = model(x)
        torch.testing.assert_close(program.module()(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('pe', swin_rope.PE_VARIANTS)
def test_swin_export_and_onnxruntime_per_resolution(pe, tmp_path):
    """torch.export at 64 and at 96 (windows 4 and 6, the run-time rule), each program to ONNX
    (dynamo exporter) and run with onnxruntime on CPU: max |logit difference| to eager <= 1e-4."""
    model = swin_redraw(swin_small_model(pe, depths=(2, 2), num_heads=(2, 4)))
    for size in (64, 96):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            want = model(x)
        program = torch.export.export(model, (x,))
        torch.testing.assert_close(program.module()(x), want, atol=1e-5, rtol=1e-5)
        _check_onnxruntime(program, [x], [want], tmp_path / f'swin_{pe}_{size}.onnx')
