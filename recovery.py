"""Fault handling of train.py: how a failed run ends, and what lets a run survive a failure.

    read_checkpoint, state_digest
                                 checkpoint files, and the digest that shows damaged bytes
    save_atomic, _publish       writes that leave the old file or the new one, never a part
    recovery_name, find_resume   recovery checkpoints, and what --resume auto continues from
    prepare_output_dir          the output folder at start: damaged checkpoints set aside,
                                 half-written files removed, the log cut back to the resume
    StopSignals                  SIGTERM / SIGUSR1: every rank stops after the same step
    hold_output_dir              one run per output folder: an exclusive lock for the run's life
    watch_launcher, guarded_run  a torchrun worker whose torchrun has died stops as on SIGTERM;
                                 a run's output folders are let go when it ends
    rng_state, set_rng_state     the random states every checkpoint holds, per rank (of a GPU,
    cuda_rng_entry               the rank's own), restored on another device layout
    choose_resume, open_output_dir
                                 the checkpoint a run continues from; the folder set up for it
    TrainingState                what a training checkpoint holds: restored, snapshot, saved
    Checkpointer                 rank 0 saves and rotates the recovery checkpoints; the
                                 save-error policy (--on-save-error stop | warn)

How a run ends (errors and exit statuses) is cli.py's. Imports torch, numpy, the standard
library, cli.py, distributed.py (which rank writes) and rope_vit (whose reader opens checkpoint
files).
"""
import contextlib
import errno
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
import zlib
from typing import NamedTuple

try:
    import fcntl
except ImportError:   # Windows: no POSIX locks, output folders are not locked (see hold_output_dir)
    fcntl = None

import numpy as np
import torch

import rope_vit
from cli import EXIT_STOPPED, SaveFailed, Stopped, UserError, launcher_rank
from distributed import broadcast_from_rank0, gather, is_main_process, print0


# ----------------------------------------------------------------------------------------------
# Rank 0 writes; every rank decides alike

def on_rank0(action, device):
    """Run action() on rank 0 only. Returns None on every rank when it worked, else the one-line
    reason of its OSError (a generic one on the other ranks): all ranks decide alike. Any other
    exception is raised again on rank 0 after the others were told, so that none waits forever."""
    error, crash = None, None
    if is_main_process():
        try:
            action()
        except OSError as e:
            error = f'cannot write {e.filename}: {e.strerror}' if e.filename else str(e)
        except BaseException as e:
            error, crash = f'{type(e).__name__} while writing', e
    failed = broadcast_from_rank0(torch.tensor([float(error is not None)], device=device))
    if crash is not None:
        raise crash
    if failed.item() and error is None:
        error = 'rank 0 could not write to the output folder'
    return error


# ----------------------------------------------------------------------------------------------
# Checkpoint files and their digests

def read_checkpoint(path):
    """The model file's reader (torch.load(weights_only=True) on CPU, or the tensors of a
    .safetensors file such as timm's hub copies); UserError for a missing / corrupt file."""
    if not os.path.isfile(path):
        raise UserError(f'checkpoint {path} does not exist')
    try:
        return rope_vit.read_checkpoint_file(path)
    except ValueError as e:   # pickle, zip, unpickler and safetensors errors: not a usable file
        raise UserError(str(e).strip().splitlines()[0]) from None


def digest_matches(checkpoint):
    """False when a checkpoint of ours no longer matches the digest it was written with (damaged
    bytes, or edited and saved again); True otherwise, and for files without one."""
    if not (isinstance(checkpoint, dict) and 'digest' in checkpoint):
        return True
    return state_digest({k: v for k, v in checkpoint.items() if k != 'digest'}) \
        == checkpoint['digest']


def _read_training_state(path):
    """A sound training checkpoint of train.py from `path`, or ValueError with a short reason."""
    try:
        state = read_checkpoint(path)
    except UserError as e:
        raise ValueError(str(e).split(': ', 1)[-1]) from None
    if not isinstance(state, dict) or any(k not in state for k in _TRAINING_KEYS):
        raise ValueError('not a training checkpoint of train.py')
    if not digest_matches(state):
        raise ValueError('its content does not match its digest: damaged bytes')
    return state


def unwrap_state_dict(checkpoint):
    """The state dict inside `{'model': sd}` (published files, our checkpoints) or
    `{'state_dict': sd}`; a bare state dict is returned as it is."""
    for key in ('model', 'state_dict'):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def state_digest(obj, crc=0):
    """CRC-32 of a checkpoint's content: every tensor's dtype, shape and bytes, every other value's
    repr, in order. torch.load accepts a file whose tensor bytes were overwritten; a digest
    stored with the file tells such a file from a sound one."""
    if isinstance(obj, torch.Tensor):
        flat = obj.detach().cpu().contiguous().reshape(-1)
        crc = zlib.crc32(f'{flat.dtype}{tuple(obj.shape)}'.encode(), crc)
        return zlib.crc32(flat.view(torch.uint8).numpy(), crc)
    if isinstance(obj, dict):
        crc = zlib.crc32(f'{{{len(obj)}'.encode(), crc)
        for key, value in obj.items():
            crc = state_digest(value, state_digest(key, crc))
        return crc
    if isinstance(obj, (list, tuple)):
        crc = zlib.crc32(f'[{len(obj)}'.encode(), crc)
        for value in obj:
            crc = state_digest(value, crc)
        return crc
    return zlib.crc32(repr(obj).encode(), crc)


