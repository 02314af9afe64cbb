"""Run the service: HTTP up at once (health says "loading"), the model loads behind it.

Exit codes tell systemd what happened (see exitcodes.py). SIGTERM: stop accepting, end
the running generation at its next token, exit 0.
"""

from __future__ import annotations

import _thread
import errno
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

import waitress

from appliance.exitcodes import ApplianceError, ExitCode
from appliance.service.app import create_app
from appliance.service.engine import Engine, EngineState
from appliance.service.systemd import Notifier
from appliance.settings import Settings

log = logging.getLogger(__name__)


def _describe(engine: Engine) -> str:
    facts = engine.facts
    assert facts is not None
    return (f"serving {facts.id} ({facts.quantization}, {facts.threads} threads, "
            f"context {facts.context}), loaded in {facts.load_seconds:.1f} s")


def serve(settings: Settings, when_loaded: Callable[[], object] | None = None) -> int:
    """Serve until a signal; `when_loaded` runs once the model is (the self-verification, which
    lives in a layer above this one)."""
    notifier = Notifier()
    engine = Engine(settings.model, settings.limits, settings.paths.state_dir)
    app = create_app(settings, engine)
    try:
        server = waitress.create_server(
            app, host=settings.server.host, port=settings.server.port,
            threads=settings.server.http_threads,
            # Lets the app notice a client that hangs up while its request is generating.
            channel_request_lookahead=1,
            # Each streamed token is sent by the thread that produced it, at once. The default
            # (18000) leaves small writes to the I/O thread: one more thread to wake per token,
            # competing with the inference threads for the cores.
            send_bytes=1,
            ident="pi-llm-appliance", clear_untrusted_proxy_headers=True,
        )
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
        engine.shut_down()
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
    try:
        server.run()  # returns when on_signal raises SystemExit inside its loop
    except SystemExit:  # the signal came before the loop started
        server.close()
    return int(exit_code)
