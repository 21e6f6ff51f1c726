"""Search workers sharing a study on a real PostgreSQL server: a throwaway server (initdb into a temporary
folder, a Unix socket, no system service), three worker processes, every trial run once and split between them."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("psycopg", reason="needs the [postgres] extra")

REPO = Path(__file__).resolve().parents[2]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    return next((str(v / name) for v in versions if (v / name).exists()), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """``postgresql+psycopg://`` URL of a server started for this module and stopped after it."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL is not installed (initdb / pg_ctl)")
    # not under pytest's tmp root: that is private to this user, and a root run starts the server as postgres
    folder = Path(tempfile.mkdtemp(prefix="modelpress-pg-"))
    data, sock = folder / "data", folder / "sock"
    sock.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the postgres user
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres"), shutil.chown(sock, "postgres")
    port = _free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-w", "-l", str(folder / "log"), "-o",
                    f"-k {sock} -p {port} -c listen_addresses='' -c fsync=off", "start"], check=True,
                   capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres@/postgres?host={sock}&port={port}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


WORKER = """
import sys
sys.path.insert(0, {tests!r})
from search.test_search import SMALL, toy_bundle, trained_mlp
from modelpress.search.space import Budget
from modelpress.search.study import run_search
epochs = float(sys.argv[5]) if len(sys.argv) > 5 else 0.5
space = type(SMALL).model_validate({{**SMALL.model_dump(), "finetune": {{"epochs": epochs, "lr": 0.005}}}})
run_search(trained_mlp(), toy_bundle(), Budget(metric="bytes", limit=1e9, max_drop=100), space,
           out=sys.argv[1], trials=int(sys.argv[2]), storage=sys.argv[3], study_name=sys.argv[4], heartbeat=(1, 2))
"""


def test_three_workers_share_one_postgres_study(tmp_path, postgres_url):
    import optuna

    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(REPO / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MODELPRESS_PROGRESS": "0", "MODELPRESS_QUIET": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / f"out{i}"), "9", postgres_url, "shared"],
                              env=env, stderr=subprocess.PIPE, text=True) for i in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    numbers = [t.number for t in study.trials]
    assert len(numbers) >= 9 and len(set(numbers)) == len(numbers)  # every trial number once
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    workers = {t.user_attrs["worker"] for t in study.trials}
    assert len(workers) >= 2, workers  # the trials were split between the processes
    assert all(w.split(":")[1] in {str(p.pid) for p in procs} for w in workers)
    # the team's best recipe is the one a single worker writes after the same trials, in the same order
    trials = sorted(study.trials, key=lambda t: t.number)
    shared = _search(tmp_path / "summary", len(trials), storage=postgres_url, study_name="shared")  # runs none
    alone = _search(tmp_path / "alone", len(trials), enqueue=[t.params for t in trials])
    assert shared.best is not None
    assert [shared.best[k] for k in ("params", "quality", "cost")] == [alone.best[k] for k in
                                                                      ("params", "quality", "cost")]

    def recipe(out):  # the recipe without its name (search-trial-N: equal choices may hold another number)
        return [line for line in (out / "best-recipe.yaml").read_text().splitlines() if not line.startswith("name:")]
    assert recipe(tmp_path / "summary") == recipe(tmp_path / "alone")


def _search(out: Path, trials: int, **kwargs):
    """The workers' search (WORKER's settings) in this process."""
    sys.path.insert(0, str(REPO / "tests"))
    from search.test_search import SMALL, toy_bundle, trained_mlp

    from modelpress.search.space import Budget
    from modelpress.search.study import run_search

    space = type(SMALL).model_validate({**SMALL.model_dump(), "finetune": {"epochs": 0.5, "lr": 0.005}})
    return run_search(trained_mlp(), toy_bundle(), Budget(metric="bytes", limit=1e9, max_drop=100), space, out=out,
                      trials=trials, **kwargs)


def test_a_killed_workers_trial_is_retried_by_another(tmp_path, postgres_url):
    import optuna

    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(REPO / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MODELPRESS_PROGRESS": "0", "MODELPRESS_QUIET": "1"}
    # a worker with long trials, killed while one runs
    slow = subprocess.Popen([sys.executable, str(script), str(tmp_path / "a"), "2", postgres_url, "killed", "500"],
                            env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    running = []
    while not running and time.time() < deadline and slow.poll() is None:
        time.sleep(0.5)
        try:
            study = optuna.load_study(study_name="killed", storage=postgres_url)
            running = [t for t in study.trials if t.state.name == "RUNNING"]
        except KeyError:  # the study is not created yet
            pass
    assert running, "the slow worker never started a trial"
    time.sleep(2.5)  # well inside the trial (one killed before its first beat is failed too: test_search.py)
    slow.send_signal(signal.SIGKILL)
    slow.wait()
    time.sleep(3)  # past the grace period: its trial's heartbeat is stale
    other = subprocess.run([sys.executable, str(script), str(tmp_path / "b"), "2", postgres_url, "killed"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 0, other.stderr[-2000:]
    trials = optuna.load_study(study_name="killed", storage=postgres_url).trials
    killed = next(t for t in trials if t.number == running[0].number)
    assert killed.state.name == "FAIL"
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE" and retry[0].params == killed.params
    assert retry[0].user_attrs["worker"] != killed.user_attrs["worker"]
