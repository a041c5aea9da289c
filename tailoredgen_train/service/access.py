"""Who is calling, and what they may see: the one place where the service scopes its data.

A caller is an API token (its id, never the token). The service has no organizations yet, so every
token sees every project, dataset and model (the API's rule since it began), and a model generates
only for the token that trained it. Organizations add a field to `Caller` and one filter in `scope`
and `sees`: the shared service functions (datasets.py, models.py, generation_requests.py) and
every console query go through them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import Select

from .db import Dataset, Model, Project

S = TypeVar("S", bound=Select)


@dataclass(frozen=True)
class Caller:
    token_id: str
    """auth.token_id of the caller's token: what logs, `Model.owner` and `GenerationRequest.owner` hold."""

    def scope(self, statement: S) -> S:
        """A query on projects, datasets or models, limited to what this caller may see: today all of it."""
        return statement

    def sees(self, row: Project | Dataset | Model) -> bool:
        """Whether this caller may see one project, dataset or model: today every one."""
        return True

    def may_generate_with(self, model: Model) -> bool:
        """A model generates only for the token that started its training (others get a 404)."""
        return model.owner is None or model.owner == self.token_id
