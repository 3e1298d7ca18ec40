"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class LmforgeError(Exception):
    """A user-facing error: bad input, a missing file, an unsupported case.

    The message must name the file or field and the cause, because the CLI prints it alone,
    without a traceback.
    """


def check_counts(config, *, at_least_0: tuple[str, ...] = (), at_least_1: tuple[str, ...] = ()) -> None:
    """Refuse a config's integer options below their floor, naming the flag (`max_tokens` ->
    `--max-tokens`): a negative count is never a setting, however the code downstream would read it."""
    for names, floor in ((at_least_0, 0), (at_least_1, 1)):
        for name in names:
            value = getattr(config, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < floor:
                raise LmforgeError(f"--{name.replace('_', '-')} must be an integer >= {floor}, got {value!r}")
