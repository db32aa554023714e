"""Exception types shared by every module.

Library code raises these with a one-line message that names the file or value, the problem and the fix;
the CLI turns any of them into that line on stderr and exit code 2 (bad input), never a traceback.
"""

import reprlib


class FmnistError(Exception):
    """Base of every error fmnist raises for a user's mistake or bad input."""


class DatasetError(FmnistError):
    """The dataset could not be found, read or trusted."""


class DatasetNotFoundError(DatasetError):
    """No dataset files where we looked."""


class DataFormatError(DatasetError):
    """An IDX/CSV file is malformed: bad magic, dimensions, length, labels or compression."""


class ChecksumError(DatasetError):
    """A file's content does not match its published checksum."""


class DownloadError(DatasetError):
    """Downloading the dataset failed after all retries."""


class ModelFileError(FmnistError):
    """A model file is missing, truncated, not a model, or from another architecture."""


class UntrustedCodeError(ModelFileError):
    """A run folder or config names Python code (a custom network) and the caller did not allow importing it:
    importing a module runs it, so fmnist does so only with `trust_code=True` (CLI `--trust-code`)."""


class ConfigError(FmnistError):
    """A preset, flag or configuration value is invalid."""


class ImageError(FmnistError):
    """An input image could not be read or is unusable."""


def did_you_mean(word: object, choices: object) -> str:
    """`; did you mean 'x'?` for the closest of `choices`, or "" when nothing is close: the one spelling hint."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(choice) for choice in choices], n=1)  # type: ignore[attr-defined]
    return f"; did you mean {close[0]!r}?" if close else ""


_SHORT = reprlib.Repr()  # Python 3.11's Repr takes no keyword arguments
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 40, 40


def short_repr(value: object, limit: int = 80) -> str:
    """A value as an error message echoes it: a repr of at most `limit` characters, computed at bounded cost, so a
    hostile file (a 5,000-character description, an alias-expanded YAML) gives a one-line message, not a page."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
