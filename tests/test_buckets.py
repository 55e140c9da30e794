"""Runs whose workdir is a bucket: ``--workdir=gs://BUCKET/...``.

Every test talks to a real GCS server on this machine (fake-gcs-server,
``gcs_server.GcsServer``, started once for the module), through the clients
a run uses on a pod: gcsfs (through etils.epath) for files and listings,
tensorstore (through orbax) for the checkpoints' arrays. Runs are started
from an empty local directory, which is also their ``TMPDIR``, so that a
test sees anything a run writes locally.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import jax
import numpy as np
import pytest

import train_utils
from gcs_server import GcsServer, reset_clients
from ir2net_jax.storage import paths

ROOT = train_utils.ROOT
BUCKET = "runs"
SMOKE = os.path.join(ROOT, "configs", "digits.py") + ":smoke"


@pytest.fixture(scope="module")
def server():
  with GcsServer(buckets=[BUCKET]) as gcs:
    yield gcs


@pytest.fixture
def gcs(server, monkeypatch):
  """The server, with this process's clients pointed at it."""
  for key, value in server.env().items():
    monkeypatch.setenv(key, value)
  reset_clients()
  yield server
  reset_clients()


def _url(name: str) -> str:
  """A new folder in the bucket."""
  return f"gs://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}"


def _objects(server, url: str):
  """Names of the objects under ``url``, relative to it."""
  prefix = url.split("://", 1)[1] + "/"
  return [n[len(prefix):] for n in server.objects(prefix)]


def _local(tmp_path, name="local"):
  """An empty directory for a process to start in, its ``tmp/`` its
  TMPDIR."""
  local = tmp_path / name
  (local / "tmp").mkdir(parents=True)
  return local


def _launch(server, workdir, *overrides, local, devices=1, config=SMOKE,
            env_url=None):
  """``launch.py`` from the empty directory ``local``, pointed at the
  server (or at ``env_url``, a proxy in front of it), output piped."""
  env = dict(os.environ, **server.env(env_url), JAX_PLATFORMS="cpu",
             TMPDIR=str(local / "tmp"), PYTHONPATH=ROOT,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "launch.py"), f"--config={config}",
       f"--workdir={workdir}", *overrides], cwd=local, env=env, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc, timeout=300):
  out = proc.communicate(timeout=timeout)[0]
  assert proc.returncode == 0, out[-4000:]
  return out


def _nothing_written_in(local):
  written = [str(p.relative_to(local)) for p in local.rglob("*")
             if p != local / "tmp"]
  assert not written, f"the run wrote locally: {written}"


def _assert_states_equal(a, b):
  (step_a, leaves_a), (step_b, leaves_b) = a, b
  assert step_a == step_b
  assert leaves_a.keys() == leaves_b.keys()
  for k in leaves_a:
    np.testing.assert_array_equal(leaves_a[k], leaves_b[k], err_msg=k)


@pytest.mark.slow
def test_run_in_a_bucket_writes_everything_there_and_evaluates_from_it(
    gcs, tmp_path):
  """The README's smoke run with ``--workdir=gs://...``: its config,
  summary, TensorBoard events, pictures, checkpoints and best checkpoint
  land in the bucket, nothing in the directory it started in or its
  TMPDIR; ``ir2net-eval --checkpoint=gs://.../best`` gives its best top-1."""
  url, local = _url("smoke"), _local(tmp_path)
  _finish(_launch(gcs, url, local=local))
  names = _objects(gcs, url)
  for name in ("config.json", "summary.json", "restriction/step_000006.png",
               "checkpoints/6/state/_METADATA", "checkpoints/6/meta/metadata"):
    assert name in names, names
  assert any(n.startswith("events.out.tfevents.") for n in names), names
  assert any(re.fullmatch(r"best/\d+/state/_METADATA", n) for n in names)
  assert not [n for n in names if ".tmp" in n or "write_probe" in n], names
  _nothing_written_in(local)

  summary = json.loads(paths.read_text(f"{url}/summary.json"))
  assert summary["steps"] == 6
  from ir2net_jax.train import run_metrics  # pylint: disable=g-import-not-at-top
  scalars = run_metrics.read_scalars(url)
  assert [s for s, _ in scalars["eval_top1"]] == [6]
  assert scalars["eval_top1"][-1][1] == pytest.approx(
      summary["final_eval_top1"])
  assert len(scalars["train_loss"]) == 3   # steps 2, 4, 6

  env = dict(os.environ, **gcs.env(), JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             TMPDIR=str(local / "tmp"))
  evaluated = subprocess.run(
      [sys.executable, "-m", "ir2net_jax.tools.eval",
       f"--checkpoint={url}/best", f"--output={url}/eval/best.json"],
      cwd=local, env=env, capture_output=True, text=True, timeout=300)
  assert evaluated.returncode == 0, evaluated.stderr[-4000:]
  result = json.loads(paths.read_text(f"{url}/eval/best.json"))
  assert result["top1"] == pytest.approx(summary["best_eval_top1"], abs=1e-6)
  _nothing_written_in(local)


