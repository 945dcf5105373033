"""Apply and check the Alembic migrations from code (``mes db upgrade``, tests), and give the
app's PostgreSQL role what it may do.

Two roles on PostgreSQL: the **owner** runs the migrations and owns every table; the **app
role** (``mes_app`` by default) is what the API and the workers log in as. The app role owns
nothing, so it can neither alter a table nor disable a trigger; it may read and write the
ordinary tables, but only read and append to ``audit_event`` and only move
``audit_chain_head`` forward (its trigger decides how far). SQLite has no roles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from psycopg import errors, sql
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

import migrations
from mes.db import make_engine
from mes.settings import Settings

MIGRATIONS_DIR = Path(migrations.__file__).parent

_ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


@dataclass(frozen=True)
class AppRole:
    """The PostgreSQL role the services run as; with ``password``, ``upgrade`` makes it LOGIN
    with that password (also when it exists), without, it creates it NOLOGIN if missing."""

    name: str
    password: str | None = None

    def __post_init__(self) -> None:
        if not _ROLE_NAME.fullmatch(self.name):
            raise ValueError(
                f"app role {self.name!r}: lower-case letters, digits and _, at most 63 long"
            )


def alembic_config(database_url: str) -> Config:
    """An Alembic config pointing at the shipped migrations and the given database."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation would eat '%' in passwords.
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head", app_role: AppRole | None = None) -> None:
    """Bring the database schema up to ``revision``, as the role of ``database_url`` (the
    owner); then, on PostgreSQL with ``app_role``, create that role if missing and grant it
    what the services need (again after every upgrade, so new tables are covered)."""
    command.upgrade(alembic_config(database_url), revision)
    if app_role is None:
        return
    engine = make_engine(database_url)
    try:
        if engine.dialect.name == "postgresql":
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                _create_role(conn, app_role)
            with engine.begin() as conn:
                _grant(conn, app_role.name)
    finally:
        engine.dispose()


def _run(conn: Connection, query: sql.Composable) -> None:
    conn.exec_driver_sql(query.as_string(conn.connection.driver_connection))


def _create_role(conn: Connection, role: AppRole) -> None:
    owner = conn.exec_driver_sql("SELECT current_user").scalar_one()
    if owner == role.name:
        raise ValueError(
            f"the app role {role.name!r} must not run the migrations: it would own the tables"
        )
    name = sql.Identifier(role.name)
    login = (
        sql.SQL("LOGIN PASSWORD {}").format(sql.Literal(role.password))
        if role.password
        else sql.SQL("NOLOGIN")
    )
    exists = conn.exec_driver_sql(
        "SELECT 1 FROM pg_roles WHERE rolname = %(n)s", {"n": role.name}
    ).first()
    try:
        if exists is None:
            _run(conn, sql.SQL("CREATE ROLE {} {}").format(name, login))
        elif role.password:
            _run(conn, sql.SQL("ALTER ROLE {} {}").format(name, login))
    except DBAPIError as e:
        # Another upgrade created it at the same moment (roles are cluster-wide).
        if not isinstance(e.orig, errors.DuplicateObject | errors.UniqueViolation):
            raise
    powers = conn.exec_driver_sql(
        "SELECT rolsuper OR rolbypassrls, pg_has_role(%(n)s, current_user, 'USAGE') "
        "FROM pg_roles WHERE rolname = %(n)s",
        {"n": role.name},
    ).one()
    if powers[0] or powers[1]:
        raise ValueError(
            f"the app role {role.name!r} is a superuser or a member of the owner "
            f"{owner!r}: it could rewrite the audit trail"
        )


def _grant(conn: Connection, role: str) -> None:
    r = sql.Identifier(role)
    schema = sql.Identifier(conn.exec_driver_sql("SELECT current_schema()").scalar_one())
    for statement in (
        "GRANT USAGE ON SCHEMA {s} TO {r}",
        "REVOKE ALL ON ALL TABLES IN SCHEMA {s} FROM {r}",
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {s} TO {r}",
        "GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {s} TO {r}",
        # The audit trail: read and append; the head moves only as its trigger allows.
        "REVOKE UPDATE, DELETE ON {s}.audit_event FROM {r}",
        "REVOKE INSERT, DELETE ON {s}.audit_chain_head FROM {r}",
        "REVOKE INSERT, UPDATE, DELETE ON {s}.alembic_version FROM {r}",
    ):
        _run(conn, sql.SQL(statement).format(s=schema, r=r))


def upgrade_database(settings: Settings, database_url: str | None = None) -> str:
    """``mes db upgrade``: migrate as the owner (``database_url``, else
    ``MES_MIGRATION_DATABASE_URL``, else ``MES_DATABASE_URL``) and grant the app role
    (``MES_DATABASE_APP_ROLE``); returns the URL migrated."""
    url = database_url or settings.migration_database_url or settings.database_url
    upgrade(url, app_role=AppRole(settings.database_app_role, settings.database_app_password))
    return url
