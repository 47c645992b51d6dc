"""Faults in train.py: torchrun runs killed, stopped or restarted at random moments end bit-identical
to an uninterrupted run; storage errors, damaged checkpoints and resume discovery. All slow.
"""
import errno
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import evaluation
import recipes
import recovery
import train

from testkit import (TRAIN_FAULT_ARGS, TRAIN_SCRIPT, TRAIN_SMALL, TRAIN_TIMEOUT, TRAIN_TINY,
    assert_same_run, train_cli, train_env, train_state, train_torchrun, write_train_folder)

# Slow: each test trains several short runs, most of them under torchrun.
pytestmark = pytest.mark.slow


def _train_children(pid):
    """The pids of the children of `pid` (Linux /proc)."""
    try:
        with open(f'/proc/{pid}/task/{pid}/children') as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _train_kill_tree(pid, sig=signal.SIGKILL):
    """Send `sig` to pid and all its descendants: torchrun starts each worker in a session of
    its own, so killing torchrun's group leaves the workers running."""
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _train_children(p)
    for p in seen:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


class _TrainProcesses:
    """Subprocesses of a test, every one of them (and its workers) killed at the end."""

    def __init__(self):
        self.procs, self.files = [], []

    def __enter__(self):
        return self

    def start(self, cmd, cwd, env=None, log=None):
        out = subprocess.DEVNULL
        if log:
            out = open(log, 'w')
            self.files.append(out)
        proc = subprocess.Popen(cmd, cwd=cwd, env=env or train_env(), text=True, stdout=out,
                                stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def __exit__(self, *exc_info):
        for proc in self.procs:
            if proc.poll() is None:
                _train_kill_tree(proc.pid)
                proc.wait()
        for f in self.files:
            f.close()


def _train_after_saves(logs, procs, count):
    """Wait until the runs writing `logs` have reported `count` mid-epoch saves (of the 9 that
    TRAIN_FAULT_ARGS makes, the 8th in the last epoch): a moment chosen by progress rather than
    by time, so that it falls inside training on a fast machine as on a loaded one."""
    deadline = time.time() + TRAIN_TIMEOUT
    while sum(p.read_text().count('saved recovery_') for p in logs if p.exists()) < count:
        assert time.time() < deadline, f'fewer than {count} saves in {TRAIN_TIMEOUT} s'
        assert all(p.poll() is None for p in procs), f'a run ended before {count} saves'
        time.sleep(0.005)


def _train_wait_output(log, text, proc):
    """Wait until the run writing `log` has printed `text`."""
    deadline = time.time() + TRAIN_TIMEOUT
    while text not in log.read_text():
        assert time.time() < deadline and proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.005)


def _train_at_a_random_moment(logs, procs, most=7):
    """Return at a random moment of the runs writing `logs`: after 1 to `most` saves (7 of
    TRAIN_FAULT_ARGS's 9), then up to 0.1 s (inside a step, a save or an evaluation). Returns
    (saves, delay), for failure messages."""
    moment = saves, delay = random.randint(1, most), random.uniform(0.0, 0.1)
    _train_after_saves(logs, procs, saves)
    time.sleep(delay)
    return moment


