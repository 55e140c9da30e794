"""Operator error: impossible values and mismatched resumes are refused before
anything is compiled, and never change a finished run's workdir."""

import hashlib
import json
import os
import shutil

import ml_collections
import pytest

import train_utils
from ir2net_jax.configs import cifar10_resnet18, cifar10_resnet20, cifar10_vgg_small
from ir2net_jax.configs import default, digits
from ir2net_jax.configs import imagenet as imagenet_config
from ir2net_jax import data
from ir2net_jax.train import config_checks, loop, resume
# pylint: disable=unused-import


def _hashes(path):
  """{relative path: sha256} of every file under ``path``."""
  out = {}
  for d, _, files in os.walk(path):
    for f in files:
      with open(os.path.join(d, f), "rb") as fh:
        out[os.path.relpath(os.path.join(d, f), path)] = hashlib.sha256(
            fh.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, digits_dir):
  """A finished ``configs/digits.py:smoke`` run: (config, workdir, summary)."""
  path = str(tmp_path_factory.mktemp("finished"))
  config = train_utils.tiny_digits_config(digits_dir)
  summary = loop.train_and_evaluate(config, path)
  return config, path, summary


def _refused(config, workdir, message) -> str:
  """Runs ``config`` in ``workdir``; it must raise ConfigError matching
  ``message`` and leave every file as it was. Returns the message."""
  before = _hashes(workdir)
  with pytest.raises(config_checks.ConfigError, match=message) as e:
    loop.train_and_evaluate(config, str(workdir))
  assert _hashes(workdir) == before
  return str(e.value)


# The eight settings that issue 10 found accepted or failing late.
@pytest.mark.parametrize("field,value,message", [
    ("erase_lambda", -0.5, r"erase_lambda=-0.5 is not a number in \[0, 1\]"),
    ("erase_lambda", 3.0, r"erase_lambda=3.0 is not a number in \[0, 1\]"),
    ("log_every_steps", 0, "log_every_steps=0 is not an integer >= 1"),
    ("eval_every_epochs", 0, "eval_every_epochs=0 is not an integer >= 1"),
    ("prefetch", -1, "prefetch=-1 is not an integer >= 0"),
    ("keep_checkpoints", 0, "keep_checkpoints=0 is not an integer >= 1"),
    ("momentum", 1.5, r"momentum=1.5 is not a number in \[0, 1\)"),
    ("num_classes", 3, "num_classes=3 is smaller than the 10 classes"),
])
@pytest.mark.slow
def test_issue_settings_are_refused_and_leave_a_finished_run_intact(
    field, value, message, finished_run, no_compile):
  config, path, _ = finished_run
  bad = config.copy_and_resolve_references()
  bad[field] = value
  _refused(bad, path, rf"config\.{message}.*pass --config\.{field}=")


@pytest.mark.parametrize("override,message", [
    ({"optimizer": "rmsprop"}, "config.optimizer='rmsprop'"),
    ({"model": "resnet9000"}, "config.model='resnet9000' is not a model"),
    ({"batch_size": 12}, "not divisible by the 8 devices"),
    ({"loss": "distillation", "teacher_checkpoint": ""}, "needs a teacher"),
    ({"binary_compute_dtype": "int9"}, "config.binary_compute_dtype='int9' "
                                       "is not one of"),
    ({"num_train_steps": 0}, "config.num_train_steps=0"),
    ({"process_id": 1}, "config.process_id=1 is not below"),
])
def test_bad_values_fail_early_and_leave_workdir(override, message, workdir,
                                                 digits_dir, no_compile):
  c = train_utils.tiny_digits_config(digits_dir, **override)
  _refused(c, workdir, message.replace("(", r"\("))


def test_every_field_of_the_default_config_has_a_rule():
  fields = set(default.get_config().keys())
  assert set(config_checks._FIELDS) == fields  # pylint: disable=protected-access
  assert resume.RESUMABLE_FIELDS <= fields


def test_every_recipe_passes(tmp_path):
  recipes = [digits.get_config(), digits.get_config("smoke"),
             cifar10_resnet20.get_config(), cifar10_vgg_small.get_config(),
             cifar10_resnet18.get_config()]
  recipes += [imagenet_config.get_config(f"{v},stage={s}")
              for v in "abcd" for s in (1, 2)]
  for c in recipes:
    c.teacher_checkpoint = str(tmp_path)
    config_checks.validate_config(c)


