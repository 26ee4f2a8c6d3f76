"""The error hierarchy.

Every failure caused by the user's input or configuration raises a subclass of
:class:`HierpipeError`. The CLI prints ``str(error)`` as one line and exits with
status 2; any other exception is a bug in hierpipe and keeps its traceback.
"""

from __future__ import annotations


class HierpipeError(Exception):
    """Base of all user-facing errors; the message is one line for people."""


class InputError(HierpipeError):
    """The data are unusable: missing file or column, bad values, too few groups.

    The message names the file, the column and the row or group at fault.
    """


class ConfigError(HierpipeError):
    """A configuration value or CLI option is wrong."""


class FormulaError(HierpipeError):
    """A model formula cannot be parsed or refers to something absent."""


class MethodError(HierpipeError):
    """A fit method does not apply to the requested model structure."""
