"""The errors a user can act on, one hierarchy: the CLI prints them as they are (no traceback) and
exits with their status. 2: the input was wrong (a profile, an argument); 1: the work failed.

The on-device dataplane (appliance.dataplane) has its own ConfigError: it runs with the standard
library only, apart from this package, and its errors go to the journal, never to this CLI."""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_INVALID = 2


class ApplianceError(Exception):
    """A failure the user can act on: printed as one line, exit status 1."""

    exit_code = EXIT_FAILED


class InputError(ApplianceError):
    """Wrong input (a profile, an argument): exit status 2."""

    exit_code = EXIT_INVALID


class LabError(ApplianceError):
    """A test lab (namespaces, a VM) did not come up or did not answer: not a verdict on the image."""
