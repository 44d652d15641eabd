"""MicroAdam and Adam-mini on several JAX processes, with Orbax checkpoints.

The smallest real multi-controller set-up: 2 processes x 4 CPU devices on
this machine (``jax.distributed.initialize`` on 127.0.0.1, CPU collectives
over gloo), one global (2, 4) mesh. tests/multihost_worker.py is one process;
this module runs two jobs at once, bounded in time and killed whatever
happens:

* the 2-process job trains every case of the worker (MicroAdam XLA,
  Adam-mini; Explicit and Auto axes; FSDP and tensor-parallel leaves;
  MicroAdam's Pallas kernels on one leaf, Auto axes) for 3 steps, both
  processes saving the checkpoint of step 2; restores step 2 from disk onto
  its mesh and runs step 3 again; then starts saving step 3, and process 1
  is killed (SIGKILL) mid-save;
* one process with 8 devices trains the same cases (the single-process
  reference); once the first job is over, it restores the latest checkpoint
  onto its own mesh and runs step 3.

Every comparison is of whole arrays put together from the shards each
process wrote, bit for bit (as unsigned integers).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = pathlib.Path(__file__).parent
WORKER = HERE / "multihost_worker.py"
#: A hard limit on each job (they take seconds; XLA's CPU collectives abort
#: after 40 s stuck in a rendezvous).
TIMEOUT_S = 240
SAVE_AT, STEPS = 2, 3  # as in the worker


def _free_port() -> int:
  with contextlib.closing(socket.socket()) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      [str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _jobs(tmp: pathlib.Path, jobs: dict, when_over: dict) -> dict:
  """Runs the jobs at once; each one's exit codes and logs, by process.

  ``jobs``: name -> (worker arguments, number of processes). Once a process
  has failed (or killed itself) the others of its job are ended;
  ``when_over``: name -> what to call once that job is over. Every process
  is ended by ``TIMEOUT_S``.
  """
  procs, logs = {}, {}
  start = time.monotonic()
  try:
    for name, (args, processes) in jobs.items():
      port = _free_port()
      procs[name], logs[name] = [], []
      for i in range(processes):
        log = open(tmp / f"{name}.p{i}.log", "w+")  # pylint: disable=R1732
        logs[name].append(log)
        extra = ([] if processes == 1 else
                 ["--num-processes", str(processes), "--process-id", str(i),
                  "--port", str(port)])
        procs[name].append(subprocess.Popen(
            [sys.executable, str(WORKER), *map(str, args), *extra],
            env=_env(8 // processes),
            stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S

    def running(name):
      # A process that failed, or killed itself, leaves the others of its
      # job waiting for it for ever: end them.
      if any(p.poll() for p in procs[name]):
        for p in procs[name]:
          if p.poll() is None:
            p.kill()
            p.wait()
      return any(p.poll() is None for p in procs[name])

    pending = dict(when_over)
    while any(map(running, procs)) and time.monotonic() < deadline:
      for name in [n for n in pending if not running(n)]:
        pending.pop(name)()
      time.sleep(0.05)
  finally:
    for p in sum(procs.values(), []):
      if p.poll() is None:
        p.kill()
      p.wait()
  print(f"jobs {sorted(jobs)}: {time.monotonic() - start:.1f} s")
  outs = {}
  for name, job_logs in logs.items():
    outs[name] = []
    for p, log in zip(procs[name], job_logs):
      log.seek(0)
      outs[name].append((p.returncode, log.read()))
      log.close()
  return outs


def _check_ok(outs) -> None:
  for i, (code, log) in enumerate(outs):
    assert code == 0 and "] OK" in log, (
        f"process {i} exit {code}:\n{log[-4000:]}")


def _arrays(out: pathlib.Path, mode: str) -> tuple[dict, dict]:
  """Whole arrays, put together from every process's shards; the metadata
  of process 0."""
  shards = {}
  for meta_file in sorted(out.glob(f"{mode}.p*.json")):
    meta = json.loads(meta_file.read_text())
    with np.load(meta_file.with_suffix(".npz")) as data:
      for key, where in meta["index"].items():
        shards.setdefault(where["name"], []).append(
            (where["shape"], where["index"], data[key]))
  arrays = {}
  for name, parts in shards.items():
    shape, _, first = parts[0]
    whole = np.zeros(shape, first.dtype)
    covered = np.zeros(shape, np.int32)
    for _, index, data in parts:
      box = tuple(slice(a, b) for a, b in index)
      whole[box] = data
      covered[box] += 1
    assert (covered == 1).all(), f"{name}: shards cover {np.unique(covered)}"
    arrays[name] = whole
  return arrays, json.loads((out / f"{mode}.p0.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multihost")
  ckpt = tmp / "ckpt"
  seed = int(np.random.default_rng().integers(2**31))
  two, one = tmp / "two", tmp / "one"
  two.mkdir()
  one.mkdir()
  go = tmp / "first-job-over"
  after_kill = []

  def first_job_over():
    after_kill.extend(sorted(p.name for p in ckpt.glob("*")))
    go.touch()

  outs = _jobs(tmp, {
      "two": (["train,resume", two, seed, "--ckpt", ckpt, "--save",
               "--kill-mid-save"], 2),
      "one": (["train,resume", one, seed, "--ckpt", ckpt, "--wait-for", go],
              1)}, {"two": first_job_over})
  killed = outs["two"]
  code1, log1 = killed[1]
  assert code1 == -signal.SIGKILL and "then killing" in log1, log1[-4000:]
  _check_ok(outs["one"])
  return dict(seed=seed, killed=killed, after_kill=after_kill,
              two=_arrays(two, "train"), one=_arrays(one, "train"),
              resumed=_arrays(two, "resume"),
              one_resumed=_arrays(one, "resume"))


def _assert_same(got: dict, want: dict, seed: int) -> None:
  assert got and set(got) <= set(want), sorted(set(got) - set(want))
  differ = [k for k in got if not np.array_equal(got[k], want[k])]
  assert not differ, f"seed {seed}: differ in {differ}"


def test_two_processes_equal_one_process_to_the_bit(runs):
  """Every step's parameters and the last state of every case (MicroAdam
  XLA, Adam-mini; Explicit and Auto axes; MicroAdam's Pallas kernels on Auto
  axes), 2 x 4 devices against one process with 8."""
  (got, _), (want, _) = runs["two"], runs["one"]
  assert set(got) == set(want)
  cases = {k.split("/")[0] + "/" + k.split("/")[1] for k in got}
  assert cases == {f"{a}/{o}" for a in ("explicit", "auto")
                   for o in ("microadam", "adam_mini")} | {
                       "auto/microadam_pallas"}
  _assert_same(got, want, runs["seed"])
  # The steps did something: parameters moved, MicroAdam's window filled.
  for case in cases:
    p1 = got[f"{case}/step1/params['fsdp']"].view(np.float32)
    p3 = got[f"{case}/step3/params['fsdp']"].view(np.float32)
    assert np.abs(p3 - p1).max() > 1e-4, case


def test_compiled_steps_gather_no_parameter(runs):
  """MicroAdam's step communicates nothing; Adam-mini's only all-reduces its
  v, a few floats per block (at most one row of 1024 here)."""
  collectives = runs["two"][1]["collectives"]
  for case, found in collectives.items():
    if "adam_mini" in case:
      assert set(found) <= {"all-reduce"}, (case, found)
      assert found.get("all-reduce", 0) <= 1024, (case, found)
    else:
      assert not found, (case, found)


def test_killed_mid_save_leaves_the_previous_checkpoint(runs):
  """Process 1 died by SIGKILL while step 3 was being saved: step 3 exists
  only as Orbax's temporary directory, and the restore takes step 2."""
  (code0, log0), (code1, log1) = runs["killed"]
  assert code1 == -signal.SIGKILL and "then killing" in log1, log1[-4000:]
  assert "] saving" in log0, log0[-4000:]
  # Process 0 waits for its peer until the test ends it (or aborts by
  # itself, on losing it): it never finishes the save.
  assert code0 != 0 and "] OK" not in log0, log0[-4000:]
  assert str(SAVE_AT) in runs["after_kill"], runs["after_kill"]
  assert str(STEPS) not in runs["after_kill"], runs["after_kill"]
  assert any(name.startswith(f"{STEPS}.") and "tmp" in name
             for name in runs["after_kill"]), runs["after_kill"]
  meta = runs["one_resumed"][1]  # restored after the kill
  assert meta["restored_step"] == SAVE_AT and meta["steps"] == [SAVE_AT], (
      meta["steps"])


def test_restore_on_the_same_mesh_resumes_bit_identically(runs):
  """Both processes restore step 2 from disk; step 3 after it is the
  uninterrupted run's."""
  assert runs["resumed"][1]["restored_step"] == SAVE_AT
  _assert_same(runs["resumed"][0], runs["two"][0], runs["seed"])
  assert any("step3" in k for k in runs["resumed"][0])


def test_restore_onto_one_process_resumes_bit_identically(runs):
  """The checkpoint of 2 processes restored by one process with 8 devices."""
  _assert_same(runs["one_resumed"][0], runs["two"][0], runs["seed"])


def test_readme_shows_what_the_worker_calls():
  """README's "On several hosts" example calls what the tested worker calls
  (a check on drift: that block needs several processes to run)."""
  readme = (HERE.parent / "README.md").read_text(encoding="utf-8")
  block = readme.split("**On several hosts.**", 1)[1].split("```python", 1)[
      1].split("```", 1)[0]
  calls = set(re.findall(r"\b(?:jax|mo|ocp)\.[\w.]+(?=\()", block))
  assert len(calls) >= 10, calls
  worker = WORKER.read_text(encoding="utf-8")
  assert not [c for c in calls if c not in worker], [
      c for c in calls if c not in worker]
