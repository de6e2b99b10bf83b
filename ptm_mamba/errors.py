"""The one exception type for mistakes a user can fix (bad input, bad config).

The CLI prints such an error as a single line on stderr and exits with
status 2, without a traceback. Anything else is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """A user-facing error: the message names the file, row, key or value."""
