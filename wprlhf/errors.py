"""The one exception type whose message is shown to users as it is: what went wrong and how to fix it."""


class UserError(Exception):
    """Bad input from the user (a file, an option, a model name). The CLI prints the message, no traceback."""
