"""The exceptions mmoe-ds raises for bad input, under one base class.

Each message names the problem and the fix; command-line entry points print it in one line and exit
with status 2 instead of a traceback. Errors that stay inside one component (a damaged tar member
the loader skips and counts, say) are defined beside the code that raises and catches them.
"""
from __future__ import annotations


class MmoeError(Exception):
    """Base class: a problem with what the user gave mmoe-ds (files, recipes, folders), not a bug."""


class ConfigError(MmoeError, ValueError):
    """A configuration problem, reported before training starts."""


class UnsafeCheckpointError(ConfigError):
    """A checkpoint file whose pickle would run code (or build a type not on the allow-list) if loaded.

    A `ConfigError`, so the trainer reports it before training like any other bad input."""


class IncompleteCheckpointError(ConfigError):
    """A checkpoint whose files are not all there (or not whole): refused rather than replaced by a
    fresh start or by another checkpoint. A `ConfigError`: the trainer stops before training."""


class NotAnExport(MmoeError, ValueError):
    """The folder is not a complete export; the message names what is missing and the fix."""


class UpcycleError(MmoeError, ValueError):
    """Bad input to `upcycle`: the message names the problem and the fix (one line)."""


class AnalysisInputError(MmoeError, ValueError):
    """The source, the data or the model cannot be analyzed; the message names the problem and the fix."""


class ExperimentError(MmoeError, RuntimeError):
    """A run or a step of an experiment failed; the message names what and where to look."""
