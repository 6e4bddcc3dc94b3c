"""`dittune tune` stopped by Ctrl-C exits 130, by SIGTERM 143, after saving what it measured, and
prints the exact command that resumes it; the rerun says "resuming study X: N trials measured".
The real CLI in a real process; its trials run the fake engine (tests/tuner/fake_engine.py)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path


from dittune import db as D

TUNER_TESTS = Path(__file__).resolve().parents[1] / "tuner"
DRIVER = textwrap.dedent("""
    import signal, sys
    # Ctrl-C as a terminal's foreground process gets it: a shell starts background jobs (pytest run
    # with `&`, say) with SIGINT ignored, and that would be inherited here
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.stdout.reconfigure(line_buffering=True)  # each trial line reaches the test as it is printed
    sys.path.insert(0, {here!r})
    import pytest
    from test_study import FAKE, pretend_h100
    import dittune.tuner.study as study
    mp = pytest.MonkeyPatch()
    pretend_h100(mp)
    real = study.run_trial
    mp.setattr(study, "run_trial", lambda job, limit, cmd, env=None, **kw: real(job, limit, FAKE, env, cancel=kw.get("cancel")))  # no spares: they start the real worker
    sys.argv = ["dittune", *sys.argv[1:]]
    from dittune.cli import main
    main()
""")


def _interrupt(p, sig, trials_first: int) -> tuple[str, str]:
    """Wait for `trials_first` measured trials, then send `sig` while the next trial's worker runs."""
    lines, stamped, seen, t0 = [], [], 0, time.time()
    while seen < trials_first and time.time() < t0 + 120:
        line = p.stdout.readline()
        lines.append(line)
        stamped.append(f"[{time.time() - t0:.1f} s] {line}")
        seen += line.startswith("trial ")
    time.sleep(0.3)
    alive = p.poll() is None
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert alive, f"the study ended before the signal ({time.time() - t0:.1f} s):\n{''.join(stamped)}{out[-1500:]}"
    return "".join(lines) + out, err


def test_ctrl_c_exits_130_sigterm_143_with_the_resume_command(tmp_path):
    url = f"sqlite:///{tmp_path / 't.db'}"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(here=str(TUNER_TESTS)))
    args = ["tune", "flux-dev", "--trials", "6", "--confirm", "0", "--db", url]
    env = dict(os.environ, FAKE_ENGINE_SLEEP="2.0")
    start = lambda: subprocess.Popen([sys.executable, str(driver), *args], env=env, stdout=subprocess.PIPE,  # noqa: E731
                                     stderr=subprocess.PIPE, text=True)
    p = start()
    out, err = _interrupt(p, signal.SIGINT, 1)
    assert p.returncode == 130, (out[-2000:], err[-2000:])
    resume = f"Resume with: dittune tune flux-dev --trials 6 --confirm 0 --db {url}"
    assert resume in err and "Traceback" not in err
    measured = len([t for t in D.trials(D.open_db(url)) if t.status == "complete"])
    assert measured >= 1

    p = start()  # the resume command; SIGTERM (a batch system's stop) this time
    out, err = _interrupt(p, signal.SIGTERM, 1)
    assert p.returncode == 143, (out[-2000:], err[-2000:])
    (study,) = D.studies(D.open_db(url))
    assert out.startswith(f"resuming study {study.name}: {measured} trials measured\n")
    assert resume in err and "Traceback" not in err
    assert study.measured > measured  # the rerun measured more, and kept it


def test_an_interrupt_inside_a_database_commit_is_still_the_interrupt():
    """Ctrl-C landing in Optuna's commit came out as StorageInternalError (from SQLAlchemy's error,
    whose context is the KeyboardInterrupt): tune exited 1 with that message instead of 130."""
    import optuna
    import sqlalchemy.exc

    from dittune.tuner.progress import interrupted_by_signal

    try:
        try:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise sqlalchemy.exc.OperationalError("COMMIT", {}, Exception("interrupted"))
        except sqlalchemy.exc.SQLAlchemyError as e:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from e
    except BaseException as e:  # noqa: BLE001
        err = e
    assert interrupted_by_signal(err) and interrupted_by_signal(KeyboardInterrupt())
    try:
        raise optuna.exceptions.StorageInternalError("commit") from ValueError("too long")
    except BaseException as e:  # noqa: BLE001
        assert not interrupted_by_signal(e)