def test_train_torchrun_two_processes_outputs_and_recovery_rotation(train_reference_run):
    full, done = train_reference_run
    assert done.stdout.count('epoch 1/4 done') == 1          # only rank 0 prints
    assert 'world_size: 2' in done.stdout and 'top-1 accuracy' in done.stdout
    records = [json.loads(line) for line in (full / 'log.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in records] == [1, 2, 3, 4]
    ckpt = train_state(full / 'checkpoint.pth')
    assert ckpt['epoch'] == 3 and len(ckpt['rng']) == 2 and ckpt['steps_per_epoch'] == 12
    for key in ('model', 'pe', 'model_kwargs', 'img_size', 'num_classes', 'dataset', 'data_path',
                'builtin_val', 'builtin_seed', 'eval_crop_ratio', 'recipe', 'lr', 'batch_size',
                'run_id'):
        assert key in ckpt['args'], key
    assert ckpt['args']['recipe'] == 'demo' and ckpt['args']['dataset'] == 'glyphs'
    assert json.loads((full / 'config.json').read_text()) == ckpt['args']
    assert (full / 'best.pth').is_file() and (full / 'resolutions.json').is_file()
    model = recipes.build_model(ckpt['args'])
    model.load_state_dict(ckpt['model'])
    # Saves every 5 steps (global steps 5, 10, ..., 45) and at every epoch end; the newest two
    # are kept: the last mid-epoch one (step 45 = epoch 4, step 9: 9 x 16 images) and the end.
    assert [os.path.basename(p) for p in recovery.recovery_files(str(full))] == [
        'recovery_e0004_i000000000.pth', 'recovery_e0003_i000000144.pth']
    assert os.path.samefile(full / 'checkpoint.pth', full / 'recovery_e0004_i000000000.pth')
    assert done.stdout.count('saved recovery_') == 9   # the epoch ends say 'epoch N done'
    assert not list(full.glob('*.tmp'))
    # A mid-epoch checkpoint holds where the epoch was, per rank.
    mid = train_state(full / 'recovery_e0003_i000000144.pth')
    assert (mid['epoch'], mid['images'], len(mid['epoch_sums'])) == (2, 144, 2)
    assert recovery.digest_matches(mid) and recovery.digest_matches(ckpt)


def test_train_sigkill_at_a_random_moment_then_resume_auto_is_bit_identical(
        train_reference_run, tmp_path):
    full, _ = train_reference_run
    cut = tmp_path / 'cut'
    with _TrainProcesses() as procs:
        log = tmp_path / 'killed.log'
        proc = procs.start(train_torchrun(TRAIN_FAULT_ARGS + ['--output-dir', str(cut)]),
                           tmp_path, log=log)
        moment = _train_at_a_random_moment([log], [proc])
        workers = _train_children(proc.pid)
        holder = recovery.lock_holder(str(cut))
        _train_kill_tree(proc.pid)   # the whole job, workers included, as a node crash
        proc.wait()
        _train_wait_gone(workers)
    assert proc.returncode != 0, f'the run finished before the kill {moment}'
    # The kernel dropped the dead job's lock on its folder; the file still names the holder.
    assert holder['pid'] in workers and recovery.lock_holder(str(cut)) is None
    assert json.loads((cut / recovery.LOCK_NAME).read_text()) == holder
    resumed = subprocess.run(
        train_torchrun(TRAIN_FAULT_ARGS + ['--output-dir', str(cut), '--resume', 'auto']),
        cwd=tmp_path, env=train_env(), capture_output=True, text=True, timeout=TRAIN_TIMEOUT)
    assert resumed.returncode == 0, (moment, resumed.stderr[-3000:])
    assert f'resumed from {cut}{os.sep}recovery_e' in resumed.stdout, moment
    assert_same_run(full, cut)
    assert not list(cut.glob('*.tmp'))
    # The next run took the folder again.
    assert json.loads((cut / recovery.LOCK_NAME).read_text())['pid'] != holder['pid']


def _train_free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _train_wait_gone(pids, timeout=TRAIN_TIMEOUT):
    deadline = time.time() + timeout
    while not all(_train_proc_ended(p) for p in pids):
        assert time.time() < deadline, f'processes {pids} did not exit'
        time.sleep(0.01)


def _train_proc_ended(pid):
    """Gone, or a zombie whose every thread has ended. The main thread of a killed process can
    be a zombie while its other threads are still exiting; the process's files, and with them
    its locks, are released only when the last thread ends."""
    if _train_proc_state(pid) not in ('Z', 'gone'):
        return False
    try:
        return os.listdir(f'/proc/{pid}/task') in ([], [str(pid)])
    except OSError:
        return True


def _train_proc_state(pid):
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0]
    except OSError:
        return 'gone'


def _train_stop_message(output):
    stops = re.findall(r'stopped by (SIG\w+) (?:at epoch \d/4, step \d+/12|after epoch \d/4): '
                       r'saved (\S+); run the same command with --resume auto to continue '
                       r'\(exit status 75\)', output)
    assert len(stops) == 1, output[-3000:]   # rank 0 only
    return stops[0]


def test_train_sigterm_stops_every_rank_at_one_step_saves_once_and_resumes_bit_identical(
        train_reference_run, tmp_path):
    full, _ = train_reference_run
    cut = tmp_path / 'cut'
    with _TrainProcesses() as procs:
        log = tmp_path / 'stopped.log'
        proc = procs.start(train_torchrun(TRAIN_FAULT_ARGS + ['--output-dir', str(cut)]),
                           tmp_path, log=log)
        moment = _train_at_a_random_moment([log], [proc])
        workers = _train_children(proc.pid)
        # As a scheduler does: SIGTERM to every process, then again while the state is saved.
        signalled = time.time()
        _train_kill_tree(proc.pid, signal.SIGTERM)
        time.sleep(0.05)
        _train_kill_tree(proc.pid, signal.SIGTERM)
        proc.wait(timeout=TRAIN_TIMEOUT)
        _train_wait_gone(workers)
        stop_seconds = time.time() - signalled
    output = (tmp_path / 'stopped.log').read_text()
    name, saved = _train_stop_message(output)
    assert name == 'SIGTERM', output[-3000:]
    assert 'train.py", line' not in output, output[-3000:]   # torchrun's own traceback only
    # Bounded: well inside torchrun's 30 s before it sends SIGKILL (measured: about 0.3 s).
    assert stop_seconds < 20, stop_seconds
    assert recovery.recovery_files(str(cut))[0] == saved and not list(cut.glob('*.tmp'))
    state = train_state(saved)
    assert recovery.digest_matches(state) and len(state['rng']) == 2
    resumed = subprocess.run(
        train_torchrun(TRAIN_FAULT_ARGS + ['--output-dir', str(cut), '--resume', 'auto']),
        cwd=tmp_path, env=train_env(), capture_output=True, text=True, timeout=TRAIN_TIMEOUT)
    assert resumed.returncode == 0, (moment, resumed.stderr[-3000:])
    assert f'resumed from {saved} (--resume auto)' in resumed.stdout
    assert_same_run(full, cut)


# ----------------------------------------------------------------------------------------------
# A folder run with loader workers, stopped as a scheduler stops it

def _train_write_jpeg_folder(root):
    """DIR/{train,val}/{a,b}/*.jpg: 24 + 4 noisy 320 x 320 JPEGs per class, 400 times the pixels
    of the 16 px model input, so that decoding and 3-Augment, not the step, set the pace
    (measured on one thread: 17.7 ms to load a batch of 4, 7.5 ms for a training step)."""
    rng = np.random.default_rng(0)
    for split, count in (('train', 24), ('val', 4)):
        for label, name in enumerate(('a', 'b')):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.uniform(0, 120, size=(320, 320, 3)).astype(np.uint8)
                pixels[40:200, 20 + 120 * label:180 + 120 * label] += 120
                Image.fromarray(pixels).save(folder / f'{i}.jpg', quality=90)


# Each rank's exit status, written where EXIT_RECORD says: torchrun reports only its own.
_TRAIN_EXIT_RECORDING_LAUNCHER = '''import os
import cli, train
status = 'no status: a crash'
try:
    cli.cli(train.main, train.get_args_parser())
    status = 0
except SystemExit as e:
    status = e.code
    raise
finally:
    with open(os.path.join(os.environ['EXIT_RECORD'], 'exit_' + os.environ['RANK']), 'w') as f:
        f.write(str(status))
'''


def _train_loader_run(data, out, record, resume=False, launcher=()):
    """The DeiT-III recipe on _train_write_jpeg_folder's folder: 2 processes with 2 loader
    workers each, 2 epochs of 6 steps, a recovery checkpoint every 2 steps (4 inside epochs)."""
    script = record / 'launch.py'
    script.write_text(_TRAIN_EXIT_RECORDING_LAUNCHER)
    args = ['--model', 'vit_tiny', '--pe', 'rope_mixed', '--data-path', str(data), '--epochs', '2',
            '--batch-size', '4', '--img-size', '16', '--patch-size', '8', '--embed-dim', '32',
            '--depth', '2', '--num-heads', '2', '--eval-resolutions', '16', '--num-workers', '2',
            '--save-every-steps', '2', '--print-freq', '1', '--output-dir', str(out)]
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node',
               '2', *launcher, str(script), *args, *(['--resume', 'auto'] if resume else [])]
    return command, dict(train_env(), EXIT_RECORD=str(record))


