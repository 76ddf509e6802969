"""Error types and the process exit codes they map to.

Release pipelines read the exit code of `compress run` / `compress verify`, so the mapping
is part of the public interface (documented in README.md):

    0  shipped (or: the command succeeded)
    1  internal failure (a bug, or an environment problem we did not anticipate)
    2  bad input: recipe, model source, data directory, artifact
    3  rejected by the gate
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_REJECTED = 3
EXIT_INCONCLUSIVE = 4  # the gate could not decide with the items it had: not shipped
VERDICT_EXIT = {"ship": EXIT_OK, "reject": EXIT_REJECTED, "inconclusive": EXIT_INCONCLUSIVE}


class CompressError(Exception):
    """Base class for errors we raise on purpose; carries its exit code."""

    exit_code = EXIT_INTERNAL


class BadInputError(CompressError):
    """The user gave us something we cannot work with. Raised before long work starts."""

    exit_code = EXIT_BAD_INPUT


class RecipeError(BadInputError):
    """A recipe file that does not parse or validate."""


class ModelSourceError(BadInputError):
    """A model source that does not exist or cannot be loaded."""


class DataError(BadInputError):
    """A calibration or evaluation data source that is missing or too small."""


class PreflightError(BadInputError):
    """A stage that cannot be applied to the model (names the layers at fault). `field` is the
    stage setting at fault, when one is (`group_size`), so the error can name its path
    (`stages[1].group_size`)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ArtifactError(BadInputError):
    """An artifact directory that is missing, incomplete or does not match its manifest."""
