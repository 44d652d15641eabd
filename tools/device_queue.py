"""A queue of benchmark jobs for a lent GPU machine: one worker per GPU.

The device tool gives a session a fixed budget of machine time, 10 minutes a
command, and kills what a command leaves running unless it started a new
process session. This queue makes the most of that: the first command starts
one worker per GPU with ``setsid`` and returns after a while; the workers take
jobs in the order of the jobs file (a job waits for the jobs named in its
``deps``) and run on while the machine stays warm; later commands only collect
the finished outputs (``collect``), so no job is cut by a command's limit.

Jobs file (JSON): a list of ``{"name": ..., "cmd": ..., "deps": [...]}``;
``cmd`` is a shell command, run from the repository root with
``CUDA_VISIBLE_DEVICES`` set to the worker's GPU, in which ``{out}`` is the
job's output folder, ``{cache}`` a folder shared by all jobs (a pre-trained
checkpoint), and ``{best_lr:JOB:TASK:OPTIMIZER}`` the best rate in JOB's
``results.json`` (``microadam-optax compare``'s) for that task and optimizer,
so that seeds can run at the rate another job tuned.

  # first command on the machine: start both workers, then collect for 9 min
  for g in 0 1; do setsid nohup python3 tools/device_queue.py worker \\
      jobs.json --gpu $g > /tmp/worker$g.log 2>&1 < /dev/null & done
  python3 tools/device_queue.py collect --out $OUT --wait 540
  # later commands while the machine is warm: collect again
  python3 tools/device_queue.py collect --out $OUT --wait 570

Several workers may share one GPU (the same ``--gpu``; set
``XLA_PYTHON_CLIENT_MEM_FRACTION`` so that their memory pools fit): more jobs
finish per device minute when single jobs leave the GPU idle (compilation,
small batches), but their timings then include the other jobs' work.

State (claimed, done and failed marks, logs, outputs) lives under ``--state``
(default ``/tmp/device_queue``); ``collect`` copies outputs, logs and the
queue's log to ``--out`` as one ``queue.tgz`` (the device returns few files)
every 15 s, so that a command stopped at its limit still returns them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tarfile
import time

DEFAULT_STATE = "/tmp/device_queue"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BEST_LR = re.compile(r"\{best_lr:([^:{}]+):([^:{}]+):([^:{}]+)\}")


def read_jobs(path: str) -> list[dict]:
  """Reads and checks a jobs file.

  Args:
    path: a JSON list of ``{"name", "cmd", "deps"?}`` objects.

  Returns:
    The jobs, in file order (the order workers take them in).

  Raises:
    ValueError: on a missing name or command, a repeated name, or a
      dependency on a job that is not in the file or comes after it.
  """
  with open(path, encoding="utf-8") as f:
    jobs = json.load(f)
  seen: set[str] = set()
  for i, job in enumerate(jobs):
    name, cmd = job.get("name"), job.get("cmd")
    if not name or not cmd or not re.fullmatch(r"[\w.-]+", name):
      raise ValueError(f"{path}: job {i} needs a 'name' (letters, digits, "
                       f"'.', '-', '_') and a 'cmd'; got {job!r}")
    if name in seen:
      raise ValueError(f"{path}: job name {name!r} is repeated")
    for dep in job.get("deps", ()):
      if dep not in seen:
        raise ValueError(f"{path}: job {name!r} depends on {dep!r}, which is "
                         f"not an earlier job of the file")
    seen.add(name)
  return jobs


def best_lr(state: str, job: str, task: str, optimizer: str) -> float:
  """The best rate that ``job``'s ``results.json`` found for ``optimizer`` on
  ``task``."""
  path = os.path.join(state, "out", job, "results.json")
  with open(path, encoding="utf-8") as f:
    report = json.load(f)
  for t in report["tasks"]:
    if t["task"] == task:
      for r in t["results"]:
        if r["name"] == optimizer:
          return r["best_lr"]
  raise KeyError(f"{path} has no result of {optimizer!r} on task {task!r}")


def expand(cmd: str, state: str, name: str) -> str:
  """``cmd`` with its placeholders filled in (module docstring)."""
  cmd = cmd.replace("{out}", os.path.join(state, "out", name))
  cmd = cmd.replace("{cache}", os.path.join(state, "cache"))
  return _BEST_LR.sub(lambda m: repr(best_lr(state, *m.groups())), cmd)


def _mark(state: str, kind: str, name: str) -> str:
  return os.path.join(state, kind, name)


def _log(state: str, message: str) -> None:
  with open(os.path.join(state, "queue.log"), "a", encoding="utf-8") as f:
    f.write(f"{time.strftime('%H:%M:%S')} {message}\n")


def worker(jobs_path: str, gpu: str, state: str, poll_s: float = 5.0) -> None:
  """Runs jobs on one GPU until every job is claimed (by this or another
  worker); a job whose dependency failed is marked failed without running."""
  env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu, PYTHONUNBUFFERED="1")
  while True:
    jobs = read_jobs(jobs_path)
    pending = [j for j in jobs
               if not os.path.exists(_mark(state, "claimed", j["name"]))]
    if not pending:
      _log(state, f"gpu {gpu}: no job left")
      return
    for job in pending:
      name, deps = job["name"], job.get("deps", [])
      failed = [d for d in deps if os.path.exists(_mark(state, "failed", d))]
      ready = all(os.path.exists(_mark(state, "done", d)) for d in deps)
      if not (failed or ready):
        continue
      try:
        os.mkdir(_mark(state, "claimed", name))
      except FileExistsError:  # another worker took it
        continue
      if failed:
        open(_mark(state, "failed", name), "w").close()
        _log(state, f"gpu {gpu}: {name} not run ({', '.join(failed)} failed)")
        break
      try:
        cmd = expand(job["cmd"], state, name)
      except (OSError, KeyError, ValueError) as e:
        open(_mark(state, "failed", name), "w").close()
        _log(state, f"gpu {gpu}: {name} not run: {e}")
        break
      os.makedirs(os.path.join(state, "out", name), exist_ok=True)
      _log(state, f"gpu {gpu}: start {name}: {cmd}")
      t0 = time.time()
      with open(os.path.join(state, "logs", name + ".log"), "w",
                encoding="utf-8") as f:
        rc = subprocess.call(cmd, shell=True, stdout=f,
                             stderr=subprocess.STDOUT, env=env, cwd=_ROOT)
      open(_mark(state, "done" if rc == 0 else "failed", name), "w").close()
      _log(state, f"gpu {gpu}: end {name} rc={rc} {time.time() - t0:.0f} s")
      break
    else:  # nothing runnable yet: wait for a dependency
      time.sleep(poll_s)


def collect(state: str, out: str, wait_s: float = 0.0,
            every_s: float = 15.0) -> str:
  """Copies the queue's outputs, logs and log to ``out/queue.tgz`` every
  ``every_s`` seconds for ``wait_s`` seconds (once when 0); returns the
  queue's log, with the tail of each unfinished job's log."""
  end = time.time() + wait_s
  target = os.path.join(out, "queue.tgz")
  while True:
    partial = target + ".part"
    with tarfile.open(partial, "w:gz") as tar:
      for sub in ("out", "logs", "queue.log"):
        if os.path.exists(os.path.join(state, sub)):
          tar.add(os.path.join(state, sub), arcname=sub)
    os.replace(partial, target)
    if time.time() >= end:
      break
    time.sleep(min(every_s, max(0.0, end - time.time())))
  lines = []
  log = os.path.join(state, "queue.log")
  if os.path.exists(log):
    with open(log, encoding="utf-8") as f:
      lines.append(f.read())
  logs = os.path.join(state, "logs")
  for name in sorted(os.listdir(logs)) if os.path.isdir(logs) else ():
    job = name[:-len(".log")]
    if not os.path.exists(_mark(state, "done", job)):
      with open(os.path.join(logs, name), encoding="utf-8") as f:
        lines.append(f"--- {job} (not done) ---\n{f.read()[-800:]}")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  w = sub.add_parser("worker", help="run jobs on one GPU")
  w.add_argument("jobs", help="the jobs file (JSON)")
  w.add_argument("--gpu", required=True,
                 help="the CUDA device this worker uses (CUDA_VISIBLE_DEVICES)")
  c = sub.add_parser("collect", help="copy finished outputs to --out")
  c.add_argument("--out", required=True)
  c.add_argument("--wait", type=float, default=0.0,
                 help="keep copying for this many seconds (default: once)")
  for p in (w, c):
    p.add_argument("--state", default=DEFAULT_STATE)
  args = parser.parse_args(argv)
  for kind in ("claimed", "done", "failed", "logs", "out", "cache"):
    os.makedirs(os.path.join(args.state, kind), exist_ok=True)
  if args.command == "worker":
    try:
      read_jobs(args.jobs)
    except (OSError, ValueError) as e:
      parser.error(str(e))
    worker(args.jobs, args.gpu, args.state)
  else:
    print(collect(args.state, args.out, args.wait))


if __name__ == "__main__":
  main()
