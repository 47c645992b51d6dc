"""Session fixtures shared by several test files: short training runs made once and compared with."""
import subprocess

import pytest
import torch

import train

from testkit import (_TRAIN_FAULT_ARGS, _TRAIN_SMALL, _TRAIN_TIMEOUT, _eval_train_res, _train_cli,
    _train_env, _train_torchrun)


@pytest.fixture(scope='session')
def _train_reference_run(tmp_path_factory):
    """The uninterrupted 2-process run of _TRAIN_FAULT_ARGS: (folder, completed process)."""
    out = tmp_path_factory.mktemp('train_reference') / 'full'
    done = subprocess.run(_train_torchrun(_TRAIN_FAULT_ARGS + ['--output-dir', str(out)]),
                          cwd=out.parent, env=_train_env(), capture_output=True, text=True,
                          timeout=_TRAIN_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


@pytest.fixture(scope='session')
def _train_small_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp('train_small') / 'full'
    assert _train_cli(_TRAIN_SMALL + ['--output-dir', str(out)]) == 0
    return out


@pytest.fixture(scope='session')
def _eval_tiny_run(tmp_path_factory):
    """One epoch of train.py on a few built-in `glyphs` images: (output folder, checkpoint)."""
    out = tmp_path_factory.mktemp('eval_tiny_run')
    args = train.get_args_parser().parse_args([
        '--model', 'vit_tiny', '--pe', 'rope_mixed', '--epochs', '1', '--builtin-train', '32',
        '--builtin-val', '21', '--batch-size', '16', '--embed-dim', '48', '--depth', '3',
        '--num-heads', '2', '--img-size', str(_eval_train_res), '--output-dir', str(out / 'run'),
        '--eval-resolutions', str(_eval_train_res), '16', '--seed', '0'])
    torch.manual_seed(0)
    train.main(args)
    return out, out / 'run' / 'checkpoint.pth'
