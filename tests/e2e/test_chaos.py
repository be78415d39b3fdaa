"""Chaos: a real `cluster.train` job on a `ray start --head` cluster survives its rollout actors being
killed again and again (SIGKILL of the process mid-generate, and `ray.kill`) and its adversary being
SIGKILLed mid-attack, with nothing lost or duplicated; a learner rank that dies (at any moment, and
inside the weight export) stops the job with the message naming the rank, the call and the checkpoint
to resume from.

Counted from the run's own records (metrics.jsonl): every step holds exactly batch x n_clean clean and
batch x n_adv adversarial samples, `samples/lost` and `samples/duplicated` are 0 (each group's samples
checked against its requests), every answer after the first sync came from weights whose fingerprint
equals the learner's for that version (`rollout/weights_checked`; a mismatch would stop the job), and
every recovery is a metric (`rollout/restarts`, `adversary/restarts`).
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from ray_head import cluster_processes, stop_cluster

from cluster.checkpoints import resume_line
from cluster.metrics import read_metrics
from core.devices import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BATCH, N_CLEAN, N_ADV, STEPS = 4, 2, 2, 24

RAY_KILL = r"""
import sys, ray
ray.init(address=sys.argv[1], namespace="saei", log_to_driver=False)
names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("rollout-"))
victim = names[int(sys.argv[2]) % len(names)]
ray.kill(ray.get_actor(victim, namespace="saei"), no_restart=False)
print("KILLED", victim)
"""


def _env(**extra) -> dict:
    # token auth off: the chaos tests start their own `ray start --head` on loopback and test recovery,
    # not access control (tests/e2e/test_exposure.py keeps auth on and tests it)
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(REPO),
                OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", RAY_AUTH_MODE="disabled",
                RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", **extra)  # `ray start` binds loopback only (STACK-NOTES)



@pytest.fixture(scope="module")
def head(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chaos_head")
    gcs = free_port()
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1",
                    "--num-cpus=4", "--include-dashboard=false", "--disable-usage-stats"],
                   env=_env(), check=True, capture_output=True, timeout=180, cwd=tmp)
    yield f"127.0.0.1:{gcs}"
    stop_cluster(gcs)  # this cluster only: another Ray job on the machine keeps running


def _job(tmp_path: Path, policy: Path, address: str, name: str, *extra: str, bootstrapped: bool = True) -> subprocess.Popen:
    """The job on `policy`: with the bootstrap's data beside it, or (bootstrapped=False, a tiny random
    policy) on a small synthetic set the job renders itself."""
    data = policy.parents[1] / "data" / "synthetic"
    inputs = ([f"data.train_files=[{data / 'train.parquet'}]", f"data.test_files=[{data / 'test.parquet'}]"]
              if bootstrapped else ["data.synthetic.n_train=48", "data.synthetic.n_test=8"])
    cmd = [sys.executable, "-m", "cluster.train", f"run.name={name}", f"run.output_dir={tmp_path}",
           f"run.steps={STEPS}", "run.eval_every=0", "run.eval_before_train=false", f"model.path={policy}",
           "model.build_tiny=false", *inputs, "data.limit_test=4", f"data.batch_size={BATCH}",
           f"rollout.n_clean={N_CLEAN}", f"rollout.n_adv={N_ADV}", "rollout.sampling.max_new_tokens=24",
           "rollout.eval_k=2", "rollout.stream_chunk=1", f"cluster.address={address}", "cluster.rollout_workers=2",
           "cluster.rollout_cpus=0.5", "cluster.adversary_cpus=0.5", "cluster.max_restarts=20",
           "logging.progress_bar=false", *extra]
    log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115
    return subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT)


def _busy(head: str, prefix: str) -> list[psutil.Process]:
    """The head cluster's processes whose Ray title says they run `prefix` now (ray::AdversaryActor.attack)."""
    found = []
    for p in cluster_processes(int(head.rsplit(":", 1)[1])):
        try:
            cmd = p.cmdline()
        except psutil.NoSuchProcess:
            continue
        if cmd and cmd[0].startswith(prefix):
            found.append(p)
    return found


def _steps_done(tmp_path: Path, name: str) -> int:
    files = list(tmp_path.glob(f"{name}-*/metrics.jsonl"))
    return len([r for r in read_metrics(files[0]) if "time/step_s" in r]) if files else 0