def _stop_after(proc, step, signum):
  """Sends ``signum`` once ``proc`` logged the train metrics of ``step``
  (or a later one); returns its whole output once it exited."""
  lines = []
  for line in proc.stdout:
    lines.append(line)
    logged = re.search(r"\[(\d+)\] .*train_loss=", line)
    if logged and int(logged.group(1)) >= step:
      proc.send_signal(signum)
      break
  lines.append(proc.communicate(timeout=300)[0])
  return "".join(lines)


@pytest.mark.slow
def test_bucket_run_stops_on_sigterm_survives_sigkill_and_resumes_bit_identically(
    gcs, tmp_path):
  """SIGTERM: the run saves its step to the bucket and exits 143; SIGKILL
  at a random later step, maybe during a save; the same command then
  finishes the run from the bucket. The final state is bit-identical to an
  uninterrupted run's (in a local workdir, at the same time)."""
  steps = 14
  args = (f"--config.num_train_steps={steps}", "--config.log_every_steps=1",
          "--config.checkpoint_every_steps=2")
  local = _local(tmp_path)
  ref = _launch(gcs, tmp_path / "ref", *args, local=_local(tmp_path, "ref"))
  ref_out = []
  reader = threading.Thread(target=lambda: ref_out.append(ref.communicate()[0]))
  reader.start()
  url = _url("preempted")
  rng = random.Random()
  term_at = rng.randint(1, 4)
  out = _stop_after(_launch(gcs, url, *args, local=local), term_at,
                    signal.SIGTERM)
  stopped = int(re.search(r"preempted at step (\d+) by SIGTERM", out).group(1))
  assert stopped >= term_at, out[-3000:]
  names = _objects(gcs, url)
  assert f"checkpoints/{stopped}/state/_METADATA" in names, names
  assert "summary.json" not in names

  kill_at = rng.randint(stopped + 1, steps - 1)
  resumed = _launch(gcs, url, *args, local=local)
  out = _stop_after(resumed, kill_at, signal.SIGKILL)
  assert resumed.returncode == -signal.SIGKILL, out[-3000:]
  assert f"resumed from step {stopped}" in out

  out = _finish(_launch(gcs, url, *args, local=local))
  assert re.search(r"resumed from step \d+", out), out[-3000:]
  reader.join(timeout=300)
  assert ref.returncode == 0, ref_out[0][-3000:]
  _assert_states_equal(train_utils.final_state(tmp_path / "ref"),
                       train_utils.final_state(url))
  _nothing_written_in(local)
  print(f"SIGTERM after step {term_at} (stopped at {stopped}), SIGKILL after "
        f"step {kill_at}")


def _tiny_config(**overrides):
  c = train_utils.tiny_digits_config(None)   # digits on the devices
  c.update(overrides)
  return c