# ----------------------------------------------------------------------------------------------
# Atomic writes: a crash or a failed write leaves the old file or the new one, never a part

def _fsync_dir(path):
    """Make a rename in path's folder durable: after a node crash the folder may otherwise
    still list the old file, or none."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass   # some file systems cannot sync a folder; the rename is atomic all the same
    finally:
        os.close(fd)


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def _write_temporary(obj, path):
    """Write obj to path + '.tmp' and fsync it; returns that name. On failure nothing is left
    behind and the OSError names `path`.

    .json: obj as JSON; .jsonl: a list of records, one per line; anything else: torch.save.
    """
    tmp = f'{path}.tmp'
    try:
        with open(tmp, 'w' if path.endswith(('.json', '.jsonl')) else 'wb') as f:
            if path.endswith('.jsonl'):
                f.writelines(json.dumps(record) + '\n' for record in obj)
            elif path.endswith('.json'):
                json.dump(obj, f, indent=2)
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        _remove_quietly(tmp)
        # torch.save's zip writer answers a failed write (ENOSPC, EFBIG) with a RuntimeError
        # of its own while closing; the OSError is in the exception's context.
        while e is not None and not isinstance(e, OSError):
            e = e.__cause__ or e.__context__
        if e is None:
            raise
        raise OSError(e.errno, e.strerror or str(e), path) from e
    return tmp


def _commit(tmp, path):
    """Rename a written temporary file onto `path` (atomic) and make the rename durable."""
    try:
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise OSError(e.errno, e.strerror or str(e), path) from e
    _fsync_dir(path)


def save_atomic(obj, path):
    """Write to a temporary name, fsync, rename: a crash or a failed write (disk full, read-only
    folder) leaves the old file or the new one, never a part, and no temporary file behind."""
    _commit(_write_temporary(obj, path), path)


def _publish(source, path):
    """Make `path` the same file as `source`, atomically: a hard link, which costs no second
    write, or a copy on file systems without links."""
    tmp = f'{path}.tmp'
    try:
        _remove_quietly(tmp)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
            with open(tmp, 'rb+') as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise OSError(e.errno, e.strerror or str(e), path) from e
    _fsync_dir(path)


# ----------------------------------------------------------------------------------------------
# Recovery checkpoints and resume discovery (--resume auto)

_RECOVERY_NAME = re.compile(r'recovery_e(\d+)_i(\d+)\.pth')


def recovery_name(epochs_done, images):
    """The recovery checkpoint of the state after `epochs_done` whole epochs and `images` images
    (all ranks together) of the next: recovery_e0003_i000000640.pth. Images rather than steps,
    so that names keep their order when a run is resumed on another world size."""
    return f'recovery_e{epochs_done:04d}_i{images:09d}.pth'


def recovery_files(output_dir):
    """Paths of the recovery checkpoints in output_dir, newest position first."""
    try:
        names = os.listdir(output_dir)
    except OSError:
        return []
    found = [(int(m[1]), int(m[2]), os.path.join(output_dir, name)) for name in names
             if (m := _RECOVERY_NAME.fullmatch(name))]
    return [path for _, _, path in sorted(found, reverse=True)]


def _resume_candidates(output_dir):
    """What --resume auto may continue from, newest first: the recovery checkpoints, then
    checkpoint.pth when it is not a link to one of them (folders of earlier versions)."""
    found = recovery_files(output_dir)
    epoch_end = os.path.join(output_dir, 'checkpoint.pth')
    if os.path.isfile(epoch_end) and not any(os.path.samefile(epoch_end, p) for p in found):
        found.append(epoch_end)
    return found


def _folder_config(output_dir):
    """The config.json of the run that last started in output_dir, or None."""
    try:
        with open(os.path.join(output_dir, 'config.json')) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


class Resume(NamedTuple):
    path: str | None    # None: a fresh start
    state: dict | None
    damaged: list       # [(path, reason)]: newer candidates that could not be read
    others: list        # sound checkpoints of an earlier run in the same folder, not used
    restart: bool       # auto implied by a torchrun restart
    run_id: str | None  # the run this one continues (its checkpoints are the ones auto takes)
    continues: bool     # False: a new run_id (a fresh start, or --resume PATH: a new branch)


_TRAINING_KEYS = ('model', 'optimizer', 'lr_scheduler', 'scaler', 'epoch', 'args')


def _restart_implies_auto(cfg, config):
    """A torchrun restart of the run this same torchrun started in the folder (whose
    config.json is `config`), without --resume auto on its command line."""
    torchrun_id = os.environ.get('TORCHELASTIC_RUN_ID')
    return (int(os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')) > 0
            and cfg['resume'] != 'auto' and torchrun_id is not None
            and config is not None and config.get('torchrun_id') == torchrun_id)


def resumes_from_output_dir(cfg):
    """True when find_resume's answer comes from the output folder's checkpoints (--resume auto,
    or implied by a torchrun restart): a run reads them only once it holds the folder, so that
    no other run writes them meanwhile. Otherwise find_resume reads only --resume PATH (and the
    folder's listing for a note), which a run checks before it writes anything."""
    return cfg['resume'] == 'auto' or _restart_implies_auto(cfg, _folder_config(cfg['output_dir']))


def find_resume(cfg):
    """The checkpoint this run continues from: a Resume, whose path is None for a fresh start.

    --resume PATH reads PATH. --resume auto takes the newest sound checkpoint of the output
    folder that belongs to the run config.json names (its run_id: a run started afresh or from a
    PATH in a used folder does not pick up the checkpoints of the one before), skipping damaged
    files. After a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) of a run this same torchrun
    started, auto is implied: the workers continue from what they saved before the restart.
    """
    config = _folder_config(cfg['output_dir'])
    restart = _restart_implies_auto(cfg, config)
    if cfg['resume'] != 'auto' and not restart:
        state = read_checkpoint(cfg['resume']) if cfg['resume'] is not None else None
        if state is not None and not digest_matches(state) and launcher_rank() == 0:
            sys.stderr.write(f"warning: {cfg['resume']} does not match the digest train.py "
                             'wrote with it (edited since, or damaged bytes)\n')
        others = [p for p in recovery_files(cfg['output_dir'])
                  if state is None or not os.path.samefile(p, cfg['resume'])]
        return Resume(cfg['resume'], state, [], others, False, None, False)
    damaged, others = [], []
    for path in _resume_candidates(cfg['output_dir']):
        try:
            state = _read_training_state(path)
        except ValueError as e:
            damaged.append((path, str(e)))
            continue
        if config is not None and state['args'].get('run_id') != config.get('run_id'):
            others.append(path)
            continue
        return Resume(path, state, damaged, others, restart, state['args'].get('run_id'), True)
    if damaged:
        raise UserError(f"--resume auto: no sound checkpoint in {cfg['output_dir']}; "
                        + '; '.join(f'{p} is damaged ({why})' for p, why in damaged))
    if restart:   # nothing saved since the start: begin again as the first attempt did
        state = read_checkpoint(cfg['resume']) if cfg['resume'] is not None else None
        return Resume(cfg['resume'], state, [], others, True, config.get('run_id'), True)
    return Resume(None, None, [], others, False, None, False)


# ----------------------------------------------------------------------------------------------
# The output folder at the start of a run: the log cut back to the checkpoint resumed from,
# what an interrupted save left behind cleared away

def log_records(output_dir, epochs_done):
    """The records of log.jsonl for the first `epochs_done` epochs: those of epochs a resume
    redoes are dropped, and so are lines an interrupted write of an older version left."""
    records = []
    try:
        with open(os.path.join(output_dir, 'log.jsonl')) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get('epoch', math.inf) <= epochs_done:
                    records.append(record)
    except OSError:
        pass
    return records


def prepare_output_dir(cfg, resume, records):
    """Rank 0, before training: the folder, its configuration and log; damaged recovery
    checkpoints set aside as *.damaged; temporary files of an interrupted save removed."""
    out = cfg['output_dir']
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        if name.endswith('.tmp') and (_RECOVERY_NAME.fullmatch(name[:-4]) or name[:-4] in (
                'config.json', 'checkpoint.pth', 'best.pth', 'log.jsonl', 'resolutions.json')):
            _remove_quietly(os.path.join(out, name))
    for path, _ in resume.damaged:
        if _RECOVERY_NAME.fullmatch(os.path.basename(path)):
            os.replace(path, f'{path}.damaged')
    save_atomic(cfg, os.path.join(out, 'config.json'))
    log_path = os.path.join(out, 'log.jsonl')
    if resume.state is not None:
        save_atomic(records, log_path)
    elif os.path.isfile(log_path):
        os.remove(log_path)   # a fresh run in a used folder starts a fresh log


# ----------------------------------------------------------------------------------------------
# Stop signals

class StopSignals:
    """SIGTERM and SIGUSR1 (a scheduler's preemption and its time-limit warning) only record
    their number; the training loop reads it at step boundaries, where all ranks agree, and
    stops after writing a recovery checkpoint (in the closing evaluation: between resolutions).
    The handler never raises, so a second signal cannot break into that write. Loader workers
    get the signals too (torchrun forwards them to each worker's whole process group, a
    scheduler sends them to every process of the job) and leave them to their rank:
    data.StopSafeLoader."""

    SIGNALS = ('SIGTERM', 'SIGUSR1')

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def _record(self, signum, frame):
        self.signum = self.signum or signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, exc_type, exc, traceback):
        # After a stop the process is on its way out with exit status 75: a scheduler's second
        # SIGTERM (or torchrun's forward of it) must not kill it on the way, so the handlers
        # stay, recording. Otherwise the handlers from before come back.
        if not (exc_type is not None and issubclass(exc_type, Stopped)):
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
        self._previous = {}
        return False


