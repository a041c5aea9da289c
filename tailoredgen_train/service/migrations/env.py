"""Alembic's environment: always called through `migrations.upgrade` (or `db revision`), which hands
over a connection already inside a transaction (and holding the migration lock)."""

from alembic import context

from tailoredgen_train.service.db import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `tailoredgen-train db upgrade` (there is no alembic.ini)")
# batch mode: SQLite cannot ALTER most things; alembic rebuilds the table there, and ALTERs elsewhere
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  compare_type=True)
with context.begin_transaction():
    context.run_migrations()
