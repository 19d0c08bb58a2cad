"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class UserError(Exception):
    """A problem with the user's input (data, params, environment) that they can fix.

    The message must name the file, class or param at fault and say what to do.
    """