# ----------------------------------------------------------------------------------------------
# One run per output folder

LOCK_NAME = 'run.lock'
# The lock file's real path -> the one descriptor this process holds its lock by. A POSIX lock
# belongs to the process and is dropped when the process closes any descriptor of the file, so
# the file is opened once and never again while held; forked children (loader workers) do not
# inherit the lock, and the kernel drops it when the process ends, however it ends.
_held_locks = {}
_LOCK_HELD = (errno.EAGAIN, errno.EACCES)   # lockf's answers for "another process holds it"


def _holder(fd):
    """What the holder of a lock file wrote into it ({'host', 'pid', 'started'}), or None. The
    holder writes right after taking the lock: an empty or half-written content is read again."""
    for _ in range(10):
        try:
            holder = json.loads(os.pread(fd, 4096, 0))
        except (OSError, ValueError):
            holder = None
        if isinstance(holder, dict):
            return holder
        time.sleep(0.05)
    return None


def _describe(holder):
    if holder is None:
        return 'holder unknown'
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"


def _try_lock(path):
    """(descriptor, None) holding the exclusive lock on `path`, or (None, holder) when another
    process holds it. OSError naming `path` when the file cannot be opened; OSError with
    filename None when the file system offers no locks (ENOLCK, ENOSYS, EOPNOTSUPP, ...)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)   # not inherited by exec'd children
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _holder(fd) if e.errno in _LOCK_HELD else None
        os.close(fd)   # this process holds no lock on the file: closing drops nothing
        if e.errno in _LOCK_HELD:
            return None, holder
        raise OSError(e.errno, e.strerror) from None
    return fd, None


def take_output_dir(output_dir, wait=0.0):
    """Rank 0: lock `output_dir` for the rest of this process's life (the folder is created if
    need be; the lock file's content names this process). Returns None when taken (or when the
    file system has no locks: a warning), else the one-line reason it is not, after waiting up to
    `wait` seconds for the holder to end. OSError when the folder or lock file cannot be written."""
    path = os.path.join(output_dir, LOCK_NAME)
    if os.path.realpath(path) in _held_locks:   # main() again in the same process
        return None
    if fcntl is None:
        sys.stderr.write(f'warning: {output_dir} is not locked: locks need POSIX fcntl, which '
                         'this system lacks; make sure that no other run uses the folder\n')
        return None
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, e.strerror, output_dir) from None
    deadline = time.monotonic() + wait
    waiting = False
    while True:
        try:
            fd, holder = _try_lock(path)
        except OSError as e:
            if e.filename is not None:
                raise
            sys.stderr.write(f'warning: cannot lock {path} ({e.strerror}): this file system '
                             'offers no locks, so nothing keeps a second run out of the folder '
                             '(docs/long-runs.md: one run per output folder)\n')
            return None
        if fd is not None:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            return (f'output folder {output_dir} is in use by another run ({_describe(holder)}); '
                    'wait for it to end or stop it'
                    + (f' (waited {wait:g} s)' if wait else
                       ', or give --wait-for-output-dir SECONDS to wait for it'))
        if not waiting:
            waiting = True
            print(f'waiting up to {wait:g} s for output folder {output_dir}, in use by another '
                  f'run ({_describe(holder)})', flush=True)
        time.sleep(min(1.0, left))
    holder = {'host': socket.gethostname(), 'pid': os.getpid(),
              'started': time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + '\n').encode(), 0)
        os.fsync(fd)   # a client of a network file system shows other nodes synced data only
    except OSError as e:
        os.close(fd)
        raise OSError(e.errno, e.strerror, path) from None
    _held_locks[os.path.realpath(path)] = fd
    return None


def hold_output_dir(output_dir, device, wait=0.0):
    """Every rank, before anything is written: rank 0 locks the output folder for its life and
    tells the others whether it could. A folder another run holds is UserError on every rank
    (exit status 2, nothing written); one that cannot be written is SaveFailed.

    The lock is a POSIX record lock (fcntl) on output_dir/run.lock, taken by global rank 0: one
    process per job, wherever the other ranks run, so it keeps out a second job on any node that
    sees the folder on a file system whose locks reach every node (NFS with its lock service,
    Lustre mounted with -o flock, GPFS, CephFS). The kernel drops it when that process ends,
    however it ends: a torchrun restart or a requeue after a crash takes it again."""
    code, message, crash = 0, None, None
    if is_main_process():
        try:
            message = take_output_dir(output_dir, wait)
            code = 1 if message else 0
        except OSError as e:
            code = 2
            message = f'cannot write {e.filename}: {e.strerror}' if e.filename else str(e)
        except BaseException as e:
            code, crash = 3, e
    decided = broadcast_from_rank0(torch.tensor([float(code)], device=device))
    if crash is not None:
        raise crash
    code = int(decided.item())
    if code == 1:
        raise UserError(message or f'output folder {output_dir} is in use by another run')
    if code:
        raise SaveFailed(message or 'rank 0 could not write to the output folder')


def lock_holder(output_dir):
    """Who holds output_dir's lock ({'host', 'pid', 'started'}; {} when it did not say), or None
    when no process does. A free lock is taken for an instant to find out."""
    path = os.path.join(output_dir, LOCK_NAME)
    fd = _held_locks.get(os.path.realpath(path))
    if fd is not None:
        return _holder(fd) or {}
    if not os.path.exists(path):
        return None
    fd, holder = _try_lock(path)
    if fd is not None:
        os.close(fd)
        return None
    return holder or {}


def release_output_dirs():
    """Drop this process's output folder locks (the end of a run in a process that goes on)."""
    while _held_locks:
        os.close(_held_locks.popitem()[1])


