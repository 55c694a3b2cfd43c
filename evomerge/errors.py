"""The one exception type users see: its message is printed as a single line, no traceback."""


class EvomergeError(Exception):
    """A problem with the user's input or environment, explained in one line that says how to fix it."""
