"""What the route handlers are given by Litestar's dependency injection.

One ``Database``, one ``WorkflowClient`` and one ``Steering`` per app, made in
``create_app`` and kept on the app's state with the app's ``Settings``; handlers name them
as parameters (``db``, ``workflows``, ``steering``, ``settings``, ``caller``,
``callback_policy``) and receive them typed. Lists name ``paging`` (limit, offset, after) and
reports ``interval`` (since, until): one definition of those query parameters for every route.
"""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.datastructures import State
from litestar.di import Provide

from mes.api.params import next_link, paging, period
from mes.auth import Principal
from mes.callbacks import CallbackPolicy
from mes.db import Database
from mes.settings import Settings
from mes.steering import Steering
from mes.workflow_client import WorkflowClient


def _db(state: State) -> Database:
    db: Database = state.db
    return db


def _workflows(state: State) -> WorkflowClient:
    workflows: WorkflowClient = state.workflows
    return workflows


def _steering(state: State) -> Steering:
    steering: Steering = state.steering
    return steering


def _callback_policy(state: State) -> CallbackPolicy:
    policy: CallbackPolicy = state.callback_policy
    return policy


def _settings(state: State) -> Settings:
    settings: Settings = state.settings
    return settings


def _caller(request: Request[Principal, Any, Any]) -> Principal:
    """The authenticated caller of a request."""
    return request.user


def app_state(db: Database, workflows: WorkflowClient, settings: Settings) -> State:
    """The app's state: the services the providers hand out, and where callbacks may go."""
    return State(
        {
            "db": db,
            "workflows": workflows,
            "steering": Steering(db, workflows),
            "settings": settings,
            "callback_policy": CallbackPolicy.allowing(settings.callback_allow),
        }
    )


DEPENDENCIES = {
    "db": Provide(_db, sync_to_thread=False),
    "workflows": Provide(_workflows, sync_to_thread=False),
    "steering": Provide(_steering, sync_to_thread=False),
    "caller": Provide(_caller, sync_to_thread=False),
    "callback_policy": Provide(_callback_policy, sync_to_thread=False),
    "settings": Provide(_settings, sync_to_thread=False),
    "paging": Provide(paging, sync_to_thread=False),
    "interval": Provide(period, sync_to_thread=False),
    "next_link": Provide(next_link, sync_to_thread=False),
}