# ----------------------------------------------------------------------------------------------
# Workers that do not outlive their launcher

# The process that started this one, read when train.py imports this module: a watch started
# later compares against it, so a launcher that dies in between is noticed all the same.
_LAUNCHER_PID = os.getppid()
_watch_started = threading.Event()   # set once a watch runs in this process


def watch_launcher(interval=0.5):
    """In a torchrun worker: a daemon thread that sends this process SIGTERM once its torchrun
    is gone, so that it stops as on a preemption (all ranks agree, rank 0 writes a recovery
    checkpoint, exit status 75) instead of training on unsupervised. torchrun starts each worker
    in a session of its own, so a SIGKILL of torchrun alone (the out-of-memory killer, kill -9)
    reaches no worker, and its workers would train on into the folder.

    A dead parent shows as a new parent process id (its orphans are adopted by init or a
    subreaper), which Linux, macOS and the BSDs all report; polled every `interval` seconds.
    PR_SET_PDEATHSIG is not used: it fires when the thread that started the worker exits, not
    only the process. Returns the Event that ends the watch, or None where nothing is watched:
    a process that torchrun did not start, and Windows (whose parent ids never change)."""
    if 'TORCHELASTIC_RUN_ID' not in os.environ or os.name != 'posix':
        return None
    done = threading.Event()

    def watch():
        while not done.wait(interval):
            if os.getppid() != _LAUNCHER_PID:
                os.kill(os.getpid(), signal.SIGTERM)
                return
    _watch_started.set()
    threading.Thread(target=watch, name='watch_launcher', daemon=True).start()
    return done


