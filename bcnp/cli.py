"""What bcnp's command lines share: every failure ends as one `error: ...` line and a non-zero status.

That includes failures of the terminal itself: standard output closed (`>&-`) or full (`> /dev/full`), the
reader gone (`| head`), undecodable bytes in the arguments or on stdin, and a second Ctrl-C while the first is
being handled. `run(main)` is the `if __name__ == "__main__"` of each command.
"""
import argparse
import os
import signal
import sys

from .errors import one_line

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130            # what a shell reports for a command ended by Ctrl-C (128 + SIGINT)


class UsageError(Exception):
    pass


class OutputError(Exception):
    """Standard output cannot be written: closed, or its disk full."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):                  # argparse would print the usage and then the message
        raise UsageError(message)


def error_line(e):
    return f"error: {one_line(e)}\n"


class Output:
    """A text stream for the command's results: each write is flushed at once (a reply streams), and a stream
    that cannot take it raises OutputError naming standard output. BrokenPipeError passes: the reader went
    away, which is no error of ours (`run` stops quietly)."""

    def __init__(self, stream, name="standard output"):
        if stream is None:                     # Python's sys.stdout when file descriptor 1 is closed
            raise OutputError(f"{name} is closed; there is nowhere to write the output")
        self.stream, self.name = stream, name

    def write(self, text):
        try:
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:
            raise
        except (OSError, ValueError) as e:     # ValueError: "I/O operation on closed file"
            raise OutputError(f"cannot write to {self.name} ({getattr(e, 'strerror', None) or e})") from None

    def flush(self):
        pass                                   # every write flushed already


def run(main):
    """sys.exit(main()), where main returns an exit status and prints its own errors."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")          # a terminal that cannot show a character gets '?'
    if sys.stdin is not None and hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")   # a bad byte spoils its own line, not the session
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")
    try:
        status = main()
    except KeyboardInterrupt:                  # a Ctrl-C that main was not in a position to handle
        status = EXIT_INTERRUPTED
    except BrokenPipeError:
        status = EXIT_ERROR
    signal.signal(signal.SIGINT, signal.SIG_IGN)          # leaving: one more Ctrl-C must not print a traceback
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except (OSError, ValueError):
        # Python flushes stdout once more at exit and would report this failure again ("Exception ignored ..."),
        # exit status 120: give it /dev/null to flush into instead.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = status or EXIT_ERROR
    sys.exit(status)
