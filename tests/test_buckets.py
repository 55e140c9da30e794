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
import uuid

import jax
import numpy as np
import pytest

import train_utils
from gcs_server import reset_clients
from ir2net_jax.storage import paths

ROOT = train_utils.ROOT
BUCKET = "runs"
SMOKE = os.path.join(ROOT, "configs", "digits.py") + ":smoke"


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
            env_url=None, tensorflow=True):
  """``launch.py`` from the empty directory ``local``, pointed at the
  server (or at ``env_url``, a proxy in front of it), output piped;
  ``tensorflow=False`` hides TensorFlow from it."""
  path = ROOT if tensorflow else os.pathsep.join(
      [train_utils.site_without_tensorflow(local.parent / "no_tf"), ROOT])
  env = dict(os.environ, **server.env(env_url), JAX_PLATFORMS="cpu",
             TMPDIR=str(local / "tmp"), PYTHONPATH=path,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "launch.py"), f"--config={config}",
       f"--workdir={workdir}",
       *overrides], cwd=local, env=env, text=True,
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


def _stop_after(proc, step, signum):
  """Sends ``signum`` once ``proc`` logged the progress line of ``step``
  (or a later one); returns its whole output once it exited."""
  lines = []
  for line in proc.stdout:
    lines.append(line)
    logged = re.search(r"step (\d+)/\d+: loss ", line)
    if logged and int(logged.group(1)) >= step:
      proc.send_signal(signum)
      break
  lines.append(proc.communicate(timeout=300)[0])
  return "".join(lines)


def _preempt_kill_resume(server, workdir, args, local, steps, rng,
                         sigterm=True):
  """With ``sigterm``, SIGTERM after a random early step: the run saves
  that step and exits 143. Then the same command, SIGKILLed after a random
  later step (maybe in a save); the same command, where TensorFlow cannot
  be imported, finishes the run. Returns ``(stopped at, killed after, last
  resumed from)`` (stopped at 0 without ``sigterm``)."""
  stopped = term_at = 0
  if sigterm:
    term_at = rng.randint(1, 4)
    out = _stop_after(_launch(server, workdir, *args, local=local), term_at,
                      signal.SIGTERM)
    stopped = int(re.search(r"preempted at step (\d+) by SIGTERM",
                            out).group(1))
    assert stopped >= term_at, out[-3000:]
    assert train_utils.final_state(workdir)[0] == stopped
    assert not paths.exists(paths.join(workdir, "summary.json"))

  kill_at = rng.randint(stopped + 3, steps - 1)
  resumed = _launch(server, workdir, *args, local=local)
  out = _stop_after(resumed, kill_at, signal.SIGKILL)
  assert resumed.returncode == -signal.SIGKILL, out[-3000:]
  if sigterm:
    assert f"resumed from step {stopped}" in out

  out = _finish(_launch(server, workdir, *args, local=local,
                        tensorflow=False))
  # Killed before its first save finished, a run without SIGTERM's save
  # starts again from step 0.
  resumed = re.search(r"resumed from step (\d+)", out)
  assert resumed or not sigterm, out[-3000:]
  last_start = int(resumed.group(1)) if resumed else 0
  stop = (f"SIGTERM after step {term_at} (stopped at {stopped}), "
          if sigterm else "")
  print(f"{workdir}: {stop}SIGKILL after step {kill_at}, resumed from "
        f"{last_start}")
  return stopped, kill_at, last_start


