"""The one exception type the library raises for bad input, so callers can catch it in one place."""


class GRUNError(ValueError):
    """Bad input to grun_fast: the message names the problem; nothing was modified."""