@pytest.mark.parametrize("field,value", [
    ("warmup_epochs", -1.0), ("num_train_steps", -2), ("num_epochs", 0),
    ("checkpoint_every_steps", 0), ("checkpoint_every_steps", -5),
    ("image_size", 0), ("seed", -1), ("seed", True), ("seed", 2**63),
    ("learning_rate", 0.0), ("learning_rate", float("inf")),
    ("learning_rate", float("nan")), ("weight_decay", -1e-4),
    ("eval_batch_size", 0), ("num_classes", 0), ("num_classes", -2),
    ("shuffle_buffer", 0), ("stage", 3), ("momentum", 1.0),
    ("momentum", -0.1), ("information_recovery", 1), ("num_processes", 0),
    ("process_id", -1), ("dtype", "float16"), ("schedule_unit", "batch"),
])
def test_impossible_values_are_refused(field, value):
  # ConfigDict casts or refuses some types itself; turn that off to test ours.
  c = ml_collections.ConfigDict(digits.get_config("smoke").to_dict(),
                                type_safe=False)
  c[field] = value
  with pytest.raises(config_checks.ConfigError,
                     match=rf"config\.{field}=.*--config\.{field}="):
    config_checks.validate_config(c)


@pytest.mark.parametrize("field,value", [
    ("erase_lambda", 0.0), ("erase_lambda", 1.0), ("prefetch", 0),
    ("momentum", 0.0), ("warmup_epochs", 0.5), ("num_classes", 12),
    ("eval_batch_size", -1), ("checkpoint_every_steps", -1),
    ("shuffle_buffer", 100), ("seed", 2**40), ("learning_rate", 1e30),
])
def test_boundary_values_are_accepted(field, value):
  c = digits.get_config("smoke")
  c[field] = value
  config_checks.validate_config(c)


def test_labels_outside_the_models_classes_stop_the_train_pipeline(
    digits_dir):
  """Labels 5..9 of digits against a 5-class model are caught as they come;
  10 classes pass."""
  c = train_utils.tiny_digits_config(digits_dir)
  ok = data.train_iterator(c, global_batch_size=64, seed=0, num_classes=10)
  assert max(next(ok)["label"]) == 9
  bad = data.train_iterator(c, global_batch_size=64, seed=0, num_classes=5)
  with pytest.raises(data.DataError, match="digits 'train' has label [5-9], "
                     "outside the model's 5 classes"):
    next(bad)


def test_resume_with_a_result_changing_field_is_refused(finished_run,
                                                        no_compile):
  config, path, _ = finished_run
  c = config.copy_and_resolve_references()
  c.learning_rate, c.weight_decay, c.log_every_steps = 0.05, 0.0, 1
  c.model_kwargs.num_blocks = (2, 1, 1)
  msg = _refused(c, path, "would change its results")
  assert "learning_rate: 0.1 -> 0.05" in msg
  assert "weight_decay: 0.0001 -> 0.0" in msg
  assert "model_kwargs.num_blocks: [1, 1, 1] -> [2, 1, 1]" in msg
  assert "log_every_steps:" not in msg


def test_a_run_of_another_model_in_the_workdir_is_refused(finished_run,
                                                          no_compile):
  config, path, _ = finished_run
  c = config.copy_and_resolve_references()
  c.model = "cifar_vgg_small"
  _refused(c, path, "model: 'cifar_resnet20' -> 'cifar_vgg_small'")


@pytest.mark.slow
def test_rerunning_a_finished_run_only_reports_its_result(finished_run):
  config, path, summary = finished_run
  before = _hashes(path)
  c = config.copy_and_resolve_references()
  c.log_every_steps = 3   # allowed, but nothing is trained to record it for
  again = loop.train_and_evaluate(c, path)
  after = _hashes(path)
  assert after == before
  assert again["steps"] == summary["steps"]
  assert again["final_eval_top1"] == summary["final_eval_top1"]


@pytest.mark.slow
def test_resume_with_only_allowed_differences_extends_the_run(
    finished_run, tmp_path):
  config, finished, summary = finished_run
  path = str(tmp_path / "run")
  shutil.copytree(finished, path)
  before = _hashes(path)
  c = config.copy_and_resolve_references()
  c.update(num_train_steps=8, name="extended", log_every_steps=1, prefetch=0,
           eval_batch_size=8, checkpoint_every_steps=1, keep_checkpoints=3,
           eval_every_epochs=3)
  extended = loop.train_and_evaluate(c, path)
  assert extended["steps"] == 8 and summary["steps"] == 6
  with open(os.path.join(path, "summary.json")) as f:
    assert json.load(f) == extended
  after = _hashes(path)
  assert after["config.json"] == before["config.json"]
  history = [f for f in after if f.startswith("config.") and f != "config.json"]
  assert len(history) == 1
  with open(os.path.join(path, history[0])) as f:
    recorded = json.load(f)
  assert recorded["num_train_steps"] == 8 and recorded["name"] == "extended"