@pytest.mark.slow
def test_preempted_killed_and_resumed_on_a_disk_and_in_a_bucket(gcs,
                                                                 tmp_path):
  """The (light) smoke run, started from an empty local directory, with its
  workdir on the local disk (killed by SIGKILL, then finished by the same
  command) and in a bucket (stopped by SIGTERM first: the local SIGTERM is
  ``test_signals``'s), via ``_preempt_kill_resume``.
  Both end bit-identical to an uninterrupted run (at the same time). The
  bucket run's config, summary, TensorBoard events, pictures and
  checkpoints are in the bucket, nothing in the local directory or its
  TMPDIR; ``ir2net-eval --checkpoint=gs://.../best`` gives its best
  top-1."""
  steps = 14
  args = (f"--config.num_train_steps={steps}", "--config.log_every_steps=1",
          "--config.checkpoint_every_steps=2", *train_utils.LIGHT)
  ref = _launch(gcs, tmp_path / "ref", *args, local=_local(tmp_path, "ref"))
  ref_out = []
  reader = threading.Thread(target=lambda: ref_out.append(ref.communicate()[0]))
  reader.start()
  rng = random.Random()
  on_disk = tmp_path / "on_disk"
  _preempt_kill_resume(gcs, on_disk, args, _local(tmp_path, "disk"), steps,
                       rng, sigterm=False)
  url, local = _url("preempted"), _local(tmp_path)
  stopped, _, last_start = _preempt_kill_resume(gcs, url, args, local, steps,
                                                rng)
  reader.join(timeout=300)
  assert ref.returncode == 0, ref_out[0][-3000:]
  reference = train_utils.final_state(tmp_path / "ref")
  _assert_states_equal(reference, train_utils.final_state(on_disk))
  _assert_states_equal(reference, train_utils.final_state(url))

  names = _objects(gcs, url)
  for name in ("config.json", "summary.json", f"restriction/step_{steps:06d}.png",
               f"checkpoints/{steps}/state/_METADATA",
               f"checkpoints/{steps}/meta/metadata",
               f"best/{steps}/state/_METADATA"):
    assert name in names, names
  assert not [n for n in names if ".tmp" in n or "write_probe" in n], names
  _nothing_written_in(local)
  summary = json.loads(paths.read_text(f"{url}/summary.json"))
  from ir2net_jax.train import run_metrics  # pylint: disable=g-import-not-at-top
  scalars = run_metrics.read_scalars(url)
  assert [s for s, _ in scalars["eval_top1"]] == [steps]
  assert scalars["eval_top1"][-1][1] == pytest.approx(
      summary["final_eval_top1"])
  # What the killed run logged since its last upload is lost with it; what
  # the stopped run and the last one logged is there.
  logged = {s for s, _ in scalars["train_loss"]}
  assert logged >= set(range(1, stopped + 1)) | set(
      range(last_start + 1, steps + 1)), sorted(logged)

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


def _tiny_config(**overrides):
  """The smoke recipe with ``overrides``, digits on the devices, the light
  network of ``train_utils.LIGHT`` (its model ResNet-20 or IR2Net-A)."""
  return train_utils.light_digits_config(None, **overrides)


