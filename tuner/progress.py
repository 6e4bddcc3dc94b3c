"""What the user sees while a study runs (a rich progress bar, or plain log lines), and SIGTERM
handled like Ctrl-C."""

from __future__ import annotations

import signal
import threading


class Progress:
    def __init__(self, total: int, enabled: bool):
        self.enabled = enabled
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self.p = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                         TimeRemainingColumn(), TextColumn("{task.fields[best]}"), transient=False)
            self.p.start()
            self.task = self.p.add_task("trials", total=total, best="")

    def update(self, done: int, best: str, note: str = "") -> None:
        if self.enabled:
            self.p.update(self.task, completed=done, best=f"best {best} {note}".strip())

    def log(self, msg: str) -> None:
        if self.enabled:
            self.p.console.print(msg, highlight=False)

    def stop(self) -> None:
        if self.enabled:
            self.p.stop()


# The signal that interrupted the study, for the exit status (130 Ctrl-C, 143 SIGTERM): SIGTERM
# raises KeyboardInterrupt like Ctrl-C, so this is the only trace of which one it was.
received: int | None = None


def sigterm_as_interrupt(signum, frame):
    global received
    received = signum
    raise KeyboardInterrupt


def raise_on_sigterm():
    """SIGTERM (`timeout`, a batch system) stops the study like Ctrl-C: the running trial's child
    is killed, everything measured is kept and the frontier is still printed. Returns the handler
    to restore (None off the main thread, where signals cannot be caught)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, sigterm_as_interrupt)


def interrupted_by_signal(exc: BaseException) -> bool:
    """Ctrl-C or SIGTERM, also where a library turned it into its own error: the KeyboardInterrupt
    raised inside a database commit comes out of Optuna as a StorageInternalError (caused by
    SQLAlchemy's error, whose context is the interrupt)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def interrupt_exit_code() -> int:
    """The shell's convention: 128 + the signal number (Ctrl-C 130, SIGTERM 143)."""
    return 128 + (received if received is not None else signal.SIGINT)
