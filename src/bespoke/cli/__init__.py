"""The `bespoke` command (DESIGN §5): one module per subcommand, each with `register(subparsers)`.

    bespoke demo                                  the main job on the bundled model
    bespoke gt     --model SPEC --num N --out GT_DIR
    bespoke train  --model SPEC --solver bns --nfe 4,8 --out FILE
    bespoke sample --model SPEC --solver NAME_OR_FILE --nfe N --num N --out OUT.safetensors [--grid PNG]
    bespoke eval   --model SPEC --solvers A,B,FILE --nfe 4,8,16 [--json OUT.json] [--plot PNG]
    bespoke info   FILE
    bespoke export FILE --nfe N --format timesteps|sigmas|json

Exit codes: 0 success; 2 bad input (one line `bespoke: error: ...` on stderr); 1 internal error
(one line; the traceback too when BESPOKE_DEBUG=1).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import traceback
import warnings

import bespoke
from bespoke import BespokeError

from .. import distributed
from . import demo, evaluate, export, gt, info, sample, train
from .common import Parser, device, print_error

__all__ = ["main", "build_parser"]

COMMANDS = (demo, gt, train, sample, evaluate, info, export)
# what Ctrl-C leaves behind, per command, and how to go on from there
INTERRUPTED = {
    "gt": "the shards solved so far are kept; run the same command again to resume",
    "train": "the checkpoints in OUT.ckpt/ are kept; run the same command with --resume to continue",
    "demo": "finished steps are cached under OUT/cache/; run the same command again to resume",
}


def build_parser() -> Parser:
    parser = Parser(
        prog="bespoke", description="Learned few-step ODE solvers for pre-trained diffusion and flow models."
    )
    parser.add_argument("--version", action="version", version=f"bespoke {bespoke.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.register(sub)
    return parser


def _join_process_group(args) -> None:
    """Under torchrun (WORLD_SIZE > 1) `gt` and `train` run on every rank; rank 0 alone prints and writes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if args.command not in ("gt", "train"):
        raise BespokeError(f"bespoke {args.command} runs in one process; only gt and train run under torchrun")
    distributed.init_from_env(device(args.device))
    if not distributed.is_main():
        args.quiet = True
        sys.stdout = open(os.devnull, "w")  # for the life of the process


def _log_to_stderr(quiet: bool) -> None:
    """The library's informative lines (e.g. sampler options a diffusers config sets and we ignore)
    as `bespoke: ...` on stderr, unless --quiet."""
    log = logging.getLogger("bespoke")
    log.handlers = [h for h in log.handlers if not getattr(h, "_bespoke_cli", False)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("bespoke: %(message)s"))
    handler._bespoke_cli = True
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (`kill`, a scheduler's time limit) is handled like Ctrl-C, so that temporary files are removed
    and the message says what was kept; the previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _warnings_as_lines():
    """Warnings (a solver file used with --force, ...) as one line `bespoke: warning: ...` on stderr, without
    the Python source line; the previous display is restored afterwards."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"bespoke: warning: {' '.join(str(message).split())}", file=sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 bad input, 1 internal error)."""
    with _terminate_as_interrupt(), _warnings_as_lines():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = None
    try:
        args = parser.parse_args(argv)
        _join_process_group(args)
        _log_to_stderr(quiet=getattr(args, "quiet", False))
        return args.func(args)
    except SystemExit as e:  # argparse: --help/--version (0) or a usage error (2, already printed)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    except BespokeError as e:
        if os.environ.get("BESPOKE_DEBUG") == "1":
            traceback.print_exc()
        print_error(str(e))
        return 2
    except BrokenPipeError:  # the reader of stdout went away (`bespoke info F | head`): stop quietly
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the interpreter's final flush cannot fail
        return 141
    except KeyboardInterrupt:
        what = INTERRUPTED.get(getattr(args, "command", None), "nothing was written")
        print(f"bespoke: interrupted ({what})", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("BESPOKE_DEBUG") == "1":
            traceback.print_exc()
        message = " ".join(f"{type(e).__name__}: {e}".split())
        print(f"bespoke: internal error: {message} (set BESPOKE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
