"""The bottom layer of errors: imports nothing from cdpo, so every module can subclass from here.

A `UserError` is caused by input, configuration or the state of a run directory, never by a bug:
the entry points (`cdpo/cli.py`) report it as one line, without a traceback, and exit with 2.
"""


class UserError(Exception):
    """Bad input, configuration or run state; the message names the file or key and what to do."""


class ConfigError(UserError, ValueError):
    """A setting outside its allowed range or values (raised before any work, see cdpo/validation.py)."""


class CorruptArtifactError(UserError):
    """An artifact that does not match its marker (truncated, edited, missing) or cannot be read."""


class StaleInputError(UserError):
    """A stage's input was made with other settings than this run's: running it would mix the two."""


class SettingsConflictError(UserError):
    """A method_dir that holds a result of other method settings: a second result would overwrite it."""


class LockError(UserError):
    """The run directory is in use by another job (and lock_timeout_s ran out); `holder` says which."""

    holder = "another job"


class Stopped(BaseException):
    """A signal (SIGTERM, SIGINT, SIGHUP) stopped the run. A BaseException like KeyboardInterrupt, so
    `except Exception` does not swallow it; Lightning's fit re-raises it instead of returning as if done."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# Kept for code that catches a tuple: every user error, plus a missing input file.
USER_ERRORS = (UserError, FileNotFoundError)
