"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class LmforgeError(Exception):
    """A user-facing error: bad input, a missing file, an unsupported case.

    The message must name the file or field and the cause, because the CLI prints it alone,
    without a traceback.
    """
