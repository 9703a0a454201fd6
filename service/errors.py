"""Errors raised for bad user input outside the bitstream layer (options, paths, limits)."""


class UserError(Exception):
    """A problem the user can fix; ``str(err)`` is a one-line message."""
