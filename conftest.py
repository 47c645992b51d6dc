"""Session fixtures shared by several test files: short training runs made once and compared
with; and what makes the tests mean the CPU on a machine with a GPU."""
import os
import subprocess
import sys

import pytest
import torch

import train

from testkit import (TRAIN_FAULT_ARGS, TRAIN_SMALL, TRAIN_TIMEOUT, eval_train_res, train_cli,
    train_env, train_torchrun)


# ----------------------------------------------------------------------------------------------
# The tests mean the CPU. train.py takes CUDA, NCCL and bf16 whenever a GPU is visible, and the
# bit-identity asserts assume CPU arithmetic: on a GPU machine every test but those marked
# `cuda` sees no GPU, in this process (torch.cuda.is_available() is False) and in every
# subprocess a test file starts (CUDA_VISIBLE_DEVICES= in its environment, as train_env sets).

_CUDA_AVAILABLE = torch.cuda.is_available
_TEST_FILES = os.path.dirname(os.path.abspath(__file__))
_gpu_allowed = [False]   # True while a test marked `cuda` runs


class _GpuHidingPopen(subprocess.Popen):
    """subprocess.Popen that refuses a subprocess started by a test file with the GPUs visible."""

    def __init__(self, *args, **kwargs):
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename == subprocess.__file__:
            frame = frame.f_back   # subprocess.run and friends
        caller = frame.f_code.co_filename if frame is not None else ''
        name = os.path.basename(caller)
        if (not _gpu_allowed[0] and os.path.dirname(os.path.abspath(caller)) == _TEST_FILES
                and (name.startswith('test_') or name in ('testkit.py', 'conftest.py'))):
            env = kwargs.get('env')
            shown = None if env is None else env.get('CUDA_VISIBLE_DEVICES')
            assert shown == '', (f'{name}:{frame.f_lineno} starts a subprocess that may see a GPU '
                                 f'(CUDA_VISIBLE_DEVICES={shown!r}): give it env=train_env()')
        super().__init__(*args, **kwargs)


@pytest.fixture(scope='session', autouse=True)
def _tests_mean_the_cpu():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, 'is_available', lambda: False)
        patch.setattr(subprocess, 'Popen', _GpuHidingPopen)
        yield


@pytest.fixture(autouse=True)
def _cuda_tests_see_the_gpu(request, monkeypatch):
    """A test marked `cuda` (which skips without CUDA) sees the GPUs, in-process and in its
    subprocesses."""
    if request.node.get_closest_marker('cuda') is None:
        yield
        return
    monkeypatch.setattr(torch.cuda, 'is_available', _CUDA_AVAILABLE)
    _gpu_allowed[0] = True
    try:
        yield
    finally:
        _gpu_allowed[0] = False


@pytest.fixture(scope='session')
def train_reference_run(tmp_path_factory):
    """The uninterrupted 2-process run of TRAIN_FAULT_ARGS: (folder, completed process)."""
    out = tmp_path_factory.mktemp('train_reference') / 'full'
    done = subprocess.run(train_torchrun(TRAIN_FAULT_ARGS + ['--output-dir', str(out)]),
                          cwd=out.parent, env=train_env(), capture_output=True, text=True,
                          timeout=TRAIN_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


@pytest.fixture(scope='session')
def train_small_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp('train_small') / 'full'
    assert train_cli(TRAIN_SMALL + ['--output-dir', str(out)]) == 0
    return out


@pytest.fixture(scope='session')
def eval_tiny_run(tmp_path_factory):
    """One epoch of train.py on a few built-in `glyphs` images: (output folder, checkpoint)."""
    out = tmp_path_factory.mktemp('eval_tiny_run')
    args = train.get_args_parser().parse_args([
        '--model', 'vit_tiny', '--pe', 'rope_mixed', '--epochs', '1', '--builtin-train', '32',
        '--builtin-val', '21', '--batch-size', '16', '--embed-dim', '48', '--depth', '3',
        '--num-heads', '2', '--img-size', str(eval_train_res), '--output-dir', str(out / 'run'),
        '--eval-resolutions', str(eval_train_res), '16', '--seed', '0'])
    torch.manual_seed(0)
    train.main(args)
    return out, out / 'run' / 'checkpoint.pth'
