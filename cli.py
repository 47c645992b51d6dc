"""The command line the scripts share: how a run ends, and the checks of their flags.

    UserError ... Stopped, EXIT_*   what ends a run: one line on stderr and an exit status
    cli                             parse the flags, run main, turn those errors into the line
                                    and the status
    HelpFormatter                   --help with the real defaults ("the recipe's" for None)
    Limit, check_limits             the interval each numeric flag must lie in, checked before
                                    anything is written

Exit statuses: 0 done, 1 diverged (or a crash), 2 bad input or an output folder another run
holds, 74 a checkpoint or log could not be written, 75 stopped by a signal (or because torchrun
has gone) with the state saved (the same command with --resume auto continues).

Imports the standard library and distributed.py (the process group a run leaves behind).
"""
import argparse
import math
import os
import sys
from typing import NamedTuple

import torch.distributed as dist

from distributed import in_group


class UserError(Exception):
    """A problem with the user's input: reported as one line on stderr, exit status 2."""


class TrainingDiverged(Exception):
    """The loss became NaN / inf: reported as one line on stderr, exit status 1."""


class SaveFailed(Exception):
    """A checkpoint, log or configuration file could not be written (disk full, read-only
    folder): one line on stderr, exit status EXIT_SAVE_FAILED."""


class Stopped(Exception):
    """SIGTERM / SIGUSR1 stopped training after a recovery checkpoint was written: one line on
    stderr saying how to continue, exit status EXIT_STOPPED."""


# sysexits.h codes, so that a batch script can tell "run me again" from "fix something first".
EXIT_SAVE_FAILED = 74   # EX_IOERR
EXIT_STOPPED = 75       # EX_TEMPFAIL: preempted, state saved; the same command with --resume auto
EXIT_STATUS = {UserError: 2, TrainingDiverged: 1, SaveFailed: EXIT_SAVE_FAILED,
               Stopped: EXIT_STOPPED}


def launcher_rank():
    """This process's rank as torchrun gives it (RANK; 0 without torchrun), known before the
    process group exists."""
    return int(os.environ.get('RANK', '0'))


def cli(main_fn, parser, argv=None):
    """Parse argv, run main_fn(args); user errors become `error: ...` on stderr and exit 2.

    The other exceptions of EXIT_STATUS end the same way (one line from rank 0) with their own
    status: 1 diverged, 74 a file could not be written, 75 stopped by a signal (resumable).
    """
    def one_line_error(message):
        sys.stderr.write(f'error: {message}\n')
        sys.exit(2)
    parser.error = one_line_error   # argparse would print the whole usage block first
    args = parser.parse_args(argv)
    status = 0
    try:
        main_fn(args)
    except tuple(EXIT_STATUS) as e:
        status = EXIT_STATUS[type(e)]
        if launcher_rank() == 0:   # every rank sees the same input: one line is enough
            sys.stderr.write(f'{"" if isinstance(e, Stopped) else "error: "}{e}\n')
    finally:
        if in_group():
            dist.destroy_process_group()
    if status:
        sys.exit(status)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows real defaults; a None default means "the recipe's" and its help says so."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


# ----------------------------------------------------------------------------------------------
# Valid ranges of the numeric flags, checked in one place before anything is written

class Limit(NamedTuple):
    """The interval a numeric flag must lie in (None: unbounded; an open end is excluded).
    NaN and infinities never pass."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def admits(self, value):
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or value < self.high or (not self.high_open
                                                            and value == self.high)

    def __str__(self):
        def number(x):
            return str(int(x)) if float(x).is_integer() else f'{x:g}'
        if self.high is None:
            if self.low == 0 and self.low_open:
                return 'positive'
            return f"{'>' if self.low_open else '>='} {number(self.low)}"
        return (f"in {'(' if self.low_open else '['}{number(self.low)}, {number(self.high)}"
                f"{')' if self.high_open else ']'}")


POSITIVE = Limit(0, low_open=True)
NON_NEGATIVE = Limit(0)
# Seeds feed torch.Generator.manual_seed(seed + epoch), which takes at most a signed 64-bit value;
# 32 bits are the range every seeding API accepts.
SEED = Limit(0, 2 ** 32 - 1)


def check_limits(values, limits):
    """UserError naming the first flag whose value lies outside its Limit. `values` maps argparse
    destinations to values (vars(args) or a resolved configuration); None means "not given" and
    passes; a list is checked item by item."""
    for key, limit in limits.items():
        value = values.get(key)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None and not limit.admits(item):
                raise UserError(f'--{key.replace("_", "-")} must be {limit}, got {item}')
