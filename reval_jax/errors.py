"""The one exception type for mistakes a user can fix (a bad config field, a missing or unreadable
file, an unsupported model, unusable data). The command-line entry points (`reval_jax.run.cli`) print
its message as one line and exit with status 2; anything else is a bug and keeps its traceback."""


class UserError(ValueError):
    """A problem with the user's input, explained in its message (which names what to change)."""
