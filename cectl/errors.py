"""Errors a user can act on; the CLI prints them as one sentence and exits with their code."""


class CectlError(Exception):
    """A failure with a clear message for the user."""

    exit_code = 1


class BadInput(CectlError):
    """Bad usage or bad input: exit code 2."""

    exit_code = 2


class Failure(CectlError):
    """A runtime failure (network down, disk full, ...): exit code 1."""

    exit_code = 1