def test_record_config_never_overwrites(tmp_path):
  c = digits.get_config("smoke")
  resume.record_config(str(tmp_path), c)
  first = _hashes(tmp_path)
  assert list(first) == ["config.json"]
  resume.record_config(str(tmp_path), c)       # the same: nothing
  assert _hashes(tmp_path) == first
  c.log_every_steps = 1
  resume.record_config(str(tmp_path), c)       # changed: beside it
  resume.record_config(str(tmp_path), c)       # the same again
  after = _hashes(tmp_path)
  assert after["config.json"] == first["config.json"] and len(after) == 2


def test_a_field_the_old_record_lacks_does_not_block_resume(tmp_path):
  """A field added to the project since the run started is no difference."""
  c = digits.get_config("smoke")
  resume.record_config(str(tmp_path), c)
  recorded = json.loads((tmp_path / "config.json").read_text())
  del recorded["zero_to_one"]
  (tmp_path / "config.json").write_text(json.dumps(recorded))
  resume.check_resume(str(tmp_path), c)
  del c.model_kwargs["num_blocks"]   # a nested field is a difference
  with pytest.raises(config_checks.ConfigError,
                     match=r"model_kwargs.num_blocks: \[1, 1, 1\] -> \(unset\)"):
    resume.check_resume(str(tmp_path), c)


_EXACT = ("'auto', '', None, 'float32', 'bfloat16', 'float16', 'int8'")


@pytest.mark.parametrize("value", ["uint8", "uint16"])
def test_a_binary_compute_dtype_that_sums_wrongly_is_refused(
    value, workdir, digits_dir, no_compile):
  c = train_utils.tiny_digits_config(digits_dir, binary_compute_dtype=value)
  _refused(c, workdir, rf"config\.binary_compute_dtype='{value}' is not one "
           rf"of {_EXACT} .*pass --config\.binary_compute_dtype=")


@pytest.mark.parametrize("value", ["auto", "", None, "float32", "bfloat16",
                                   "float16", "int8"])
def test_exact_binary_compute_dtypes_pass_the_checks(value, no_compile):
  c = ml_collections.ConfigDict(digits.get_config("smoke").to_dict(),
                                type_safe=False)
  c.binary_compute_dtype = value
  config_checks.validate_config(c)
  config_checks.validate_eval_config(c)


def test_a_field_the_old_record_lacks_is_compared_with_what_its_run_used(
    tmp_path, caplog):
  """A run from before the fields of FIELDS_ADDED resumes with the values
  it used, or with resumable fields changed; other values are refused."""
  c = digits.get_config("smoke")
  resume.record_config(str(tmp_path), c)
  recorded = json.loads((tmp_path / "config.json").read_text())
  for field in ("xla_cpu_flags", "skip_nonfinite_updates", "remat",
                "restriction_images", "augment", "diagnostics",
                "init_from_fresh"):   # added since runs record config.json
    del recorded[field]
  (tmp_path / "config.json").write_text(json.dumps(recorded))
  # diagnostics, restriction_images and xla_cpu_flags differ: resumable.
  with caplog.at_level("WARNING"):
    resume.check_resume(str(tmp_path), c)
  assert not [r for r in caplog.records if r.levelname == "WARNING"]
  for field, value, old in (("init_from_fresh", "fc", "''"),
                            ("skip_nonfinite_updates", True, "False"),
                            ("augment", "cifar", "'auto'")):
    changed = c.copy_and_resolve_references()
    changed[field] = value
    with pytest.raises(config_checks.ConfigError) as e:
      resume.check_resume(str(tmp_path), changed)
    assert (f"{field}: {old} (not recorded: its run predates the field; "
            f"pass --config.{field}={old}) -> {value!r}") in str(e.value)
    assert "use a new --workdir" in str(e.value)


def test_where_windows_are_resized_may_change_on_resume(tmp_path):
  """input_resize changes where the grain engine resizes RandomResizedCrop
  windows, never the pixels (``test_host_recipes``' exact test), so a run
  resized on the host (what 'auto' means on a CPU, and what runs from
  before the field did) resumes on an accelerator; a field that changes
  the batches still refuses."""
  c = digits.get_config("smoke")
  c.dataset, c.augment, c.input_engine = "folder:/data/photos", "imagenet", \
      "grain"
  resume.record_config(str(tmp_path), c)
  recorded = json.loads((tmp_path / "config.json").read_text())
  del recorded["input_resize"]
  (tmp_path / "config.json").write_text(json.dumps(recorded))
  for resize in ("auto", "host", "device"):
    changed = c.copy_and_resolve_references()
    changed.input_resize = resize
    resume.check_resume(str(tmp_path), changed)
  changed.crop_scale = (0.35, 1.0)
  with pytest.raises(config_checks.ConfigError, match="crop_scale"):
    resume.check_resume(str(tmp_path), changed)