def test_corrupt_latest_checkpoint_in_a_bucket_is_set_aside_there(
    gcs, monkeypatch, caplog):
  """The latest checkpoint's objects cut to half: the run resumes from the
  one before; the corrupt one is moved aside within the bucket (a copy,
  then a delete), and so is best/'s of that step, whose place the step
  resumed from takes (copied)."""
  from ir2net_jax.io import checkpoints  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(checkpoints, "READ_RETRY_S", 0.0)
  url = _url("corrupt")
  train_utils.tiny_run(url, steps=(2, 4, 6), best_at=(4, 6))
  fs = paths.filesystem(url)
  latest = f"{url}/checkpoints/6"
  for name in fs.find(latest):
    data = fs.cat_file(name)
    fs.pipe_file(name, data[:len(data) // 2])
  with caplog.at_level("INFO"):
    step, w, meta = _tiny_states(url)
  assert (step, w) == (4, 4.0)
  assert f"cannot read the checkpoint {latest}" in caplog.text
  assert meta["best"]["step"] == 4
  aside = lambda d: [n.split("-")[0] for n in paths.listdir(f"{url}/{d}")]
  assert aside("corrupt_checkpoints") == ["6"]
  assert aside("abandoned_best") == ["6"]
  assert paths.listdir(f"{url}/checkpoints") == ["4"]
  assert paths.listdir(f"{url}/best") == ["4"]
  assert checkpoints.read_meta(f"{url}/best", 4)["best"]["step"] == 4


_TINY_IR2NET = dict(model="ir2net_a", restriction_images=0,
                    num_train_steps=2, checkpoint_every_steps=2)


@pytest.mark.slow
def test_stage2_starts_from_a_stage1_run_in_the_bucket(gcs, monkeypatch,
                                                       caplog):
  """Stage 2 reads stage 1 beside its workdir in the bucket (the default)
  and starts from its last variables; ``init_from=gs://.../stage1`` reads
  the same ones (``weights.load_variables``, what the loop calls). The
  stage-1 run is saved there as the loop saves its checkpoints (a run
  trained into the bucket: ``test_preempted_killed_and_resumed...``), from
  variables of another seed than stage 2's own initialisation."""
  from ir2net_jax import models  # pylint: disable=g-import-not-at-top
  from ir2net_jax.io import weights  # pylint: disable=g-import-not-at-top
  from ir2net_jax.train import loop, step as step_lib  # pylint: disable=g-import-not-at-top
  base = _url("stages")
  config = _tiny_config(stage=2, **_TINY_IR2NET)
  model = step_lib.build_model(config, 10)   # digits' classes
  train_utils.stage1_run(f"{base}/stage1", step_lib.build_model(
      _tiny_config(stage=1, **_TINY_IR2NET), 10),
                         config.image_size, config.seed + 1)
  _, stage1 = train_utils.final_state(f"{base}/stage1")
  started = {}
  original = weights.restore_stage1_variables

  def keep(*args, **kwargs):
    started["variables"] = original(*args, **kwargs)
    return started["variables"]
  monkeypatch.setattr(weights, "restore_stage1_variables", keep)
  with caplog.at_level("INFO"):
    loop.train_and_evaluate(config, f"{base}/stage2")
  assert (f"starting from the last stage-1 checkpoint in {base}/stage1"
          in caplog.text)
  assert paths.exists(f"{base}/stage2/summary.json")
  init_from = weights.load_variables(
      f"{base}/stage1", models.abstract_variables(model, config.image_size),
      "ir2net_a").variables
  for variables in (started["variables"], init_from):
    flat = train_utils.flat_variables(variables)
    assert flat and flat.keys() <= stage1.keys()
    for k, v in flat.items():
      np.testing.assert_array_equal(v, stage1[k], err_msg=k)


def test_array_record_data_in_a_bucket_read_as_from_a_disk(gcs, tmp_path,
                                                            monkeypatch):
  """tfds data prepared as ArrayRecord, copied to the bucket: the grain
  engine and the device engine's reader (array_record's own GCS client,
  pointed at the server by CLOUD_STORAGE_EMULATOR_ENDPOINT) give the same
  examples as from the local copy."""
  from ir2net_jax.configs import digits as digits_config  # pylint: disable=g-import-not-at-top
  from ir2net_jax.data.device import on_device  # pylint: disable=g-import-not-at-top
  from ir2net_jax.data.grain import grain_inputs  # pylint: disable=g-import-not-at-top
  from ir2net_jax.data.tf_data import digits_tfds  # pylint: disable=g-import-not-at-top
  from ir2net_jax.train import parallel  # pylint: disable=g-import-not-at-top
  if not grain_inputs.grain_installed():
    pytest.skip("grain is not installed")
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


_TF_DATA_BATCHES = r"""
import hashlib, json, sys
from ir2net_jax.configs import digits as digits_config
from ir2net_jax.data.tf_data import pipeline

def digests(data_dir):
  config = digits_config.get_config("smoke")
  config.update(dataset="tfds:ir2net_digits", data_dir=data_dir,
                input_engine="tf.data", image_size=8, eval_split="test")
  train = pipeline.train_iterator(config, global_batch_size=12, seed=3)
  batches = [next(train) for _ in range(3)]
  batches += list(pipeline.eval_iterator(config, global_batch_size=40))
  return [hashlib.sha256(b["image"].tobytes() + b["label"].tobytes())
          .hexdigest() for b in batches]

print(json.dumps({d: digests(d) for d in sys.argv[1:]}))
"""


def test_tfrecord_data_in_a_bucket_read_by_tf_data_as_from_a_disk(
    gcs, tmp_path):
  """tfds data prepared as TFRecord, copied to the bucket: the tf.data
  engine reads the records through TensorFlow's own GCS file system (which
  takes no emulator endpoint: it reaches the server through
  ``googleapis_proxy``) and the metadata through gcsfs, and gives the same
  train and eval batches as from the local copy."""
  pytest.importorskip("cryptography")
  from googleapis_proxy import GoogleApisProxy  # pylint: disable=g-import-not-at-top
  from ir2net_jax.data.tf_data import digits_tfds  # pylint: disable=g-import-not-at-top
  local = str(tmp_path / "tfds")
  digits_tfds.Ir2netDigits(data_dir=local).download_and_prepare()
  url = _url("tfds")
  paths.filesystem(url).put(os.path.join(local, "ir2net_digits"), url + "/",
                            recursive=True)
  assert any(n.endswith(".tfrecord-00000-of-00001")
             for n in _objects(gcs, url))
  with GoogleApisProxy(gcs.url) as proxy:
    env = dict(os.environ, **gcs.env(), **proxy.env(), JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT)
    result = subprocess.run(
        [sys.executable, "-c", _TF_DATA_BATCHES, url, local], env=env,
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  digests = json.loads(result.stdout.strip().splitlines()[-1])
  assert len(digests[url]) == 3 + 9 and digests[url] == digests[local]
  assert "storage.googleapis.com:443" in proxy.hosts   # TensorFlow's reads


# Faults ----------------------------------------------------------------------

def _point_at(url, server, monkeypatch):
  """This process's clients talk to ``url`` (a proxy) instead."""
  for key, value in server.env(url).items():
    monkeypatch.setenv(key, value)
  reset_clients()


@pytest.fixture
def quick_retries(monkeypatch):
  """Both clients retry as often as they do by default, but with waits of
  milliseconds rather than seconds: a test's faults then cost little."""
  from gcs_server import limit_tensorstore_retries, scale_gcsfs_backoff  # pylint: disable=g-import-not-at-top
  limit_tensorstore_retries(monkeypatch, max_retries=32)
  scale_gcsfs_backoff(monkeypatch, 0.01)


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
  from gcs_server import FaultProxy, limit_tensorstore_retries  # pylint: disable=g-import-not-at-top
  from ir2net_jax.io import checkpoints  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(checkpoints, "READ_RETRY_S", 0.0)
  url = _url("flaky")
  train_utils.tiny_run(url, steps=(2, 4, 6))
  with FaultProxy(gcs.url, rate=1.0, kinds=(503,), methods={"GET"},
                  user_agent_contains="tensorstore", max_faults=12) as proxy:
    _point_at(proxy.url, gcs, monkeypatch)
    assert _tiny_states(url)[:2] == (6, 6.0)
    assert proxy.faults == 12
    # Failing on and on: the run stops, says why, and moves nothing (a few
    # retries of each request are as good a test here as the 32 above).
    limit_tensorstore_retries(monkeypatch, max_retries=2)
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


@pytest.mark.slow
def test_storage_benchmark_compares_a_bucket_run_with_a_local_one(gcs):
  """``benchmark.storage``: a row of loop img/s for the two workdirs, and
  the bucket's runs deleted afterwards."""
  from ir2net_jax.tools.benchmark import storage  # pylint: disable=g-import-not-at-top
  url = _url("bench")
  row = storage.benchmark_storage(
      _tiny_config(log_every_steps=2, restriction_images=0), steps=4,
      bucket=url, repeats=1)
  assert len(row["local_images_per_s"]) == len(row["bucket_images_per_s"]) == 1
  assert min(row["local_images_per_s"] + row["bucket_images_per_s"]) > 0
  assert row["bucket_over_local"] == pytest.approx(
      row["bucket_images_per_s"][0] / row["local_images_per_s"][0])
  assert "| digits_resnet20 |" in storage.format_row(row)
  assert _objects(gcs, url) == []


def test_converted_weights_saved_to_and_loaded_from_a_bucket(gcs):
  """What ``ir2net-convert --output=gs://...`` writes (``save_variables``)
  and ``init_from`` / the teacher read back (``load_variables``)."""
  from ir2net_jax import models  # pylint: disable=g-import-not-at-top
  from ir2net_jax.io import weights  # pylint: disable=g-import-not-at-top
  model = models.create_model("cifar_resnet20", num_blocks=(1, 1, 1))
  variables = models.init_variables(model, 32, 3)
  url = _url("converted")
  weights.save_variables(url, variables)
  assert paths.exists(f"{url}/_CHECKPOINT_METADATA")
  loaded = weights.load_variables(url, models.abstract_variables(model, 32),
                                  "cifar_resnet20")
  assert loaded.step is None and loaded.path == url
  want = train_utils.flat_variables(variables)
  got = train_utils.flat_variables(loaded.variables)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