@contextlib.contextmanager
def guarded_run():
    """Around a run's main: a torchrun worker stops as on SIGTERM once its torchrun is gone
    (watch_launcher); the output folders the run held are let go when it ends, however it
    ends (a caller in the same process may go on)."""
    watch = watch_launcher()
    try:
        yield
    finally:
        if watch is not None:
            watch.set()
        release_output_dirs()


def _launcher_gone():
    """True in a watched torchrun worker whose torchrun has died (the stop line says so)."""
    return _watch_started.is_set() and os.getppid() != _LAUNCHER_PID


def stop_message(signum, epoch, steps_done, steps_per_epoch, cfg, path):
    """The one line a Stopped run ends with: where it stopped, what was saved, how to go on."""
    where = (f"after epoch {epoch + 1}/{cfg['epochs']}" if steps_done == steps_per_epoch else
             f"at epoch {epoch + 1}/{cfg['epochs']}, step {steps_done}/{steps_per_epoch}")
    saved = (f'saved {path}' if path else
             'its recovery checkpoint could not be written (see the warning above)')
    # Rank 0's own torchrun gone: its watch sent the SIGTERM (or another rank's on this node).
    by = (f'because torchrun (pid {_LAUNCHER_PID}) has gone,' if _launcher_gone() else
          f'by {signal.Signals(signum).name}')
    return (f'stopped {by} {where}: {saved}; run the same command with --resume auto to '
            f'continue (exit status {EXIT_STOPPED})')


