"""The one exception type whose message is shown to users as it is: what went wrong and how to fix it."""


class UserError(Exception):
    """Bad input from the user (a file, an option, a model name). The CLI prints the message, no traceback."""


class NonFiniteError(UserError):
    """A loss or gradient norm became NaN or inf: the run stops before the optimizer step, so the weights and the
    last checkpoint stay as they were."""