def _train_exit_statuses(record):
    return [(record / f'exit_{rank}').read_text() for rank in range(2)]


@pytest.fixture(scope='module')
def _train_loader_reference(tmp_path_factory):
    """The JPEG folder and the uninterrupted run of _train_loader_run on it."""
    base = tmp_path_factory.mktemp('train_loader')
    _train_write_jpeg_folder(base / 'data')
    command, env = _train_loader_run(base / 'data', base / 'full', base)
    done = subprocess.run(command, cwd=base, env=env, capture_output=True, text=True,
                          timeout=TRAIN_TIMEOUT)
    assert done.returncode == 0 and _train_exit_statuses(base) == ['0', '0'], done.stderr[-3000:]
    return base / 'data', base / 'full'


def _train_descendants(pid):
    """pid and every process below it: torchrun, its workers, their loader workers."""
    todo, seen = [pid], []
    while todo:
        seen.append(todo.pop())
        todo += _train_children(seen[-1])
    return seen


@pytest.mark.parametrize('way', ['torchrun-alone', 'its-process-group', 'every-process'])
def test_train_folder_run_with_loader_workers_stopped_by_a_scheduler_resumes_bit_identical(
        _train_loader_reference, tmp_path, way):
    """SIGTERM to torchrun alone (which forwards it to each worker's whole process group, loader
    workers included); SIGUSR1 to torchrun's process group (torchrun told to forward it, as the
    SLURM script of docs/long-runs.md needs); SIGTERM to every process of the job at once, twice,
    as scancel and a preemption do. Every rank stops after one step with status 75, no loader
    worker dies of the signal, and --resume auto ends bit-identical."""
    data, full = _train_loader_reference
    cut = tmp_path / 'cut'
    launcher = ['--signals-to-handle', 'SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1'] \
        if way == 'its-process-group' else []
    command, env = _train_loader_run(data, cut, tmp_path, launcher=launcher)
    log = tmp_path / 'stopped.log'
    with open(log, 'w') as out:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        moment = _train_at_a_random_moment([log], [proc], most=3)   # of 4 mid-epoch saves
        job = _train_descendants(proc.pid)
        signalled = time.time()
        if way == 'torchrun-alone':
            os.kill(proc.pid, signal.SIGTERM)
        elif way == 'its-process-group':
            os.killpg(proc.pid, signal.SIGUSR1)   # torchrun's session: its workers have their own
        else:
            for _ in range(2):
                for pid in _train_descendants(proc.pid):
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                time.sleep(0.05)
        proc.wait(timeout=TRAIN_TIMEOUT)
        _train_wait_gone(job)
        stop_seconds = time.time() - signalled
    finally:
        if proc.poll() is None:
            _train_kill_tree(proc.pid)
            proc.wait()
    output = log.read_text()
    context = (way, moment, len(job), output[-3000:])
    assert _train_exit_statuses(tmp_path) == ['75', '75'], context
    stops = re.findall(r'stopped by (SIG\w+) (?:at epoch \d/2, step \d/6|after epoch \d/2|in the '
                       r'closing evaluation across resolutions).*?(\S+\.pth)\)?; run the same '
                       r'command with --resume auto', output)
    assert len(stops) == 1, context   # rank 0 only
    name, saved = stops[0]
    assert name == ('SIGUSR1' if way == 'its-process-group' else 'SIGTERM'), context
    # No loader worker died of it, and no traceback of ours (torchrun prints its own).
    assert 'DataLoader worker' not in output and 'killed by signal' not in output, context
    assert not re.search(r'File "[^"]*(train|data|recovery|distributed|launch)\.py"', output), \
        context
    assert stop_seconds < 20, (stop_seconds, context)
    assert not list(cut.glob('*.tmp'))
    (tmp_path / 'exit_0').unlink()
    (tmp_path / 'exit_1').unlink()
    command, env = _train_loader_run(data, cut, tmp_path, resume=True)
    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=TRAIN_TIMEOUT)
    assert resumed.returncode == 0, (context, resumed.stderr[-3000:])
    assert _train_exit_statuses(tmp_path) == ['0', '0']
    # A stop in the closing evaluation names checkpoint.pth, a link to the newest recovery one.
    assert 'resumed from ' + (str(cut) if saved.endswith('checkpoint.pth') else saved) \
        in resumed.stdout, (context, resumed.stdout[-3000:])
    assert_same_run(full, cut)


_TRAIN_LOADER_PROBE = '''import sys, time
import torch
import data


class Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, index):
        time.sleep(0.01)
        return torch.zeros(1)


batches = iter(data.StopSafeLoader(Slow(), batch_size=2, num_workers=2))
next(batches)
print(' '.join(str(w.pid) for w in batches._workers), flush=True)
sys.stdin.readline()   # the test signals the workers meanwhile
next(batches)
print('alive', all(w.is_alive() for w in batches._workers), flush=True)
raise RuntimeError('a crash with the loader open')
'''


