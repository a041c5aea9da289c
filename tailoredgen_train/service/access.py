"""Who is calling, and what they may see: the one place where the service scopes its data.

A caller is an API token (its id, never the token) of an organization. Every project, dataset and
model belongs to the organization that created it, and another organization's rows do not exist
for a caller: every lookup and list of the API and of the console goes through `scope` and `sees`
(lookups answer 404, lists leave the rows out). A deleted project or dataset (status `deleted`) is
gone for every caller the same way. Images, checkpoints and files are reached through
their dataset or model, so they follow it. Generation requests belong to the organization too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import Select

from .db import Dataset, GenerationRequest, Model, Project

S = TypeVar("S", bound=Select)
DELETED = "deleted"
"""the status of a deleted project or dataset (models keep Bria's `Deleted`, checked where they are read)"""


@dataclass(frozen=True)
class Caller:
    token_id: str
    """auth.token_id of the caller's token: what logs, `Model.owner` and `GenerationRequest.owner` hold."""
    organization: str
    """what `org` of every project, dataset, model and generation request the caller creates holds."""

    def scope(self, statement: S) -> S:
        """A query on projects, datasets, models or generation requests (its first column's table),
        limited to this caller's organization."""
        entity = statement.column_descriptions[0]["entity"]
        if entity not in (Project, Dataset, Model, GenerationRequest):
            raise TypeError(f"Caller.scope does not know how to scope a query on {entity!r}")
        statement = statement.where(entity.org == self.organization)
        return statement.where(entity.status != DELETED) if entity in (Project, Dataset) else statement

    def sees(self, row: Project | Dataset | Model | GenerationRequest) -> bool:
        """Whether this caller may see one project, dataset, model or generation request."""
        return row.org == self.organization and not (isinstance(row, (Project, Dataset)) and row.status == DELETED)
