"""The application factory: config, resources, the request pipeline, blueprints, errors."""

from __future__ import annotations

import logging

from quart import Quart

from service import framework, pipeline
from service.config import ConfigError, Settings, load_settings
from service.errors import register_error_handlers
from service.framework import drain
from service.framework import resources as app_resources
from service.framework.lifespan import refuse_bad_settings
from service.obs.logs import configure_logging
from service.obs.watchers import Watchers
from service.routes import docs
from service.routes.health import blueprint as health_blueprint
from service.routes.metrics import blueprint as metrics_blueprint
from service.routes.openapi import ServiceOpenAPIProvider
from service.routes.reports import blueprint as reports_blueprint
from service.routes.task_events import blueprint as task_events_blueprint
from service.routes.tasks import blueprint as tasks_blueprint
from service.routes.users import blueprint as users_blueprint

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> Quart:
    """Build the Quart app. Nothing connects here; the serving hooks open and close resources.

    The settings go to the app's resources, their one home: from there on everything reads
    them as ``held.settings`` (a handler as ``resources().settings``)."""
    if not logging.getLogger().handlers:
        # Hypercorn applies hypercorn.toml's logging only once the app is loaded and started;
        # until then lines logged here would come out bare, not as JSON.
        configure_logging()
    if settings is None:
        try:
            settings = load_settings()
        except ConfigError as error:
            # One log line naming the variable, then exit 2, in every Hypercorn worker.
            raise refuse_bad_settings(error) from None
    app = Quart(__name__, static_folder=None)
    # The pool, Redis, the task queue, the report cache, and the settings.
    held = app_resources.install(app, settings)
    # Everything the service changes in Quart itself (service/framework/).
    framework.adapt(
        app,
        held,
        openapi_path=docs.OPENAPI_PATH,
        openapi_provider=ServiceOpenAPIProvider,  # documents the problem responses
    )
    if held.settings.docs_served:
        docs.install(app, held)
    register_error_handlers(app)
    # Every per-request step in order, and the ASGI wrappers around them (service/pipeline/).
    pipeline.install(app, held)
    # On SIGTERM a Hypercorn worker finishes its requests, and /readyz says it is draining.
    drain.install(app)
    # The loop watch, the pool gauges, the process's metrics and tracer: per process.
    watchers = Watchers(held, held.settings.loop_block_threshold)
    app.before_serving(watchers.start)
    app.after_serving(watchers.stop)
    app.register_blueprint(health_blueprint)
    app.register_blueprint(users_blueprint)
    app.register_blueprint(tasks_blueprint)
    app.register_blueprint(task_events_blueprint)
    app.register_blueprint(reports_blueprint)
    app.register_blueprint(metrics_blueprint)
    return app