def test_train_loader_workers_ignore_signals_from_outside_and_end_with_their_process(tmp_path):
    """StopSafeLoader's workers survive SIGTERM, SIGUSR1 and SIGINT sent by another process (torch's
    own handler would end them on SIGTERM, and the next batch would fail), yet a process that
    crashes with the loader open still exits: its multiprocessing SIGTERMs its loader workers at
    exit, and ignored that would leave it waiting for them forever."""
    script = tmp_path / 'probe.py'
    script.write_text(_TRAIN_LOADER_PROBE)
    proc = subprocess.Popen([sys.executable, str(script)], env=train_env(), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        workers = [int(pid) for pid in proc.stdout.readline().split()]
        assert len(workers) == 2, proc.stderr.read()
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            for pid in workers:
                os.kill(pid, sig)
        time.sleep(0.5)
        proc.stdin.write('\n')
        proc.stdin.flush()
        assert proc.stdout.readline() == 'alive True\n'
        started = time.time()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            _train_kill_tree(proc.pid)
            proc.wait()
    assert proc.returncode == 1 and err.rstrip().endswith('a crash with the loader open'), err
    assert 'DataLoader worker' not in err, err
    assert time.time() - started < 15
    _train_wait_gone(workers, timeout=10)


def test_train_lost_worker_torchrun_restart_resumes_by_itself_bit_identical(
        train_reference_run, tmp_path):
    full, _ = train_reference_run
    cut = tmp_path / 'cut'
    restarting = ['--max-restarts', '1']
    with _TrainProcesses() as procs:
        # No --resume: the restarted workers continue from their own checkpoints all the same.
        log = tmp_path / 'run.log'
        proc = procs.start(train_torchrun(TRAIN_FAULT_ARGS + ['--output-dir', str(cut)],
                                           launcher=restarting), tmp_path, log=log)
        _train_at_a_random_moment([log], [proc])
        first = recovery.lock_holder(str(cut))
        assert first['pid'] in _train_children(proc.pid)
        os.kill(_train_children(proc.pid)[-1], signal.SIGKILL)
        # The restarted workers hold the folder again (paused while the lock is looked at).
        _train_wait_output(log, 'after a torchrun restart', proc)
        _train_kill_tree(proc.pid, signal.SIGSTOP)
        try:
            again, workers = recovery.lock_holder(str(cut)), _train_children(proc.pid)
        finally:
            _train_kill_tree(proc.pid, signal.SIGCONT)
        assert again['pid'] in workers and again['pid'] != first['pid'], (first, again, workers)
        assert proc.wait(timeout=TRAIN_TIMEOUT) == 0, (tmp_path / 'run.log').read_text()[-3000:]
    output = (tmp_path / 'run.log').read_text()
    assert re.search(r'resumed from \S+recovery_e\d+_i\d+\.pth after a torchrun restart',
                     output), output[-3000:]
    assert_same_run(full, cut)


def test_train_torchrun_killed_alone_its_workers_stop_by_themselves_and_resume_bit_identical(
        train_reference_run, tmp_path):
    full, _ = train_reference_run
    cut = tmp_path / 'cut'
    command = train_torchrun(TRAIN_FAULT_ARGS + ['--output-dir', str(cut), '--resume', 'auto'])
    with _TrainProcesses() as procs:
        log = tmp_path / 'orphaned.log'
        proc = procs.start(command, tmp_path, log=log)
        moment = _train_at_a_random_moment([log], [proc])
        workers = _train_children(proc.pid)
        # The workers are paused across the kill and for longer than their watch's poll
        # interval (0.5 s), so that they notice at their first step after it: else, on a fast
        # machine, the few steps left after a late moment can end the run before the next poll.
        for worker in workers:
            _train_kill_tree(worker, signal.SIGSTOP)
        try:
            os.kill(proc.pid, signal.SIGKILL)   # torchrun alone, as the out-of-memory killer does
            proc.wait()
            time.sleep(0.6)
            killed = time.time()
            for worker in workers:
                _train_kill_tree(worker, signal.SIGCONT)
            _train_wait_gone(workers, timeout=10)
        finally:
            for worker in workers:   # what a failed test would leave running
                _train_kill_tree(worker)
        orphaned_seconds = time.time() - killed
    output = log.read_text()
    # As on SIGTERM: every rank stopped at one step, rank 0 saved and said why, once.
    stops = re.findall(rf'stopped because torchrun \(pid {proc.pid}\) has gone, (?:at epoch '
                       r'\d/4, step \d+/12|after epoch \d/4): saved (\S+); run the same command '
                       r'with --resume auto to continue \(exit status 75\)', output)
    assert len(stops) == 1 and recovery.recovery_files(str(cut))[0] == stops[0], output[-3000:]
    saved = stops[0]
    assert orphaned_seconds < 10   # from SIGCONT: a step, a save and the exit
    resumed = subprocess.run(command, cwd=tmp_path, env=train_env(), capture_output=True,
                             text=True, timeout=TRAIN_TIMEOUT)
    assert resumed.returncode == 0, (moment, resumed.stderr[-3000:])
    assert f'resumed from {saved} (--resume auto)' in resumed.stdout, moment
    assert_same_run(full, cut)


def test_train_second_job_on_a_running_jobs_folder_is_refused_and_the_first_ends_bit_identical(
        train_reference_run, tmp_path):
    full, _ = train_reference_run
    out = tmp_path / 'out'
    command = train_torchrun(TRAIN_FAULT_ARGS + ['--output-dir', str(out), '--resume', 'auto'])
    with _TrainProcesses() as procs:
        log = tmp_path / 'first.log'
        first = procs.start(command, tmp_path, log=log)
        _train_at_a_random_moment([log], [first])
        # The first job paused while the second runs, so that it is still there, and the
        # folder does not change but for what the second job writes.
        _train_kill_tree(first.pid, signal.SIGSTOP)
        try:
            holder = recovery.lock_holder(str(out))
            before = {p.name: p.read_bytes() for p in out.iterdir()}
            second = subprocess.run(command, cwd=tmp_path, env=train_env(),
                                    capture_output=True, text=True, timeout=TRAIN_TIMEOUT)
            after = {p.name: p.read_bytes() for p in out.iterdir()}
            workers = _train_children(first.pid)
        finally:
            _train_kill_tree(first.pid, signal.SIGCONT)
        assert first.wait(timeout=TRAIN_TIMEOUT) == 0, log.read_text()[-3000:]
    assert holder['pid'] in workers and holder['host'] == socket.gethostname()
    output = second.stdout + second.stderr
    ours = [line for line in output.splitlines() if line.startswith('error: ')]
    assert ours == [f'error: output folder {out} is in use by another run (host '
                    f"{holder['host']}, pid {holder['pid']}, started {holder['started']}); wait "
                    'for it to end or stop it, or give --wait-for-output-dir SECONDS to wait for '
                    'it'], output[-3000:]
    assert re.fullmatch(r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC', holder['started'])
    assert 'exitcode  : 2' in output and 'train.py", line' not in output, output[-3000:]
    assert 'resumed from' not in output and after == before   # nothing read, nothing written
    assert_same_run(full, out)


def test_train_output_folder_in_use_is_refused_with_one_line_or_waited_for(
        tmp_path, capsys, monkeypatch):
    out = tmp_path / 'out'
    # Another process holds the folder until its stdin closes.
    holder = subprocess.Popen(
        [sys.executable, '-c', 'import recovery, sys; recovery.take_output_dir(sys.argv[1]); '
         'print("held", flush=True); sys.stdin.read()', str(out)],
        env=train_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == 'held\n'
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        assert train_cli(TRAIN_SMALL + ['--output-dir', str(out), '--resume', 'auto']) == 2
        err = capsys.readouterr().err
        started = json.loads((out / recovery.LOCK_NAME).read_text())['started']
        assert err == (f'error: output folder {out} is in use by another run (host '
                       f'{socket.gethostname()}, pid {holder.pid}, started {started}); wait for '
                       'it to end or stop it, or give --wait-for-output-dir SECONDS to wait for '
                       'it\n'), err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        # --wait-for-output-dir: the run starts once the holder has ended.
        threading.Timer(1.0, holder.stdin.close).start()
        assert train_cli(TRAIN_SMALL + ['--output-dir', str(out), '--epochs', '1',
                                          '--wait-for-output-dir', '60']) == 0
        assert f'waiting up to 60 s for output folder {out}, in use by another run (host ' \
            f'{socket.gethostname()}, pid {holder.pid}, started {started})' \
            in capsys.readouterr().out
        assert holder.wait(timeout=10) == 0
    finally:
        holder.kill()
    assert json.loads((out / recovery.LOCK_NAME).read_text())['pid'] == os.getpid()
    assert recovery.lock_holder(str(out)) is None   # released when the run ended

    # A file system without locks: a warning, and the run goes on unprotected.
    def no_locks(*args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(recovery.fcntl, 'lockf', no_locks)
    assert recovery.take_output_dir(str(tmp_path / 'nfs')) is None
    assert capsys.readouterr().err == (
        f"warning: cannot lock {tmp_path / 'nfs' / recovery.LOCK_NAME} (No locks available): "
        'this file system offers no locks, so nothing keeps a second run out of the folder '
        '(docs/long-runs.md: one run per output folder)\n')
    # Only a torchrun worker watches its launcher; a plain process has none.
    monkeypatch.delenv('TORCHELASTIC_RUN_ID', raising=False)
    assert recovery.watch_launcher() is None


def _train_two_nodes(procs, port, out, cwd, tag, extra=()):
    """Two torchrun agents of one process each, meeting at a c10d rendezvous on localhost: the
    README's several-node command on one machine, with its environment."""
    env = dict(train_env(), TORCH_DISABLE_SHARE_RDZV_TCP_STORE='1')
    agents = []
    for node in range(2):
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2',
               '--nproc_per_node', '1', '--rdzv-backend', 'c10d',
               '--rdzv-endpoint', f'localhost:{port}', '--rdzv-id', f'test-{port}',
               '--max-restarts', '1', TRAIN_SCRIPT] + TRAIN_FAULT_ARGS + [
               '--output-dir', str(out), '--resume', 'auto', *extra]
        agents.append(procs.start(cmd, cwd, env=env, log=cwd / f'{tag}_node{node}.log'))
    return agents


def test_train_two_nodes_c10d_preempt_resume_and_lost_node_are_bit_identical(
        train_reference_run, tmp_path):
    full, _ = train_reference_run
    # 1. Both nodes preempted after a checkpoint, then the same command again on both.
    out = tmp_path / 'preempted'
    with _TrainProcesses() as procs:
        agents = _train_two_nodes(procs, _train_free_port(), out, tmp_path, 'first')
        _train_at_a_random_moment([tmp_path / f'first_node{n}.log' for n in range(2)], agents)
        workers = [w for a in agents for w in _train_children(a.pid)]
        for agent in agents:
            _train_kill_tree(agent.pid, signal.SIGTERM)
        for agent in agents:
            agent.wait(timeout=TRAIN_TIMEOUT)
        _train_wait_gone(workers)
    logs = ''.join((tmp_path / f'first_node{n}.log').read_text() for n in range(2))
    _, saved = _train_stop_message(logs)
    with _TrainProcesses() as procs:
        agents = _train_two_nodes(procs, _train_free_port(), out, tmp_path, 'second')
        for agent in agents:
            assert agent.wait(timeout=TRAIN_TIMEOUT) == 0, logs
    logs = ''.join((tmp_path / f'second_node{n}.log').read_text() for n in range(2))
    assert f'resumed from {saved} (--resume auto)' in logs, logs[-3000:]
    assert_same_run(full, out)

    # 2. A node's worker lost mid-run: both agents restart their workers, which resume.
    out = tmp_path / 'lost'
    with _TrainProcesses() as procs:
        agents = _train_two_nodes(procs, _train_free_port(), out, tmp_path, 'lost')
        _train_at_a_random_moment([tmp_path / f'lost_node{n}.log' for n in range(2)], agents)
        os.kill(_train_children(agents[1].pid)[0], signal.SIGKILL)
        for agent in agents:
            assert agent.wait(timeout=TRAIN_TIMEOUT) == 0
    logs = ''.join((tmp_path / f'lost_node{n}.log').read_text() for n in range(2))
    assert 'resumed from' in logs, logs[-3000:]
    assert_same_run(full, out)


def test_train_resume_mid_epoch_on_another_batch_size_continues_at_the_same_point(
        tmp_path, capsys, monkeypatch):
    out = tmp_path / 'out'
    _train_send_at_step(monkeypatch, {3: signal.SIGTERM})
    assert train_cli(TRAIN_SMALL + ['--output-dir', str(out)]) == 75   # 24 images seen
    _train_send_at_step(monkeypatch, {})
    capsys.readouterr()
    # Batch 4 instead of 8: 8 steps per epoch, the same 24 images are 6 of them; the schedule
    # (16 steps now) goes on from step 6 with the learning rate of the new batch.
    assert train_cli(TRAIN_SMALL + ['--output-dir', str(out), '--batch-size', '4',
                                      '--resume', 'auto']) == 0
    printed = capsys.readouterr().out
    assert (f"resumed from {out / 'recovery_e0000_i000000024.pth'} (--resume auto): epoch 1/2, "
            'step 6/8') in printed
    assert ('the checkpoint was written by 1 process(es) x batch 8, this run has 1 x 4: the '
            'schedule goes on from step 6 of 16 at lr 6.25e-05') in printed
    final = train_state(out / 'checkpoint.pth')
    assert final['lr_scheduler']['last_epoch'] == 16 and final['steps_per_epoch'] == 8
    assert [json.loads(line)['epoch'] for line in (out / 'log.jsonl').read_text().splitlines()] \
        == [1, 2]
    assert final['optimizer']['param_groups'][0]['lr'] == pytest.approx(1e-5)   # min_lr at the end


def _train_send_at_step(monkeypatch, schedule):
    """train.training_loss sends this process the signal schedule[n] while computing training step n
    (counted from 1 in this run): a preemption at a chosen step."""
    real_loss, calls = train.training_loss, [0]

    def loss(*args):
        calls[0] += 1
        if calls[0] in schedule:
            os.kill(os.getpid(), schedule[calls[0]])
        return real_loss(*args)
    monkeypatch.setattr(train, 'training_loss', loss)


def _train_folder_run_args(data):
    """The DeiT-III recipe on a tiny folder: 3-Augment, mixup / cutmix, repeated augmentation
    x3, drop path, LAMB, BCE. One process, 3 steps per epoch, 2 epochs."""
    return ['--model', 'vit_tiny', '--pe', 'rope_mixed_ape', '--data-path', str(data),
            '--epochs', '2', '--batch-size', '4', '--img-size', '16', '--patch-size', '8',
            '--embed-dim', '32', '--depth', '2', '--num-heads', '2', '--eval-resolutions', '16',
            '--drop-path', '0.1', '--save-every-steps', '2', '--print-freq', '1']


def test_train_mid_epoch_stop_by_signal_resumes_bit_identical_with_augmentation_and_workers(
        tmp_path, capsys, monkeypatch):
    data = tmp_path / 'data'
    write_train_folder(data, corrupt=False)
    args = _train_folder_run_args(data)
    full, cut = tmp_path / 'full', tmp_path / 'cut'
    assert train_cli(args + ['--output-dir', str(full), '--num-workers', '0']) == 0
    assert train_state(full / 'checkpoint.pth')['args']['recipe'] == 'deit3'
    capsys.readouterr()

    # Stopped by SIGUSR1 in step 2 of epoch 1, with loader workers that also get signals; a
    # second signal (SIGTERM) arrives while the checkpoint is written.
    real_save, saves = torch.save, []

    def save_under_fire(obj, f, *a, **kw):
        saves.append(obj.get('images'))
        os.kill(os.getpid(), signal.SIGTERM)
        for worker in _train_children(os.getpid()):   # the loader's forked workers
            os.kill(worker, signal.SIGTERM)
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, 'save', save_under_fire)
    _train_send_at_step(monkeypatch, {2: signal.SIGUSR1})
    status = train_cli(args + ['--output-dir', str(cut), '--num-workers', '2'])
    err = capsys.readouterr().err
    saved = cut / 'recovery_e0000_i000000008.pth'
    assert status == cli.EXIT_STOPPED == 75
    assert err == (f'stopped by SIGUSR1 at epoch 1/2, step 2/3: saved {saved}; run the same '
                   'command with --resume auto to continue (exit status 75)\n'), err
    assert saves == [8]   # one save, at the step the signal came in
    assert recovery.digest_matches(train_state(saved)) and not list(cut.glob('*.tmp'))
    monkeypatch.setattr(torch, 'save', real_save)

    # Resumed, stopped again in the epoch's last step (so after its evaluation and save), and
    # resumed again with another worker count.
    _train_send_at_step(monkeypatch, {1: signal.SIGTERM})
    assert train_cli(args + ['--output-dir', str(cut), '--num-workers', '2',
                              '--resume', 'auto']) == 75
    out, err = capsys.readouterr()
    assert f'resumed from {saved} (--resume auto): epoch 1/2, step 2/3' in out
    assert err.startswith('stopped by SIGTERM after epoch 1/2: saved ') and err.count('\n') == 1
    _train_send_at_step(monkeypatch, {})
    assert train_cli(args + ['--output-dir', str(cut), '--num-workers', '1',
                              '--resume', 'auto']) == 0
    assert 'resumed from' in capsys.readouterr().out
    assert_same_run(full, cut)


def _train_snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix == '.pth'}


def test_train_signal_in_the_closing_evaluation_stops_with_75_and_resume_redoes_only_it(
        train_small_reference, tmp_path, capsys, monkeypatch):
    out = tmp_path / 'out'
    shutil.copytree(train_small_reference, out)
    (out / 'resolutions.json').unlink()
    before, log_before = _train_snapshot(out), (out / 'log.jsonl').read_bytes()
    real, calls = evaluation.evaluate_resolutions, []

    def signalled(model, cfg, resolutions, *args, **kwargs):
        calls.append(list(resolutions))
        if len(calls) == 1:   # SIGTERM while the first resolution is evaluated
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, cfg, resolutions, *args, **kwargs)
    monkeypatch.setattr(train, 'evaluate_resolutions', signalled)
    capsys.readouterr()
    # Training is complete: the resume goes straight to the closing evaluation (RoPE-Mixed:
    # extrapolated, then interpolated, at 16 px), which stops after its first resolution.
    assert train_cli(TRAIN_SMALL + ['--output-dir', str(out), '--resume', 'auto']) == 75
    progress, stop = capsys.readouterr().err.splitlines()   # the resolution done, the stop
    assert 'RoPE-Mixed extrapolate @ 16: 8/8 images (100%)' in progress, progress
    assert stop == (f'stopped by SIGTERM in the closing evaluation across resolutions (training is '
                    f'complete: {out / "checkpoint.pth"}); run the same command with --resume '
                    'auto to redo only that evaluation (exit status 75)'), stop
    assert calls == [[16]] and not (out / 'resolutions.json').exists()
    assert _train_snapshot(out) == before and (out / 'log.jsonl').read_bytes() == log_before
    monkeypatch.setattr(train, 'evaluate_resolutions', real)
    assert train_cli(TRAIN_SMALL + ['--output-dir', str(out), '--resume', 'auto']) == 0
    assert json.loads((out / 'resolutions.json').read_text()) \
        == json.loads((train_small_reference / 'resolutions.json').read_text())
    assert _train_snapshot(out) == before


