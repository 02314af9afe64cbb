"""Run the service: HTTP up at once (health says "loading"), the model loads behind it.

Exit codes tell systemd what happened (see exitcodes.py). SIGTERM: stop accepting, end
the running generation at its next token, exit 0.
"""

from __future__ import annotations

import _thread
import errno
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from appliance.exitcodes import ApplianceError, ExitCode
from appliance.service.app import create_app
from appliance.service.engine import Engine, EngineState
from appliance.service.http import create_server
from appliance.service.systemd import Notifier
from appliance.settings import Settings

log = logging.getLogger(__name__)
# How often the loading is looked at for progress.
LOAD_WATCH_SECONDS = 1.0


def _describe(engine: Engine) -> str:
    facts = engine.facts
    assert facts is not None
    return (f"serving {facts.id} ({facts.quantization}, {facts.threads} threads, "
            f"context {facts.context}), loaded in {facts.load_seconds:.1f} s")


def _exit_when_load_overdue(engine: Engine) -> None:
    """A load blocked in a read cannot be interrupted, and systemd would go on extending the
    start for it: exit, with the code of a model that cannot be read."""
    while engine.state is EngineState.LOADING:
        if engine.load_overdue():
            log.error("%s: loading made no progress in its time (%s): a blocked read — a "
                      "hung drive, network mount or USB disk? Check dmesg",
                      engine.model_settings.path, engine.status_line)
            logging.shutdown()
            os._exit(ExitCode.MODEL_MISSING)
        time.sleep(LOAD_WATCH_SECONDS)


def serve(settings: Settings, when_loaded: Callable[[], object] | None = None) -> int:
    """Serve until a signal; `when_loaded` runs once the model is (the self-verification, which
    lives in a layer above this one)."""
    notifier = Notifier()
    engine = Engine(settings.model, settings.limits, settings.paths.state_dir)
    app = create_app(settings, engine)
    try:
        server = create_server(app, settings.server)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            log.error("port %s on %s is already in use", settings.server.port,
                      settings.server.host)
            return ExitCode.TRANSIENT
        raise
    exit_code = ExitCode.OK

    def load() -> None:
        nonlocal exit_code
        try:
            engine.load()
        except ApplianceError as exc:
            log.error("%s", exc)
            exit_code = exc.exit_code
            _thread.interrupt_main(signal.SIGTERM)
            return
        except Exception:
            log.exception("model load failed unexpectedly")
            exit_code = ExitCode.INTERNAL
            _thread.interrupt_main(signal.SIGTERM)
            return
        log.info("%s", _describe(engine))
        notifier.ready(_describe(engine))
        if when_loaded is not None:
            try:
                when_loaded()
            except Exception:  # the service keeps serving; /health says what it waits for
                log.exception("what runs once the model is loaded failed")

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        notifier.stopping()
        loading = engine.state is EngineState.LOADING
        engine.shut_down()
        if loading:
            # No request can be running, and the loader may sit in a read that nothing
            # interrupts (a hung drive): waiting for it would outlast the stop timeout.
            logging.shutdown()
            os._exit(int(exit_code))
        # Leaves waitress's loop, which then drains its task threads (5 s at most).
        raise SystemExit(int(exit_code))

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("listening on http://%s:%s (loading %s)", settings.server.host,
             settings.server.port, settings.model.path)
    notifier.status(f"loading {settings.model.path.name}")
    notifier.keep_extending_start(lambda: engine.state is EngineState.LOADING,
                                  lambda: engine.status_line)
    notifier.start_watchdog(lambda: engine.state is EngineState.READY and not engine.is_stalled())
    threading.Thread(target=load, name="model-loader", daemon=True).start()
    threading.Thread(target=_exit_when_load_overdue, args=(engine,), name="load-watch",
                     daemon=True).start()
    try:
        server.run()  # returns when on_signal raises SystemExit inside its loop
    except SystemExit:  # the signal came before the loop started
        server.close()
    return int(exit_code)