def _metric_sum(tmp_path: Path, name: str, key: str) -> float:
    files = list(tmp_path.glob(f"{name}-*/metrics.jsonl"))
    return sum(r.get(key) or 0 for r in read_metrics(files[0])) if files else 0.0


def _sigkill(procs: list[psutil.Process]) -> bool:
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
            return True
        except psutil.NoSuchProcess:
            continue
    return False


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_kills_during_a_job_lose_and_duplicate_nothing(bootstrapped_run, head, tmp_path, engine):
    if engine == "vllm":
        pytest.importorskip("vllm")
    assert bootstrapped_run["proc"].returncode == 0, bootstrapped_run["proc"].stderr[-2000:]
    extra = ["rollout.engine=vllm", "rollout.kv_cache_gb=0.25"] if engine == "vllm" else []
    job = _job(tmp_path, bootstrapped_run["path"], head, "chaos", *extra)
    rng = random.Random(0)
    kills = {"rollout_sigkill": 0, "rollout_ray_kill": 0, "adversary_sigkill": 0}
    deadline = time.monotonic() + 900
    try:
        while _steps_done(tmp_path, "chaos") < 1:  # the first step runs undisturbed
            assert job.poll() is None, (tmp_path / "chaos.log").read_text()[-4000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        plan = ["adversary_sigkill", "rollout_sigkill", "rollout_ray_kill", "rollout_sigkill", "rollout_ray_kill",
                "adversary_sigkill", "rollout_sigkill"]
        for what in plan:
            if job.poll() is not None or _steps_done(tmp_path, "chaos") >= STEPS - 8:  # time to see the last restart
                break
            time.sleep(rng.uniform(0.5, 2.0))  # a random point in the step
            if what == "adversary_sigkill":
                t_end = time.monotonic() + 30
                while not _sigkill(_busy(head, "ray::AdversaryActor.attack")) and time.monotonic() < t_end:
                    time.sleep(0.05)  # wait for an attack to be running: killed mid-attack
                else:
                    kills[what] += time.monotonic() < t_end
            else:
                if what == "rollout_sigkill":
                    killed = _sigkill(_busy(head, "ray::RolloutActor.generate") or _busy(head, "ray::RolloutActor"))
                else:
                    out = subprocess.run([sys.executable, "-c", RAY_KILL, head, str(rng.randrange(2))], env=_env(),
                                         capture_output=True, text=True, timeout=120)
                    killed = "KILLED" in out.stdout
                kills[what] += killed
                # the next kill waits until the run has counted this restart (its new process answered)
                t_end = time.monotonic() + 120
                while killed and job.poll() is None and time.monotonic() < t_end and (
                        _metric_sum(tmp_path, "chaos", "rollout/restarts") < kills["rollout_sigkill"]
                        + kills["rollout_ray_kill"]):
                    time.sleep(0.2)
        assert job.wait(timeout=max(60, deadline - time.monotonic())) == 0, (tmp_path / "chaos.log").read_text()[-4000:]
    finally:
        if job.poll() is None:
            job.kill()
    assert sum(kills.values()) >= 5 and kills["adversary_sigkill"] >= 1 and kills["rollout_ray_kill"] >= 1, kills
    run = next(tmp_path.glob("chaos-*"))
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "time/step_s" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert (r["samples/clean"], r["samples/adversarial"]) == (BATCH * N_CLEAN, BATCH * N_ADV), r["step"]
        assert r["samples/lost"] == r["samples/duplicated"] == 0, r["step"]
        assert r["rollout/logprob_diff"] < 1e-4, r["step"]
    # after the first sync every answer's weights were checked against the learner's fingerprint
    assert all(r["rollout/weights_checked"] > 0 for r in rows[1:])
    # every rollout kill is a restart the run's metrics count (a restart shows when its new process answers)
    rollout_restarts = sum(r["rollout/restarts"] for r in rows)
    assert rollout_restarts == kills["rollout_sigkill"] + kills["rollout_ray_kill"], (kills, rollout_restarts)
    assert sum(r["adversary/restarts"] for r in rows) >= 1, (kills, rows[-1])
    (tmp_path / "kills.json").write_text(json.dumps(kills))
    print("kills", kills, "rollout restarts", sum(r["rollout/restarts"] for r in rows),
          "adversary restarts", sum(r["adversary/restarts"] for r in rows))


# What the job prints when a rank dies (cluster.checkpoints.JobStopped around learner.group.LearnerRankDied),
# up to the resume line, which must be exactly `resume_line` of the newest complete checkpoint
STOPPED = re.compile(r"^error: learner rank (\d+) on node 127\.0\.0\.1 died during (\w+) \((\w+)\); the job stops \(an FSDP group "
                     r"cannot lose a rank\)\. (.*)$", re.M)


def _newest(run: Path) -> Path | None:
    done = sorted(p for p in (run / "checkpoints").glob("step_*") if (p / "trainer_state.json").exists())
    return done[-1] if done else None


def _learner_ranks(head: str, want: int, job: subprocess.Popen, log: Path, before: set[int]) -> list[psutil.Process]:
    """The `want` learner rank processes of `job` (not those of an earlier job that Ray is still ending)."""
    deadline = time.monotonic() + 300
    while len(found := [p for p in _busy(head, "ray::LearnerActor") if p.pid not in before]) < want:
        assert job.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, "the learner ranks did not come up"
        time.sleep(0.2)
    return found


def _title(p: psutil.Process) -> str:
    try:
        return (p.cmdline() or [""])[0]
    except psutil.NoSuchProcess:
        return ""


def _kill_in_export(ranks: list[psutil.Process], job: subprocess.Popen) -> bool:
    """SIGKILL a rank while its Ray title says it runs `export_weights` (the step's weight sync); polls
    until the job ends."""
    while job.poll() is None:
        for p in ranks:
            if _title(p).startswith("ray::LearnerActor.export_weights"):
                return _sigkill([p])
        time.sleep(0.002)
    return False


def _stopped(job: subprocess.Popen, tmp_path: Path, name: str) -> re.Match:
    assert job.wait(timeout=300) == 1, (tmp_path / f"{name}.log").read_text()[-4000:]
    log = (tmp_path / f"{name}.log").read_text()
    found = STOPPED.search(log)
    assert found, log[-3000:]
    return found


@pytest.mark.slow
def test_a_dead_learner_rank_stops_the_job_naming_it_and_the_checkpoint(tiny_policy_dir, head, tmp_path):
    job = _job(tmp_path, tiny_policy_dir, head, "rankdeath", "learner.num_workers=2", "run.save_every=1",
               "cluster.learner_cpus=0.5", bootstrapped=False)
    deadline = time.monotonic() + 600
    try:
        while not list(tmp_path.glob("rankdeath-*/checkpoints/step_000002/trainer_state.json")):
            assert job.poll() is None, (tmp_path / "rankdeath.log").read_text()[-4000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        victims = _busy(head, "ray::LearnerActor")
        assert len(victims) == 2
        _sigkill(victims[-1:])
        found = _stopped(job, tmp_path, "rankdeath")
    finally:
        if job.poll() is None:
            job.kill()
    run = next(tmp_path.glob("rankdeath-*"))
    assert found[1] in ("0", "1"), found[0]  # learner.num_workers=2
    assert _newest(run) is not None and found[4] == resume_line(_newest(run)), found[0]


@pytest.mark.slow
def test_a_rank_that_dies_in_the_weight_export_stops_the_job_naming_the_export(tiny_policy_dir, head, tmp_path):
    """The rank is killed while Ray's process title says it runs `export_weights` (observed, not hooked).
    A kill can land just after the export returned; then the job names another call, and the timing is
    tried again with a fresh job, at most three times."""
    calls = []
    for attempt in range(3):
        name = f"exportdeath{attempt}"
        before = {p.pid for p in _busy(head, "ray::LearnerActor")}
        job = _job(tmp_path, tiny_policy_dir, head, name, "learner.num_workers=2", "run.save_every=1",
                   "cluster.learner_cpus=0.5", bootstrapped=False)
        try:
            ranks = _learner_ranks(head, 2, job, tmp_path / f"{name}.log", before)
            assert _kill_in_export(ranks, job), (tmp_path / f"{name}.log").read_text()[-4000:]
            found = _stopped(job, tmp_path, name)
        finally:
            if job.poll() is None:
                job.kill()
        calls.append(found[2])
        if found[2] == "export_weights":
            break
    assert calls[-1] == "export_weights", calls
    assert found[1] in ("0", "1"), found[0]
    # killed in step 1's sync: no checkpoint yet, and the message says so; later: the newest complete one
    assert found[4] == resume_line(_newest(next(tmp_path.glob(f"{name}-*")))), found[0]