def test_train_failed_checkpoint_write_stops_with_one_line_and_keeps_previous_files(
        train_small_reference, tmp_path, capsys, monkeypatch):
    out = tmp_path / 'out'
    shutil.copytree(train_small_reference, out)
    before = _train_snapshot(out)
    log_before = (out / 'log.jsonl').read_bytes()
    capsys.readouterr()

    # A full disk: torch.save gets part of the file out, then ENOSPC.
    real_save = torch.save

    def disk_full(obj, f, *a, **kw):
        f.write(b'PK\x03\x04 half a checkpoint')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, 'save', disk_full)
    status = train_cli(TRAIN_SMALL + ['--output-dir', str(out), '--epochs', '3',
                                        '--resume', 'auto'])
    err = capsys.readouterr().err
    assert status == cli.EXIT_SAVE_FAILED == 74
    assert err.startswith(f'error: cannot write {out / "recovery_e0002_i000000008.pth"}: No space '
                          'left on device; the files written before are kept') \
        and err.count('\n') == 1, err
    assert _train_snapshot(out) == before and (out / 'log.jsonl').read_bytes() == log_before
    assert not list(out.glob('*.tmp'))
    monkeypatch.setattr(torch, 'save', real_save)

    # A read-only folder (tests run as root, for whom chmod does not block writes).
    real_open = open

    def read_only(path, mode='r', *a, **kw):
        if str(path).startswith(str(out)) and any(c in mode for c in 'wax+'):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, mode, *a, **kw)
    monkeypatch.setattr(recovery, 'open', read_only, raising=False)
    status = train_cli(TRAIN_SMALL + ['--output-dir', str(out), '--epochs', '3',
                                        '--resume', 'auto'])
    err = capsys.readouterr().err
    assert status == 74
    assert err == f'error: cannot write {out / "config.json"}: Read-only file system\n', err
    assert _train_snapshot(out) == before and not list(out.glob('*.tmp'))
    monkeypatch.undo()

    # The kernel's own refusal: a file size limit (EFBIG) in a real process, which leaves a
    # partly written file behind for train.py to remove.
    import resource
    fresh = tmp_path / 'limited'
    limit = 64 * 1024   # above config.json, below one checkpoint
    done = subprocess.run(
        [sys.executable, TRAIN_SCRIPT] + TRAIN_SMALL + ['--output-dir', str(fresh)],
        cwd=tmp_path, env=train_env(), capture_output=True, text=True, timeout=TRAIN_TIMEOUT,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert done.returncode == 74, done.stderr[-2000:]
    assert done.stderr == (f'error: cannot write {fresh / "recovery_e0000_i000000008.pth"}: File '
                           'too large; the files written before are kept (--on-save-error warn '
                           'reports such a failure and trains on)\n'), done.stderr
    assert sorted(p.name for p in fresh.iterdir()) == ['config.json', recovery.LOCK_NAME]


def test_train_save_error_warn_trains_on_and_removes_nothing_until_a_save_succeeds(
        train_small_reference, tmp_path, capsys, monkeypatch):
    out = tmp_path / 'out'
    real_save, calls, seen = torch.save, [0], {}

    def flaky_disk(obj, f, *a, **kw):   # saves 3 and 4 (step 3, epoch 1's end) fail
        calls[0] += 1
        seen[calls[0]] = sorted(p.name for p in out.glob('recovery_*.pth'))
        if calls[0] in (3, 4):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, 'save', flaky_disk)
    status = train_cli(TRAIN_SMALL + ['--output-dir', str(out), '--on-save-error', 'warn'])
    err = capsys.readouterr().err
    assert status == 0, err
    warnings = [line for line in err.splitlines() if line.startswith('warning: ')]
    assert warnings == [f'warning: cannot write {out / name}: No space left on device; training '
                        'goes on (--on-save-error warn)' for name in
                        ('recovery_e0000_i000000024.pth', 'recovery_e0001_i000000000.pth')], err
    kept = ['recovery_e0000_i000000008.pth', 'recovery_e0000_i000000016.pth']
    assert seen[3] == seen[4] == seen[5] == kept   # nothing removed while saves failed
    # The first save that worked removed the oldest; the newest two remain.
    assert seen[6] == ['recovery_e0000_i000000016.pth', 'recovery_e0001_i000000008.pth']
    assert_same_run(train_small_reference, out)   # the record of epoch 1 came later


