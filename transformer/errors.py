"""The one exception type a user sees.

Anything raised as `TransformerError` is a problem with the user's input (a file, a setting, a checkpoint),
not a bug: the CLI prints its message as a single line and exits non-zero, without a traceback.
"""


class TransformerError(Exception):
    """A user-facing error whose message alone says what went wrong and what to do."""

    label = "error"  # the CLI prints "label: message"
    exit_status = 2
