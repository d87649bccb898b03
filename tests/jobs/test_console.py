"""A quiet console: one line per stage on the console, everything else (Ray's worker logs too) in the run's log."""

import os
import subprocess
import sys
import textwrap

from tests.helpers import REPO

SCRIPT = textwrap.dedent("""
    import os, sys
    from launch import console_to_log
    from recalign.runs import run_stage, stage_events

    def on_stage(stage, event, seconds):
        say(f"{stage} {event}", live=event == "running")

    verbose = sys.argv[2] == "true"
    with console_to_log(sys.argv[1], verbose) as say:
        say("headline")
        print("a library's chatter")
        os.write(2, b"(RayTrainWorker pid=1) a worker's log line, written to fd 2 by C++\\n")
        with stage_events(on_stage):
            run_stage("data", sys.argv[3], "k1", lambda: {}, log=print)
            run_stage("data", sys.argv[3], "k1", lambda: {}, log=print)
        if sys.argv[4] == "fail":
            raise RuntimeError("boom")
""")


def _run(tmp_path, verbose="false", fail="no"):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(REPO, "platform"), os.path.join(REPO, "jobs")])}
    log = tmp_path / "run" / "pipeline.log"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(log), verbose, str(tmp_path / "out"), fail],
                          capture_output=True, text=True, env=env, timeout=120)
    return done, log


def test_the_console_shows_the_stage_lines_and_the_log_holds_everything(tmp_path):
    done, log = _run(tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["headline", "data done", "data skipped"]  # not a terminal: no live line
    assert done.stderr == ""
    text = log.read_text()
    for line in ("headline", "a library's chatter", "a worker's log line", "[data] running (k1)", "[data] done in",
                 "[data] up to date (k1), skipped", "data done"):
        assert line in text, line


def test_verbose_shows_everything_and_writes_no_log(tmp_path):
    done, log = _run(tmp_path, verbose="true")
    assert done.returncode == 0, done.stderr
    assert "a library's chatter" in done.stdout and "a worker's log line" in done.stderr
    assert not log.exists()


def test_a_failure_restores_the_console_and_names_the_log(tmp_path):
    done, log = _run(tmp_path, fail="fail")
    assert done.returncode == 1
    assert f"(the full log: {log})" in done.stdout
    assert "RuntimeError: boom" in done.stderr  # the traceback reaches the real stderr
    assert "a worker's log line" in log.read_text()