def test_train_resume_auto_falls_back_past_damaged_checkpoints_naming_both(
        train_small_reference, tmp_path, capsys):
    newest, previous = 'recovery_e0002_i000000000.pth', 'recovery_e0001_i000000024.pth'
    assert [os.path.basename(p) for p in recovery.recovery_files(str(train_small_reference))] \
        == [newest, previous]
    for damage in ('truncated', 'random bytes inside', 'random bytes'):
        out = tmp_path / damage.replace(' ', '_')
        shutil.copytree(train_small_reference, out)
        data = (out / newest).read_bytes()
        if damage == 'truncated':
            data = data[:len(data) // 2]
        elif damage == 'random bytes inside':   # torch.load reads this without complaint
            middle = len(data) // 2
            data = data[:middle] + os.urandom(64) + data[middle + 64:]
        else:
            data = os.urandom(len(data))
        (out / newest).write_bytes(data)
        capsys.readouterr()
        assert train_cli(TRAIN_SMALL + ['--output-dir', str(out), '--resume', 'auto']) == 0
        printed = capsys.readouterr()
        warning = [line for line in printed.err.splitlines() if line.startswith('warning:')]
        assert len(warning) == 1 and warning[0].startswith(
            f'warning: {out / newest} is damaged (') and warning[0].endswith(
            f'); resuming from {out / previous} instead (the damaged file is kept as '
            f'{newest}.damaged)'), (damage, printed.err)
        assert f'resumed from {out / previous} (--resume auto): epoch 2/2, step 3/4' \
            in printed.out
        assert (out / f'{newest}.damaged').read_bytes() == data
        assert_same_run(train_small_reference, out)

    # Nothing sound left: one line, exit 2, nothing written.
    out = tmp_path / 'all_damaged'
    shutil.copytree(train_small_reference, out)
    for path in list(out.glob('recovery_*.pth')) + [out / 'checkpoint.pth']:
        path.write_bytes(path.read_bytes()[:100])
    # (The lock file aside: --resume auto reads the folder once it holds it, and the lock file
    # names the holder.)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != recovery.LOCK_NAME}
    status = train_cli(TRAIN_SMALL + ['--output-dir', str(out), '--resume', 'auto'])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith('error: --resume auto: no sound checkpoint in ') \
        and err.count('\n') == 1 and newest in err and 'checkpoint.pth' in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != recovery.LOCK_NAME} \
        == before


