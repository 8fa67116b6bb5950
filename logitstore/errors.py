"""Errors a user can cause. Each message says what went wrong and what to do about it.

The CLI prints them without a traceback; the server maps them to 4xx responses.
"""


class LogitStoreError(Exception):
    """Base class of every error logitstore raises on bad input or a bad store."""


class NotAStoreError(LogitStoreError):
    """The path or URL does not hold a logitstore store."""


class FormatVersionError(LogitStoreError):
    """The store was written in a format version this reader does not know."""


class MetadataError(LogitStoreError):
    """The store's metadata is missing fields or inconsistent."""


class TemperatureNotCapturedError(LogitStoreError):
    """A temperature was asked for whose log-normalizer was not captured."""


class CorruptDataError(LogitStoreError):
    """A chunk is missing or fails its checksum; the message names the array and token range."""


class CorpusError(LogitStoreError):
    """The corpus cannot be read; the message names the file and the line or row."""


class TeacherError(LogitStoreError):
    """The teacher cannot be loaded."""


class StoreExistsError(LogitStoreError):
    """The output store already exists and would be overwritten."""