def sweep_stop_message(signum, cfg):
    """The one line of a run stopped in its closing evaluation across resolutions, after every
    epoch was trained and saved."""
    by = (f'because torchrun (pid {_LAUNCHER_PID}) has gone' if _launcher_gone() else
          f'by {signal.Signals(signum).name}')
    saved = os.path.join(cfg['output_dir'], 'checkpoint.pth')
    return (f'stopped {by} in the closing evaluation across resolutions (training is complete: '
            f'{saved}); run the same command with --resume auto to redo only that evaluation '
            f'(exit status {EXIT_STOPPED})')


# ----------------------------------------------------------------------------------------------
# Random states: saved per rank in every checkpoint, so that a resumed run draws on as the
# uninterrupted one would have

def rng_state():
    """This process's torch / CUDA / numpy / python RNG states, as weights_only-loadable types."""
    np_state = np.random.get_state(legacy=False)
    state = {'torch': torch.get_rng_state(),
             'numpy': {'key': torch.from_numpy(np_state['state']['key'].astype(np.int64)),
                       'pos': int(np_state['state']['pos']),
                       'has_gauss': int(np_state['has_gauss']), 'gauss': float(np_state['gauss'])},
             'python': [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}
    if torch.cuda.is_available():
        # This rank's own device only (init_distributed made it the current one): the one
        # generator it draws from, and a state that maps onto any device layout at resume.
        state['cuda'] = [torch.cuda.get_rng_state()]
    return state


def cuda_rng_entry(saved, device):
    """The index of the entry of a checkpoint's CUDA random states (`saved`, a list) that this
    rank restores on its device `device`, or UserError when none maps onto it.

    One entry (what rng_state saves): the saving rank's own device, restored on this rank's
    whatever the layout (8 GPUs on one node resumed as 2 x 4, or one visible GPU per task).
    Several (earlier versions saved every visible device): the entry of this rank's device
    index, the one it drew from when the layout is the same."""
    if len(saved) == 1:
        return 0
    if device.index < len(saved):
        return device.index
    raise UserError(f"the checkpoint holds the CUDA random states of {len(saved)} devices, none "
                    f"for this rank's {device}: resume on the device layout it was saved on, or "
                    "on one with at least as many GPUs per node")


def set_rng_state(state, device=torch.device('cpu'), set_cuda_state=torch.cuda.set_rng_state):
    """Restore what rng_state() returned (a resumed run draws on as the interrupted one), on a
    rank whose device is `device`; returns what was restored, in words. The CUDA state is
    restored on `device` only (cuda_rng_entry); a rank without a GPU keeps none of it."""
    torch.set_rng_state(state['torch'])
    numpy_state = state['numpy']
    np.random.set_state({'bit_generator': 'MT19937',
                         'state': {'key': numpy_state['key'].numpy().astype(np.uint32),
                                   'pos': numpy_state['pos']},
                         'has_gauss': numpy_state['has_gauss'], 'gauss': numpy_state['gauss']})
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    restored = 'torch (CPU), numpy and python'
    saved = state.get('cuda') or []
    if saved and device.type == 'cuda':
        index = cuda_rng_entry(saved, device)
        set_cuda_state(saved[index], device)
        restored += f', and on {device} the CUDA state of entry {index + 1} of {len(saved)}'
    elif saved:
        restored += f'; not the {len(saved)} CUDA state(s): this process has no GPU'
    return restored


# ----------------------------------------------------------------------------------------------
# Saving the training state, and the save-error policy

class Checkpointer:
    """Writes the training state into the output folder (rank 0) and keeps it consistent.

    Every save, inside an epoch or at its end, is a recovery checkpoint (recovery_name). The
    newest two of this run are kept; the others, including those of an earlier run in the same
    folder, are removed only after a newer one is on disk. At an epoch end checkpoint.pth, and
    best.pth when the accuracy improved, become links to it and log.jsonl gets the epoch's
    record. A failed write leaves the previous files as they were; with --on-save-error stop it
    raises SaveFailed on every rank, with warn rank 0 prints one line and training goes on.
    """

    def __init__(self, cfg, device, previous, records):
        self.cfg, self.device = cfg, device
        self.previous = previous      # the newest recovery checkpoint of this run, if any
        self.records = records        # log.jsonl, one record per finished epoch

    def save(self, state, epoch_end=False, improved=False, record=None):
        """Write `state` (+ its digest); returns its path, or None after a failure in warn mode."""
        out = self.cfg['output_dir']
        path = os.path.join(out, recovery_name(state['epoch'] + 1, state['images']))
        if record is not None:
            self.records.append(record)

        def write():
            tmp = _write_temporary(dict(state, digest=state_digest(state)), path)
            try:
                if epoch_end:
                    # The epoch's other files first, its recovery checkpoint last: a kill in
                    # between resumes from the one before and redoes the epoch identically
                    # (log records of epochs not in the checkpoint are dropped at resume).
                    if improved:
                        _publish(tmp, os.path.join(out, 'best.pth'))
                    save_atomic(self.records, os.path.join(out, 'log.jsonl'))
                    _publish(tmp, os.path.join(out, 'checkpoint.pth'))
                _commit(tmp, path)
            except BaseException:
                _remove_quietly(tmp)
                raise
            keep = {path, self.previous}
            for old in recovery_files(out):
                if old not in keep:
                    _remove_quietly(old)
        error = on_rank0(write, self.device)
        if error is None:
            self.previous = path
            return path
        self.failed(error)
        return None

    def failed(self, error):
        """A write failed (every rank calls this): SaveFailed, or a warning with 'warn'."""
        if self.cfg['on_save_error'] == 'stop':
            raise SaveFailed(f'{error}; the files written before are kept (--on-save-error '
                             'warn reports such a failure and trains on)')
        if is_main_process():
            sys.stderr.write(f'warning: {error}; training goes on (--on-save-error warn)\n')


# ----------------------------------------------------------------------------------------------
# A training run's checkpoints: the one it continues from, and what each one holds

def choose_resume(cfg):
    """The checkpoint this run continues from (find_resume; a Resume whose state is None when
    there is none), checked against this run's model and data."""
    resume = find_resume(cfg)
    if resume.state is not None:
        stored = resume.state.get('args', {})
        for key in ('model', 'model_kwargs', 'dataset'):
            if stored.get(key) != cfg[key]:
                raise UserError(f'--resume {resume.path}: its {key} {stored.get(key)!r} differs '
                                f'from this run\'s {cfg[key]!r}')
    return resume


def open_output_dir(cfg, resume, device):
    """Once this run holds the output folder: check that every rank resumes from the same
    checkpoint, give the run its id (the resumed run's when it continues one), set the folder
    up for it (prepare_output_dir). Returns the log records kept."""
    state = resume.state
    position = (state['epoch'], state.get('images', 0)) if state is not None else None
    chosen = gather((resume.path, position))
    if any(c != chosen[0] for c in chosen):
        raise UserError('the processes would resume from different checkpoints ('
                        + ', '.join(f'rank {r}: {c[0] or "none"}' for r, c in enumerate(chosen))
                        + '); every node must see the same --output-dir')
    new_run_id = gather(uuid.uuid4().hex)[0]
    cfg['run_id'] = resume.run_id if resume.continues else new_run_id
    cfg['torchrun_id'] = os.environ.get('TORCHELASTIC_RUN_ID')
    records = log_records(cfg['output_dir'], state['epoch'] + 1) if state is not None else []
    error = on_rank0(lambda: prepare_output_dir(cfg, resume, records), device)
    if error:
        raise SaveFailed(error)
    return records


class TrainingState:
    """What a training checkpoint holds, and where the run stands: the model, optimizer,
    learning-rate schedule and loss scaler; the last complete epoch, the images seen of the
    next, the best top-1; each rank's random states and, inside an epoch, its loss sums and
    seconds so far. restore() continues from a checkpoint, snapshot() makes one, and
    save_inside_epoch() / save_epoch() write them through the Checkpointer."""

    def __init__(self, cfg, model, optimizer, scheduler, scaler, steps_per_epoch, device, rank,
                 world_size, checkpointer):
        self.cfg, self.model, self.optimizer = cfg, model, optimizer
        self.scheduler, self.scaler = scheduler, scaler
        self.steps_per_epoch, self.device = steps_per_epoch, device
        self.rank, self.world_size, self.checkpointer = rank, world_size, checkpointer
        # where training starts (restore moves it); the loss sums and seconds of its first
        # epoch's steps before it, and this rank's random states there (None: drawn afresh)
        self.start_epoch, self.start_step, self.best_top1 = 0, 0, -1.0
        self.sums, self.seconds, self.rng = None, 0.0, None

    def restore(self, resume, schedule_from_step):
        """Continue from resume.state (nothing to do without one). On the checkpoint's own
        layout (world size, batch, steps per epoch) everything is restored, and the run goes on
        bit-identically; on another one the schedule restarts at the same step
        (schedule_from_step(step) builds it) and the random states are drawn afresh."""
        cfg, state = self.cfg, resume.state
        if state is None:
            if cfg['resume'] == 'auto' or resume.restart:
                print0(f"--resume auto: no checkpoint of this run in {cfg['output_dir']}, "
                       'starting from scratch')
            return
        self.model.load_state_dict(state['model'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.scaler.load_state_dict(state['scaler'])
        self.start_epoch, self.best_top1 = state['epoch'] + 1, state.get('best_top1', -1.0)
        stored = state['args']
        same_layout = (stored.get('world_size') == self.world_size
                       and stored.get('batch_size') == cfg['batch_size']
                       and state.get('steps_per_epoch', self.steps_per_epoch)
                       == self.steps_per_epoch)
        # `images` counts all ranks' samples, so another world size resumes at the same point.
        self.start_step = min(state.get('images', 0) // cfg['total_batch'],
                              self.steps_per_epoch - 1)
        if same_layout:
            self.scheduler.load_state_dict(state['lr_scheduler'])
            self.rng = state['rng'][self.rank]
            # A CUDA random state that does not map onto this rank's device: every rank stops
            # alike, before training, rather than one alone while the others wait for it.
            problem = None
            if self.rng.get('cuda') and self.device.type == 'cuda':
                try:
                    cuda_rng_entry(self.rng['cuda'], self.device)
                except UserError as e:
                    problem = f'--resume {resume.path}: rank {self.rank}: {e}'
            problems = [p for p in gather(problem) if p]
            if problems:
                raise UserError(problems[0])
            if self.start_step:
                self.sums = state['epoch_sums'][self.rank]
                self.seconds = state.get('epoch_seconds', 0.0)
        else:
            done = self.start_epoch * self.steps_per_epoch + self.start_step
            self.scheduler = schedule_from_step(done)
            print0(f"note: the checkpoint was written by {stored.get('world_size')} process(es) x "
                   f"batch {stored.get('batch_size')}, this run has {self.world_size} x "
                   f"{cfg['batch_size']}: the schedule goes on from step {done} of "
                   f"{cfg['epochs'] * self.steps_per_epoch} at lr {cfg['lr']:.4g}; random states "
                   'are drawn afresh (the result differs from an uninterrupted run)')
        how = ('after a torchrun restart (auto implied)' if resume.restart
               else f"(--resume {cfg['resume']})")
        print0(f'resumed from {resume.path} {how}: epoch {self.start_epoch + 1}/{cfg["epochs"]}, '
               f'step {self.start_step}/{self.steps_per_epoch}')

    def first_step(self, epoch):
        """Where `epoch` starts: the resumed step in the first epoch, 0 after. In the first
        epoch of a resumed run this rank's random states are restored as the interrupted run
        left them (call it after seeding the epoch)."""
        if epoch != self.start_epoch:
            return 0
        if self.start_step and self.rng is not None:
            print0(f'random states restored (rank 0): {set_rng_state(self.rng, self.device)}')
        return self.start_step

    def epoch_start_sums(self, epoch):
        """The loss sums and seconds an epoch starts from: the interrupted run's in the first
        epoch of a resumed run, none after."""
        return (self.sums, self.seconds) if epoch == self.start_epoch else (None, 0.0)

    def snapshot(self, epoch, steps_done, sums=None, seconds=0.0, val=None):
        """The training state after `steps_done` steps of `epoch` (all of them: its end)."""
        complete = steps_done == self.steps_per_epoch
        per_rank = gather({'rng': rng_state(),
                           'sums': None if sums is None else sums.detach().cpu().clone()})
        state = {'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(),
                 'lr_scheduler': self.scheduler.state_dict(), 'scaler': self.scaler.state_dict(),
                 'epoch': epoch if complete else epoch - 1,   # the last complete epoch
                 'images': 0 if complete else steps_done * self.cfg['total_batch'],
                 'steps_per_epoch': self.steps_per_epoch, 'args': self.cfg,
                 'best_top1': self.best_top1, 'rng': [r['rng'] for r in per_rank]}
        if complete:
            state['val'] = val
        else:
            state['epoch_sums'] = [r['sums'] for r in per_rank]
            state['epoch_seconds'] = seconds
        return state

    def save_inside_epoch(self, epoch, steps_done, signum, sums, seconds):
        """After a step inside `epoch`: a recovery checkpoint every --save-every-steps steps and
        on a stop signal (signum, agreed by every rank; None after a step without an agreement,
        where nothing may be saved), then Stopped on a signal."""
        if steps_done == self.steps_per_epoch:
            return   # the epoch's own checkpoint follows its evaluation
        every = self.cfg['save_every_steps']
        due = every and (epoch * self.steps_per_epoch + steps_done) % every == 0
        if signum is None:   # no agreement after this step: no decision, no save
            assert not due, 'train_one_epoch agrees before every save'
            return
        if signum or due:
            start = time.time()
            path = self.checkpointer.save(self.snapshot(epoch, steps_done, sums, seconds))
            if path:
                print0(f'saved {os.path.basename(path)} ({time.time() - start:.1f} s)')
            if signum:
                raise Stopped(stop_message(signum, epoch, steps_done, self.steps_per_epoch,
                                           self.cfg, path))

    def save_epoch(self, epoch, val, record, improved, signum):
        """The checkpoint of a finished `epoch` (checkpoint.pth, best.pth when improved, the log
        record), then Stopped on a stop signal (signum, agreed by every rank)."""
        path = self.checkpointer.save(self.snapshot(epoch, self.steps_per_epoch, val=val),
                                      epoch_end=True, improved=improved, record=record)
        if signum:
            raise Stopped(stop_message(signum, epoch, self.steps_per_epoch, self.steps_per_epoch,
                                       self.cfg, path))