def test_train_resume_auto_continues_only_its_own_run_and_a_torchrun_restart_implies_it(
        train_small_reference, tmp_path, capsys, monkeypatch):
    # A torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) of a run without --resume continues
    # from what that torchrun's run saved.
    out = tmp_path / 'out'
    monkeypatch.setenv('TORCHELASTIC_RUN_ID', 'first-torchrun')
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '0')
    _train_send_at_step(monkeypatch, {6: signal.SIGTERM})
    assert train_cli(TRAIN_SMALL + ['--output-dir', str(out)]) == 75
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '1')
    _train_send_at_step(monkeypatch, {})
    capsys.readouterr()
    assert train_cli(TRAIN_SMALL + ['--output-dir', str(out)]) == 0
    assert (f"resumed from {out / 'recovery_e0001_i000000016.pth'} after a torchrun restart "
            '(auto implied): epoch 2/2, step 2/4') in capsys.readouterr().out
    assert_same_run(train_small_reference, out)

    # Another torchrun, restarted, without --resume: a fresh start, as its command says.
    monkeypatch.setenv('TORCHELASTIC_RUN_ID', 'second-torchrun')
    _train_send_at_step(monkeypatch, {1: signal.SIGTERM})
    assert train_cli(TRAIN_SMALL + ['--output-dir', str(out), '--seed', '1']) == 75
    printed = capsys.readouterr().out
    assert 'resumed from' not in printed
    assert (f'note: 2 checkpoint(s) of an earlier run in {out} are not continued, and this '
            "run's saves replace them (recovery_e0002_i000000000.pth, "
            'recovery_e0001_i000000024.pth)') in printed
    # Its first save removed the first run's recovery checkpoints; --resume auto continues it.
    assert [os.path.basename(p) for p in recovery.recovery_files(str(out))] == [
        'recovery_e0000_i000000008.pth']
    monkeypatch.delenv('TORCHELASTIC_RUN_ID')
    monkeypatch.delenv('TORCHELASTIC_RESTART_COUNT')

    # A fresh start that failed before its first save leaves the folder's checkpoints to the
    # run before it: --resume auto starts afresh instead of continuing that other run.
    other = tmp_path / 'other'
    shutil.copytree(train_small_reference, other)
    finite_loss = train.training_loss
    monkeypatch.setattr(train, 'training_loss', lambda *a: finite_loss(*a) * float('nan'))
    assert train_cli(TRAIN_SMALL + ['--output-dir', str(other), '--seed', '1']) == 1
    monkeypatch.setattr(train, 'training_loss', finite_loss)
    _train_send_at_step(monkeypatch, {1: signal.SIGTERM})
    capsys.readouterr()
    assert train_cli(TRAIN_SMALL + ['--output-dir', str(other), '--seed', '1',
                                      '--resume', 'auto']) == 75
    printed = capsys.readouterr().out
    assert 'note: 3 checkpoint(s) of an earlier run' in printed and 'starting from scratch' in printed
    assert [os.path.basename(p) for p in recovery.recovery_files(str(other))] == [
        'recovery_e0000_i000000008.pth']


