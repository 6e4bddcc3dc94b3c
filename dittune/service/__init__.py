"""`dittune serve`: the recommendation service (FastAPI on uvicorn) and the HTML report.

`create_app` builds the app over an open Database; `serve` checks the bind address and the token
and runs it. Heavy imports stay inside the functions, so `python -m dittune.service.jobchild`
(the job wrapper) starts without them."""

from __future__ import annotations

import ipaddress
import os
import socket

from dittune.errors import DittuneError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except (socket.gaierror, ValueError):
            return False


def serve(host: str = "127.0.0.1", port: int = 8765, db_url: str | None = None, token: str | None = None) -> None:
    """Run the service until interrupted. A non-loopback address is refused without a token."""
    from dittune import db as D

    token = token or os.environ.get("DITTUNE_TOKEN") or None
    if not is_loopback(host) and not token:
        raise DittuneError(f"refusing to listen on {host} (not loopback) without a token: pass --token or set DITTUNE_TOKEN")
    if not 0 < port < 65536:
        raise DittuneError(f"--port {port}: choose 1..65535")
    import uvicorn

    from .app import create_app

    db = D.open_db(db_url, create=True)  # a fresh host serves nothing yet but can queue tunes
    app = create_app(db, token)
    print(f"dittune serve: http://{host}:{port}/ over {db.engine.url.render_as_string(hide_password=True)}; "
          f"writes {'need the bearer token' if token else 'disabled (no --token)'}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def write_report(study: str, output, db_url: str | None = None) -> int:
    """`dittune report`: write the study's page as one self-contained HTML file; returns its size."""
    from dittune import db as D
    from dittune.tuner.versions import staleness_keys

    from .pages import report

    html = report(D.open_db(db_url), study, staleness_keys())
    try:
        output.write_text(html)
    except OSError as e:
        raise DittuneError(f"cannot write {output}: {e.strerror}") from None
    return len(html)


__all__ = ["is_loopback", "serve", "write_report"]
