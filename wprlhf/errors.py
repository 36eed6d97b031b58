"""The exception type whose message is shown to users as it is (what went wrong and how to fix it), and the number
check every config shares."""


class UserError(Exception):
    """Bad input from the user (a file, an option, a model name). The CLI prints the message, no traceback."""


class NonFiniteError(UserError):
    """A loss or gradient norm became NaN or inf: the run stops before that optimizer step, so no NaN or inf
    reaches the weights and the last checkpoint stays as it was (a trainer kept in memory holds the updates made
    before that step: the step's earlier minibatches, and in PPO with a separate value model the policy's own)."""


# A constant predictor at or above this on a test set makes any accuracy there look good for no reason.
DEGENERATE_BASELINE = 0.9


def warn_if_degenerate(baseline: float | None, predictor: str, where: str, fix: str) -> None:
    """Warn (stderr) when a constant predictor (`predictor`: 'always picking the same position', 'always predicting
    the majority class') scores >= DEGENERATE_BASELINE on the set `where`: there, a near-perfect accuracy says
    little. `fix` says how to balance the set."""
    import sys

    if baseline is not None and baseline >= DEGENERATE_BASELINE:
        print(f"warning: on {where}, {predictor} already scores {baseline:.3f}: the set is nearly one-sided, so an "
              f"accuracy near 1 there says little; balance it ({fix}) before quoting it", file=sys.stderr)


def _check_kind(name: str, flag: str, declared: str, value) -> None:
    """UserError for a config file's value of the wrong kind in a bool or str field (a YAML 'no' in quotes, a list
    for a name), which would otherwise pass as truthy or fail deep inside a phase."""
    if declared == "bool" and not isinstance(value, bool):
        raise UserError(f"{name} must be true or false, got {value!r}; set {flag} / --no-{flag[2:]} (or {name}: "
                        "true/false, unquoted, in the config file)")  # fmt: skip
    if declared == "str" and (value is None or isinstance(value, (bool, int, float, list, dict))):
        raise UserError(f"{name} must be text, got {value!r}; set {flag} (or {name} in the config file, quoted)")


def check_numbers(config, non_negative: tuple[str, ...] = ()) -> None:
    """The check every config dataclass's __post_init__ starts with: UserError for a float field that is NaN or
    inf (a NaN passes every range check, then reaches the weights or a JSON file we write), or negative where
    `non_negative` names it (a negative learning rate would run the update backwards)."""
    import dataclasses
    import math

    section = getattr(config, "SECTION", "")  # a section of a larger config: its flags are --SECTION-...
    for field in dataclasses.fields(config):
        value, flag = getattr(config, field.name), "--" + f"{section}_{field.name}".strip("_").replace("_", "-")
        name = f"{section}.{field.name}" if section else field.name
        declared = str(field.type)  # 'float', 'int | None', ... (annotations are strings in wprlhf)
        _check_kind(name, flag, declared, value)
        if declared.split(" | ")[0] in ("float", "int") and not (value is None and "None" in declared):
            # A config file can hold any JSON/YAML value: "abc", true or [1] for a number would fail later, deep
            # inside a comparison, or pass as 1.0 (a bool is an int to Python).
            wanted = (int, float) if declared.startswith("float") else (int,)
            if isinstance(value, bool) or not isinstance(value, wanted):
                kind = "a number" if declared.startswith("float") else "a whole number"
                # YAML 1.1 reads 1e-5 (no dot) as text.
                hint = "; YAML reads 1e-5 as text, write 1.0e-5" if isinstance(value, str) and "e" in value.lower() else ""
                raise UserError(f"{name} must be {kind}, got {value!r}; set {flag} (or {name} in the "
                                f"config file) to one{hint}")  # fmt: skip
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{name} must be a finite number, got {value}; set {flag} to a finite number")
        if field.name in non_negative and value is not None and value < 0:
            raise UserError(f"{name} must be >= 0, got {value}; set {flag} to 0 or more")


def check_at_least(config, lows: dict[str, int | float]) -> None:
    """UserError for the first field of `config` below its low bound ({field: bound}), naming its flag: --FIELD, or
    --SECTION-FIELD for a section of a larger config (its SECTION, as `check_numbers` names them)."""
    section = getattr(config, "SECTION", "")
    for name, low in lows.items():
        if getattr(config, name) < low:
            flag = "--" + f"{section}_{name}".strip("_").replace("_", "-")
            raise UserError(f"{f'{section}.' if section else ''}{name} must be >= {low}, got {getattr(config, name)}; "
                            f"set {flag} to {low} or more")  # fmt: skip