def test_train_agree_every_k_steps_stops_on_a_signal_within_k_and_never_saves_a_nan(
        tmp_path, capsys, monkeypatch):
    # --agree-every 3 (a GPU's default is the print interval): the ranks read the stop flags and
    # the divergence check after steps 3, 6, ... only, so a signal during step 1 stops the run
    # after step 3, where the recovery checkpoint is written.
    args = TRAIN_TINY + ['--batch-size', '8', '--builtin-train', '64', '--builtin-val', '8',
                          '--epochs', '1', '--save-every-steps', '0', '--agree-every', '3']
    out = tmp_path / 'out'
    _train_send_at_step(monkeypatch, {1: signal.SIGTERM})
    assert train_cli(args + ['--output-dir', str(out)]) == 75
    assert [os.path.basename(p) for p in recovery.recovery_files(str(out))] == [
        'recovery_e0000_i000000024.pth']
    # A non-finite loss from step 2 on stops the run at the agreement after step 3, names step 2,
    # and nothing is saved: the weights stepped with it never reach a checkpoint.
    nan_out = tmp_path / 'nan'
    finite_loss, calls = train.training_loss, [0]

    def loss(*a):
        calls[0] += 1
        return finite_loss(*a) * (float('nan') if calls[0] >= 2 else 1.0)
    monkeypatch.setattr(train, 'training_loss', loss)
    capsys.readouterr()
    assert train_cli(args + ['--output-dir', str(nan_out)]) == 1
    assert capsys.readouterr().err.startswith('error: loss is nan at epoch 1, step 2/8;')
    assert calls[0] == 3
    assert recovery.recovery_files(str(nan_out)) == []
    assert not (nan_out / 'checkpoint.pth').exists()
