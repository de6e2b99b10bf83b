"""The exception type for mistakes a user can fix (bad input, bad config), and the stop on a signal.

The CLI prints such an error as a single line on stderr and exits with
status 2, without a traceback. Anything else is a bug and keeps its traceback.
"""


def one_line(message: object, limit: int = 200) -> str:
    """``str(message)`` (an exception's, say) on one line, cut to ``limit`` characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class PipelineError(Exception):
    """A user-facing error: the message names the file, row, key or value."""


class StopRequested(Exception):
    """A long stage saved its exact state on a signal (SIGTERM, SIGUSR1, SIGINT) and stopped.

    The CLI prints the message as one line and exits with 128 + the signal's number, as if the
    signal had ended the process, so Snakemake and SLURM count the job as failed (and can
    resubmit it); running the same command again continues where it stopped.
    """

    def __init__(self, signum: int, step: int, state_path):
        import signal

        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; the state is saved in "
                         f"{state_path}: run the same command again to continue exactly there")