@pytest.mark.slow
def test_corrupt_latest_checkpoint_in_a_bucket_falls_back_and_retrains(
    gcs, monkeypatch, caplog):
  from ir2net_jax.io import checkpoints  # pylint: disable=g-import-not-at-top
  from ir2net_jax.train import loop  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(checkpoints, "READ_RETRY_S", 0.0)
  c, url = _tiny_config(), _url("corrupt")   # saves at steps 2, 4, 6
  loop.train_and_evaluate(c, url)
  good = train_utils.final_state(url)
  fs = paths.filesystem(url)
  latest = f"{url}/checkpoints/6"
  for name in fs.find(latest):   # every object cut to half its bytes
    data = fs.cat_file(name)
    fs.pipe_file(name, data[:len(data) // 2])
  fs.rm(f"{url}/summary.json")
  with caplog.at_level("INFO"):
    loop.train_and_evaluate(c, url)
  assert f"cannot read the checkpoint {latest}" in caplog.text
  assert "resumed from step 4" in caplog.text
  aside = paths.listdir(f"{url}/corrupt_checkpoints")
  assert [d.split("-")[0] for d in aside] == ["6"]
  _assert_states_equal(train_utils.final_state(url), good)
  assert [d.split("-")[0] for d in paths.listdir(f"{url}/abandoned_best")
          ] == ["6"]
  assert checkpoints.latest_step(f"{url}/best") == 6


_TINY_IR2NET = dict(model="ir2net_a", restriction_images=0,
                    num_train_steps=2, checkpoint_every_steps=2)


@pytest.mark.slow
def test_stage2_starts_from_a_stage1_run_in_the_bucket(gcs, monkeypatch,
                                                       caplog):
  """Stage 2 reads stage 1 beside its workdir in the bucket (the default)
  or from ``init_from=gs://...``, and starts from its last variables."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ir2net_jax.io import weights  # pylint: disable=g-import-not-at-top
  from ir2net_jax.train import loop  # pylint: disable=g-import-not-at-top
  base = _url("stages")
  kwargs = ml_collections.ConfigDict({"num_blocks": (1, 1, 1, 1)})
  loop.train_and_evaluate(
      _tiny_config(stage=1, model_kwargs=kwargs, **_TINY_IR2NET),
      f"{base}/stage1")
  _, stage1 = train_utils.final_state(f"{base}/stage1")
  started = {}   # what each loader returned last

  def keep(name, load):
    def wrapped(*args, **kwargs):
      started[name] = load(*args, **kwargs)
      return started[name]
    monkeypatch.setattr(weights, name, wrapped)
  for name in ("restore_stage1_variables", "load_variables"):
    keep(name, getattr(weights, name))
  with caplog.at_level("INFO"):
    loop.train_and_evaluate(
        _tiny_config(stage=2, model_kwargs=kwargs, **_TINY_IR2NET),
        f"{base}/stage2")
    loop.train_and_evaluate(
        _tiny_config(stage=2, model_kwargs=kwargs, init_from=f"{base}/stage1",
                     **_TINY_IR2NET), f"{base}/stage2_init_from")
  assert (f"starting from the last stage-1 checkpoint in {base}/stage1"
          in caplog.text)
  assert f"starting from the variables in {base}/stage1" in caplog.text
  for variables in (started["restore_stage1_variables"],
                    started["load_variables"].variables):
    flat = train_utils.flat_variables(variables)
    assert flat and flat.keys() <= stage1.keys()
    for k, v in flat.items():
      np.testing.assert_array_equal(v, stage1[k], err_msg=k)
  assert paths.exists(f"{base}/stage2/summary.json")
  assert paths.exists(f"{base}/stage2_init_from/summary.json")


# The pod: hosts that share no disk. In float32 a binary network's training
# is chaotic across device counts (test_multihost.py says why), so the
# parameters are held still and the first BatchNorm's statistics, which
# depend on the data alone, compared with one process.
POD_STEPS = 10
POD_ARGS = ("--config.log_every_steps=1", "--config.checkpoint_every_steps=1000",
            "--config.learning_rate=1e-9", f"--config.num_train_steps={POD_STEPS}")
FIRST_BN = "['batch_stats']['bn1']"


def _hosts(server, workdir, tmp_path, name):
  """Processes 0 and 1 of a run, 2 devices each, each started in its own
  empty directory (its TMPDIR and data_dir inside it): no local path in
  common."""
  port = train_utils.free_port()
  procs = []
  for i in range(2):
    local = tmp_path / f"{name}_host{i}"
    if not local.exists():
      (local / "tmp").mkdir(parents=True)
    procs.append(_launch(
        server, workdir, *POD_ARGS, f"--config.data_dir={local / 'tfds'}",
        f"--config.coordinator_address=127.0.0.1:{port}",
        "--config.num_processes=2", f"--config.process_id={i}",
        local=local, devices=2))
  return procs


def _preempt(procs, after_step=1):
  """SIGTERM to process 1 once process 0 logged ``after_step``; both must
  exit 143. Returns their logs."""
  logs, stepping = [[], []], threading.Event()

  def read(i):
    for line in procs[i].stdout:
      logs[i].append(line)
      logged = re.search(r"\[(\d+)\] .*train_loss=", line)
      if i == 0 and logged and int(logged.group(1)) >= after_step:
        stepping.set()
  readers = [threading.Thread(target=read, args=(i,)) for i in range(2)]
  for r in readers:
    r.start()
  try:
    assert stepping.wait(timeout=300), "".join(logs[0])[-3000:]
    procs[1].send_signal(signal.SIGTERM)   # process 0 hears it from JAX
    for p, r in zip(procs, readers):
      p.wait(timeout=300)
      r.join()
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  outs = ["".join(log) for log in logs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 128 + signal.SIGTERM, f"process {i}:\n{out[-3000:]}"
  return outs


@pytest.mark.slow
def test_two_hosts_without_a_shared_disk_train_into_one_bucket(gcs, tmp_path):
  """The pod case: two processes, no local path in common, one gs://
  workdir. They train like one process with as many devices; preempted by
  SIGTERM and started again, they end bit-identical to an uninterrupted
  pair; and neither writes anything locally."""
  ref, run = _url("pod_ref"), _url("pod_run")
  single_dir = _local(tmp_path, "single")
  single = _launch(gcs, tmp_path / "single_run", *POD_ARGS, local=single_dir,
                   devices=4)
  logs = [_finish(p, timeout=600)
          for p in _hosts(gcs, ref, tmp_path, "ref") + [single]]
  assert "process 0 of 2" in logs[0] and "process 1 of 2" in logs[1]

  _, pair = train_utils.final_state(ref)
  _, one = train_utils.final_state(tmp_path / "single_run")
  first_bn = [k for k in one if k.startswith(FIRST_BN)]
  assert len(first_bn) == 2, first_bn
  for k in first_bn:   # the same images in the same steps
    np.testing.assert_allclose(pair[k], one[k], rtol=1e-3, err_msg=k)
  summary = json.loads(paths.read_text(f"{ref}/summary.json"))
  assert (summary["processes"], summary["devices"]) == (2, 4)
  names = _objects(gcs, ref)
  for i in range(2):   # each process wrote its own shard of the arrays
    assert any(f"ocdbt.process_{i}/" in n for n in names), names

  outs = _preempt(_hosts(gcs, run, tmp_path, "run"))
  stopped = {m for out in outs
             for m in re.findall(r"preempted at step (\d+) by SIGTERM", out)}
  assert len(stopped) == 1, stopped
  step = stopped.pop()
  assert f"checkpoints/{step}/state/_METADATA" in _objects(gcs, run)
  logs = [_finish(p, timeout=600) for p in _hosts(gcs, run, tmp_path, "run")]
  for log in logs:
    assert f"resumed from step {step}" in log
  _assert_states_equal(train_utils.final_state(run),
                       train_utils.final_state(ref))
  for i in range(2):
    for name in ("ref", "run"):
      local = tmp_path / f"{name}_host{i}"
      written = [str(p.relative_to(local)) for p in local.rglob("*")
                 if p.name not in ("tmp", "tfds")]
      assert not written, f"host {i} wrote locally: {written}"


def test_array_record_data_in_a_bucket_read_as_from_a_disk(gcs, tmp_path,
                                                            monkeypatch):
  """tfds data prepared as ArrayRecord, copied to the bucket: the grain
  engine and the device engine's reader (array_record's own GCS client,
  pointed at the server by CLOUD_STORAGE_EMULATOR_ENDPOINT) give the same
  examples as from the local copy."""
  from ir2net_jax.configs import digits as digits_config  # pylint: disable=g-import-not-at-top
  from ir2net_jax.data import digits_tfds, grain_inputs, on_device  # pylint: disable=g-import-not-at-top
  from ir2net_jax.train import parallel  # pylint: disable=g-import-not-at-top
  if not grain_inputs.grain_installed():
    pytest.skip("grain is not installed")
  monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", gcs.url)
  local = str(tmp_path / "tfds")
  digits_tfds.Ir2netDigits(data_dir=local).download_and_prepare(
      file_format="array_record")
  url = _url("tfds")
  paths.filesystem(url).put(os.path.join(local, "ir2net_digits"), url + "/",
                            recursive=True)

  def eval_examples(data_dir):
    config = digits_config.get_config("smoke")
    config.update(dataset="tfds:ir2net_digits", data_dir=data_dir,
                  input_engine="grain", input_workers=0, batch_size=12,
                  image_size=8, eval_split="test")
    inputs = grain_inputs.GrainInputs(
        config, parallel.data_mesh(jax.devices()[:1]), 40, 10)
    out = []
    for batch in inputs.host_eval_batches():
      real = batch["mask"] > 0
      out += zip(batch["label"][real].tolist(),
                 [x.tobytes() for x in batch["image"][real]])
    return sorted(out)

  from_bucket = eval_examples(url)
  assert len(from_bucket) == 360 and from_bucket == eval_examples(local)
  for a, b in zip(on_device._tfds_arrays("ir2net_digits", url, "test"),  # pylint: disable=protected-access
                  on_device._tfds_arrays("ir2net_digits", local, "test")):  # pylint: disable=protected-access
    np.testing.assert_array_equal(a, b)


# Faults ----------------------------------------------------------------------

def _point_at(url, server, monkeypatch):
  """This process's clients talk to ``url`` (a proxy) instead."""
  for key, value in server.env(url).items():
    monkeypatch.setenv(key, value)
  reset_clients()


@pytest.fixture
def quick_retries(monkeypatch):
  """tensorstore's retries of failed GCS requests 10 ms apart rather than
  1 s, doubling up to 32 s (its default): a test's faults then cost
  milliseconds. What is retried, and how often, is unchanged."""
  from orbax.checkpoint._src.serialization import tensorstore_utils  # pylint: disable=g-import-not-at-top
  retries = {"gcs_request_retries": {"max_retries": 32,
                                     "initial_delay": "10ms",
                                     "max_delay": "100ms"}}
  for name in ("_BASE_TS_CONTEXT", "_DEFAULT_OCDBT_TS_CONTEXT"):
    monkeypatch.setattr(tensorstore_utils, name,
                        {**getattr(tensorstore_utils, name), **retries})


def _tiny_states(workdir):
  """``{step: w}`` of a ``train_utils.tiny_run`` in ``workdir``."""
  from ir2net_jax.io import checkpoints  # pylint: disable=g-import-not-at-top
  ckpts = checkpoints.Checkpoints(workdir)
  try:
    state, meta = ckpts.restore(train_utils.tiny_state(0.0))
  finally:
    ckpts.close()
  return int(state["step"]), float(np.asarray(state["params"]["w"])[0]), meta


def test_saves_and_restores_ride_out_transient_faults(gcs, monkeypatch,
                                                     quick_retries):
  """Requests of both clients (gcsfs: listings and small files;
  tensorstore: the arrays) answered 429, 503 or not at all, now and then,
  while a run saves and then restores: both finish, with the right
  state."""
  from gcs_server import FaultProxy  # pylint: disable=g-import-not-at-top
  url = _url("faults")
  with FaultProxy(gcs.url, rate=0.1, seed=1, max_faults=16) as proxy:
    _point_at(proxy.url, gcs, monkeypatch)
    train_utils.tiny_run(url, steps=(2, 4, 6), best_at=(4,))
    assert _tiny_states(url)[:2] == (6, 6.0)
    assert proxy.faults > 5, (proxy.faults, proxy.requests)
    faulted = {r.user_agent.split("/")[0] for r in proxy.log if r.fault}
    kinds = {r.fault for r in proxy.log if r.fault}
  _point_at(gcs.url, gcs, monkeypatch)
  assert any("tensorstore" in a for a in faulted), faulted
  assert any("gcsfs" in a for a in faulted), faulted
  assert len(kinds) >= 2, kinds
  names = _objects(gcs, url)
  assert not [n for n in names if "corrupt" in n or "abandoned" in n], names


def test_a_checkpoint_read_that_fails_for_a_while_is_not_set_aside(
    gcs, monkeypatch, quick_retries):
  """Every array read fails (503) a few times in a row: the checkpoint is
  read on a later try and nothing is moved; the newest step is restored.
  Reads that keep failing stop the run with an I/O error, nothing moved:
  a good checkpoint is never set aside for a server's hiccup."""
  from gcs_server import FaultProxy  # pylint: disable=g-import-not-at-top
  from ir2net_jax.io import checkpoints  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(checkpoints, "READ_RETRY_S", 0.0)
  url = _url("flaky")
  train_utils.tiny_run(url, steps=(2, 4, 6))
  with FaultProxy(gcs.url, rate=1.0, kinds=(503,), methods={"GET"},
                  user_agent_contains="tensorstore", max_faults=12) as proxy:
    _point_at(proxy.url, gcs, monkeypatch)
    assert _tiny_states(url)[:2] == (6, 6.0)
    assert proxy.faults == 12
    # Failing on and on: the run stops, says why, and moves nothing.
    proxy.max_faults = None
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"failed with an I/O error .*Nothing was moved"):
      _tiny_states(url)
  _point_at(gcs.url, gcs, monkeypatch)
  assert "corrupt_checkpoints" not in paths.listdir(url)
  assert sorted(paths.listdir(f"{url}/checkpoints")) == ["4", "6"]


def test_a_checkpoint_cut_short_is_never_taken_for_a_good_one(gcs):
  """What a save killed half-way leaves in a bucket (some arrays written,
  orbax's commit marker not): the run resumes from the step before."""
  url = _url("partial")
  train_utils.tiny_run(url, steps=(2, 4, 6))
  fs = paths.filesystem(url)
  written = sorted(fs.find(f"{url}/checkpoints/6"))
  for name in written:
    if name.endswith("commit_success.txt") or "/meta/" in name:
      fs.rm(name)
  step, w, _ = _tiny_states(url)
  assert (step, w) == (4, 4.0)
