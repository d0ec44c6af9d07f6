"""Learning algorithms: dataset selection, SSR rehearsal selection, gradient masking."""

from __future__ import annotations

from app.artifacts import is_valid_id

__all__ = ["check_folder_id"]


def check_folder_id(value: str | None) -> str | None:
    """A pydantic validator's body for the ids that name a job's output folder (datasets,
    rehearsal sets, sweeps): None, or 1-128 letters, digits, '.', '_' or '-' from a letter or digit.

    Raises:
        ValueError: any other name (it could leave the folder it is meant for).
    """
    if value is not None and not is_valid_id(value):
        raise ValueError("use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit (a folder name)")
    return value
