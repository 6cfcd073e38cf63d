"""Typed errors shared by every layer; the CLI maps them to exit codes."""


class NestvirtError(Exception):
    """Base of every error the harness raises on purpose."""


class UsageError(NestvirtError):
    """Bad input from the user: one line, exit code 2, nothing left running."""


class SetupError(NestvirtError):
    """The host lacks something needed (binary, kernel, module); also exit code 2."""


class StepTimeout(NestvirtError):
    """A bounded wait ran out; carries what was being waited for."""
