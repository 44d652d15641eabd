"""The device job queue (tools/device_queue.py): two workers, order,
dependencies, failures and the tuned-rate placeholder."""

import json
import os
import subprocess
import sys
import tarfile

import pytest

from tools import device_queue

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _report(lr):
  """A results.json as `microadam-optax compare` writes it (the fields the
  queue reads)."""
  return json.dumps({"tasks": [{"task": "lm", "results": [
      {"name": "adamw", "best_lr": 1.0}, {"name": "gn_full", "best_lr": lr}]}]})


def test_two_workers_run_every_job_once_in_dependency_order(tmp_path):
  state, out = tmp_path / "state", tmp_path / "out"
  out.mkdir()
  py = sys.executable
  write = (f"{py} -c \"import sys; open(sys.argv[1] + '/results.json', 'w')"
           f".write(sys.argv[2])\" {{out}}")
  jobs = [
      {"name": "tune", "cmd": f"sleep 0.5; {write} '{_report(0.003)}'"},
      {"name": "other", "cmd": "echo $CUDA_VISIBLE_DEVICES > {out}/gpu"},
      {"name": "seeds", "deps": ["tune"],
       "cmd": "echo {best_lr:tune:lm:gn_full} > {out}/lr; ls {cache}"},
      {"name": "broken", "cmd": "exit 3"},
      {"name": "after_broken", "deps": ["broken"], "cmd": "touch {out}/ran"},
  ]
  path = tmp_path / "jobs.json"
  path.write_text(json.dumps(jobs))
  workers = [subprocess.Popen(
      [py, "-m", "tools.device_queue", "worker", str(path), "--gpu", str(g),
       "--state", str(state)], cwd=_ROOT) for g in (0, 1)]
  for w in workers:
    assert w.wait(timeout=120) == 0
  done = set(os.listdir(state / "done"))
  failed = set(os.listdir(state / "failed"))
  assert done == {"tune", "other", "seeds"}
  assert failed == {"broken", "after_broken"}
  assert (state / "out" / "seeds" / "lr").read_text().strip() == "0.003"
  assert (state / "out" / "other" / "gpu").read_text().strip() in {"0", "1"}
  assert not (state / "out" / "after_broken" / "ran").exists()
  log = (state / "queue.log").read_text()
  # every job started once; the dependent one after its dependency ended
  for job in ("tune", "other", "seeds", "broken"):
    assert log.count(f"start {job}:") == 1, log
  assert log.index("end tune rc=0") < log.index("start seeds:")
  assert "after_broken not run (broken failed)" in log
  assert "gpu 0: no job left" in log and "gpu 1: no job left" in log
  # collect returns the outputs as one archive, and the log
  text = device_queue.collect(str(state), str(out))
  assert "end seeds rc=0" in text
  with tarfile.open(out / "queue.tgz") as tar:
    names = set(tar.getnames())
  assert {"out/tune/results.json", "out/seeds/lr", "logs/broken.log",
          "queue.log"} <= names


def test_jobs_file_errors_name_the_job(tmp_path):
  path = tmp_path / "jobs.json"
  for jobs, match in (
      ([{"name": "a"}], "needs a 'name'"),
      ([{"name": "a b", "cmd": "true"}], "needs a 'name'"),
      ([{"name": "a", "cmd": "true"}, {"name": "a", "cmd": "true"}],
       "'a' is repeated"),
      ([{"name": "a", "cmd": "true", "deps": ["b"]},
        {"name": "b", "cmd": "true"}], "depends on 'b'")):
    path.write_text(json.dumps(jobs))
    with pytest.raises(ValueError, match=match):
      device_queue.read_jobs(str(path))


def test_best_lr_placeholder_names_a_missing_result(tmp_path):
  (tmp_path / "out" / "tune").mkdir(parents=True)
  (tmp_path / "out" / "tune" / "results.json").write_text(_report(0.01))
  assert device_queue.expand("--lr-grid x={best_lr:tune:lm:gn_full}",
                             str(tmp_path), "seeds") == "--lr-grid x=0.01"
  with pytest.raises(KeyError, match="muon"):
    device_queue.expand("{best_lr:tune:lm:muon}", str(tmp_path), "seeds")
