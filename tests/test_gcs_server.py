"""The GCS harness of the tests (``gcs_server``): a real GCS server on
localhost, the environment that points etils.epath (gcsfs), orbax and
tensorstore at it, and the faults FaultProxy injects, with the retries
each client makes through them. CPU only; seconds."""

import http.client
import importlib.util
import json
import os
import socket
import urllib.error
import urllib.request

import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

import gcs_server
from gcs_server import FaultProxy, GcsServer

TREE = {"w": np.arange(12.0).reshape(3, 4), "b": {"n": np.ones(5, np.int32)}}
META = {"step": 3, "note": "hello"}


@pytest.fixture
def server(tmp_path):
  with GcsServer(root=tmp_path / "gcs", buckets=["bucket"]) as s:
    yield s


@pytest.fixture
def point_at(monkeypatch):
  """``point_at(env)``: points the GCS clients at a server for this test
  (``env``: ``GcsServer.env``'s dict); the environment and the clients are
  restored after it."""
  yield lambda env: gcs_server.apply_env(monkeypatch, env)
  monkeypatch.undo()
  gcs_server.reset_clients()


# Straight to 127.0.0.1, whatever HTTP_PROXY says.
_URLS = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url):
  with _URLS.open(url, timeout=10) as reply:
    return reply.read()


def _upload(url, bucket, name, data):
  request = urllib.request.Request(
      f"{url}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={name}",
      data=data, method="POST")
  with _URLS.open(request, timeout=10) as reply:
    return json.load(reply)


def _save_and_restore(path):
  """Saves TREE and META at step 1 of a CheckpointManager at ``path``, then
  restores them with a new manager; returns what was restored."""
  manager = ocp.CheckpointManager(path)
  try:
    manager.save(1, args=ocp.args.Composite(
        state=ocp.args.StandardSave(TREE), meta=ocp.args.JsonSave(META)))
    manager.wait_until_finished()
  finally:
    manager.close()
  manager = ocp.CheckpointManager(path)
  try:
    assert manager.latest_step() == 1
    return manager.restore(1, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(TREE), meta=ocp.args.JsonRestore()))
  finally:
    manager.close()


def _assert_restored(restored):
  np.testing.assert_array_equal(restored.state["w"], TREE["w"])
  np.testing.assert_array_equal(restored.state["b"]["n"], TREE["b"]["n"])
  assert restored.meta == META


def _clients(proxy, faulted=None):
  """The clients (``gcsfs``, ``tensorstore``, ...) of the requests
  ``proxy`` received; with ``faulted``, of those that got a fault (True) or
  did not (False)."""
  return {r.user_agent.split("/")[0].removeprefix("python-")
          for r in proxy.log
          if faulted is None or (r.fault is not None) == faulted}


# The server ------------------------------------------------------------------

def test_buckets_are_folders_and_objects_are_files(server):
  listed = json.loads(_get(f"{server.url}/storage/v1/b"))
  assert [b["name"] for b in listed["items"]] == ["bucket"]
  server.create_bucket("made")
  assert (server.root / "made").is_dir()
  with pytest.raises(urllib.error.HTTPError) as error:
    server.create_bucket("made")
  assert error.value.code == 409

  _upload(server.url, "bucket", "a%2Fb.txt", b"hello")
  assert server.objects() == ["bucket/a/b.txt"]
  assert server.objects("made") == []
  assert (server.root / "bucket" / "a" / "b.txt").read_bytes() == b"hello"
  # A file rewritten in place is served with its new bytes and old hashes.
  meta = f"{server.url}/storage/v1/b/bucket/o/a%2Fb.txt"
  md5 = json.loads(_get(meta))["md5Hash"]
  (server.root / "bucket" / "a" / "b.txt").write_bytes(b"HELLO!")
  assert _get(f"{meta}?alt=media") == b"HELLO!"
  assert json.loads(_get(meta))["md5Hash"] == md5
  # A file made by hand has no metadata: the server does not serve it.
  (server.root / "bucket" / "hand.txt").write_text("by hand")
  with pytest.raises(urllib.error.HTTPError) as error:
    _get(f"{server.url}/storage/v1/b/bucket/o/hand.txt")
  assert error.value.code == 404


def test_the_server_stops_with_its_block_and_logs_beside_its_root(tmp_path):
  with GcsServer(root=tmp_path / "gcs") as server:
    pid, url = server.pid, server.url
    _get(f"{url}/storage/v1/b")
  assert server.pid is None
  with pytest.raises(ProcessLookupError):
    os.kill(pid, 0)
  with pytest.raises(urllib.error.URLError):
    _get(f"{url}/storage/v1/b")
  assert (tmp_path / "gcs.log").exists()
  assert (tmp_path / "gcs" / "bucket").is_dir()


def test_a_server_that_cannot_start_says_why(tmp_path):
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    server = GcsServer(root=tmp_path / "gcs", port=taken.getsockname()[1])
    with pytest.raises(RuntimeError, match="address already in use"):
      server.start()


# The clients -----------------------------------------------------------------

def test_epath_writes_to_the_server_though_tensorflow_is_installed(
    server, point_at, monkeypatch):
  from etils.epath import backend, gpath  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec("tensorflow") is None:
    pytest.skip("TensorFlow is not installed: nothing to steer around")
  point_at(server.env())
  path = epath.Path("gs://bucket/x/y.txt")
  path.write_text("hello")
  assert path.read_text() == "hello"
  assert list(epath.Path("gs://bucket/x").iterdir()) == [path]
  assert path.exists() and not epath.Path("gs://bucket/x/z.txt").exists()
  assert path._backend is backend.fsspec_backend
  assert server.objects() == ["bucket/x/y.txt"]
  assert (server.root / "bucket" / "x" / "y.txt").read_text() == "hello"
  # Without EPATH_USE_TF=false epath would take TensorFlow's gfile, which
  # does not know the emulator.
  monkeypatch.delenv("EPATH_USE_TF")
  gcs_server.reset_clients()
  assert gpath._is_tf_installed()


def test_reset_clients_moves_the_clients_to_a_new_server(tmp_path, point_at):
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  path = epath.Path("gs://bucket/x.txt")
  with GcsServer(root=tmp_path / "one") as one:
    point_at(one.env())
    path.write_text("one")
    assert [p.name for p in path.parent.iterdir()] == ["x.txt"]
    fs = backend.fsspec_backend.fs("gs://bucket")
    assert backend.fsspec_backend.fs("gs://bucket") is fs
  with GcsServer(root=tmp_path / "two") as two:
    point_at(two.env())
    assert backend.fsspec_backend.fs("gs://bucket") is not fs
    assert not path.exists()
    assert list(path.parent.iterdir()) == []
    path.write_text("two")
    assert two.objects() == ["bucket/x.txt"]
  assert (tmp_path / "one" / "bucket" / "x.txt").read_text() == "one"


def test_an_orbax_checkpoint_goes_through_the_server(server, point_at):
  with FaultProxy(server.url) as proxy:
    point_at(server.env(proxy.url))
    _assert_restored(_save_and_restore(epath.Path("gs://bucket/ckpt")))
  # Both clients went to the server: gcsfs (epath) for the files, and
  # tensorstore for the arrays.
  assert {"gcsfs", "tensorstore"} <= _clients(proxy)
  assert proxy.faults == 0
  objects = server.objects("bucket/ckpt/1/")
  assert "bucket/ckpt/1/_CHECKPOINT_METADATA" in objects
  assert "bucket/ckpt/1/meta/metadata" in objects
  assert "bucket/ckpt/1/state/_METADATA" in objects
  assert any(name.startswith("bucket/ckpt/1/state/ocdbt.process_0/d/")
             for name in objects)


# The proxy -------------------------------------------------------------------

def test_the_proxy_forwards_requests_on_one_connection(server):
  large = np.random.default_rng(0).bytes(3 << 20)
  with FaultProxy(server.url) as proxy:
    connection = http.client.HTTPConnection("127.0.0.1",
                                            int(proxy.url.split(":")[-1]))
    connection.request(
        "POST", "/upload/storage/v1/b/bucket/o?uploadType=media&name=big",
        body=large)
    reply = connection.getresponse()
    assert reply.status == 200 and json.loads(reply.read())["size"] == str(
        len(large))
    first = connection.sock

    def chunks():
      yield b"chunked "
      yield b"body"
    connection.request(
        "POST", "/upload/storage/v1/b/bucket/o?uploadType=media&name=small",
        body=chunks(), encode_chunked=True)
    reply = connection.getresponse()
    assert reply.status == 200 and json.loads(reply.read())["size"] == "12"
    connection.request("GET", "/download/storage/v1/b/bucket/o/big?alt=media")
    reply = connection.getresponse()
    assert reply.status == 200 and reply.read() == large
    connection.request("HEAD",
                       "/download/storage/v1/b/bucket/o/small?alt=media")
    reply = connection.getresponse()
    assert reply.status == 200 and reply.read() == b""
    assert reply.headers["Content-Length"] == "12"
    connection.request("GET", "/storage/v1/b/bucket/o/nothing")
    reply = connection.getresponse()
    assert reply.status == 404 and json.loads(reply.read())["error"]["code"] \
        == 404
    assert connection.sock is first
    connection.close()
  assert proxy.requests == 5 and proxy.faults == 0
  assert (server.root / "bucket" / "small").read_bytes() == b"chunked body"


@pytest.mark.parametrize("kind", [429, 503])
def test_the_proxy_answers_an_error_as_gcs_does(server, kind):
  with FaultProxy(server.url, rate=1.0, kinds=[kind]) as proxy:
    with pytest.raises(urllib.error.HTTPError) as error:
      _get(f"{proxy.url}/storage/v1/b")
  assert error.value.code == kind
  body = json.loads(error.value.read())
  assert body["error"]["code"] == kind
  assert body["error"]["errors"][0]["reason"] in ("rateLimitExceeded",
                                                  "backendError")
  assert proxy.log == [gcs_server.Request(
      "GET", "/storage/v1/b", proxy.log[0].user_agent, kind)]


def test_the_proxy_drops_connections(server):
  with FaultProxy(server.url, rate=1.0, kinds=["drop"]) as proxy:
    connection = http.client.HTTPConnection("127.0.0.1",
                                            int(proxy.url.split(":")[-1]))
    connection.request("GET", "/storage/v1/b")
    with pytest.raises(http.client.RemoteDisconnected):
      connection.getresponse()
    connection.close()
  assert (proxy.requests, proxy.faults) == (1, 1)


def test_the_proxy_faults_only_what_it_is_told_and_can_change(server):
  with FaultProxy(server.url, rate=1.0, kinds=[503], methods={"POST"},
                  path_contains="name=x", max_faults=2) as proxy:
    _get(f"{proxy.url}/storage/v1/b")                       # a GET
    _upload(proxy.url, "bucket", "y", b"y")                 # another name
    for _ in range(2):
      with pytest.raises(urllib.error.HTTPError):
        _upload(proxy.url, "bucket", "x", b"x")
    _upload(proxy.url, "bucket", "x", b"x")                 # over the cap
    proxy.max_faults, proxy.methods = None, None
    with pytest.raises(urllib.error.HTTPError):
      _get(f"{proxy.url}/storage/v1/b/bucket/o?name=x")
    proxy.rate = 0.0
    _get(f"{proxy.url}/storage/v1/b/bucket/o?name=x")
  assert (proxy.requests, proxy.faults) == (7, 3)
  assert [r.fault for r in proxy.log] == [None, None, 503, 503, None, 503,
                                          None]
  assert server.objects() == ["bucket/x", "bucket/y"]


def test_the_same_seed_draws_the_same_faults(server):
  drawn = []
  for _ in range(2):
    with FaultProxy(server.url, rate=0.5, seed=7) as proxy:
      for _ in range(20):
        try:
          _get(f"{proxy.url}/storage/v1/b")
        except (urllib.error.HTTPError, http.client.HTTPException, OSError):
          pass
    drawn.append([r.fault for r in proxy.log])
  assert drawn[0] == drawn[1]
  assert None in drawn[0] and len(set(drawn[0])) > 1


# Retries through faults ------------------------------------------------------

def test_gcsfs_retries_through_faults(server, point_at, monkeypatch):
  """At most 5 faults: gcsfs (6 tries a request) must get through."""
  gcs_server.scale_gcsfs_backoff(monkeypatch, 0.01)
  with FaultProxy(server.url, rate=0.2, user_agent_contains="gcsfs",
                  max_faults=5, seed=1) as proxy:
    point_at(server.env(proxy.url))
    path = epath.Path("gs://bucket/x/y.txt")
    path.write_text("hello")
    assert path.read_text() == "hello"
    _assert_restored(_save_and_restore(epath.Path("gs://bucket/ckpt")))
  assert proxy.faults == 5
  assert _clients(proxy, faulted=True) == {"gcsfs"}


def test_tensorstore_retries_through_faults(server, point_at, monkeypatch):
  """At most 6 faults: tensorstore, 7 tries a request here, gets through."""
  gcs_server.limit_tensorstore_retries(monkeypatch, max_retries=6)
  with FaultProxy(server.url, rate=0.5, user_agent_contains="tensorstore",
                  max_faults=6, seed=1) as proxy:
    point_at(server.env(proxy.url))
    _assert_restored(_save_and_restore(epath.Path("gs://bucket/ckpt")))
  assert proxy.faults >= 1
  assert _clients(proxy, faulted=True) == {"tensorstore"}


@pytest.mark.parametrize("kind, error, message", [
    (503, "HttpError", "We encountered an internal error. Please try again., "
     "503"),
    (429, "HttpError", "Please reduce the rate of create, update, and delete "
     "requests., 429"),
    ("drop", "ServerDisconnectedError", "Server disconnected"),
])
def test_gcsfs_gives_up_after_six_tries(server, point_at, monkeypatch, kind,
                                        error, message):
  gcs_server.scale_gcsfs_backoff(monkeypatch, 0.001)
  with FaultProxy(server.url, rate=1.0, kinds=[kind]) as proxy:
    point_at(server.env(proxy.url))
    with pytest.raises(Exception, match=message) as raised:
      epath.Path("gs://bucket/x.txt").write_text("x")
  assert type(raised.value).__name__ == error
  assert proxy.requests == 6


# orbax, failing, leaves a callback for an event loop it has closed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_tensorstore_gives_up_after_its_retries(server, point_at,
                                                monkeypatch):
  gcs_server.limit_tensorstore_retries(monkeypatch, max_retries=2)
  with FaultProxy(server.url, rate=1.0, kinds=[503],
                  user_agent_contains="tensorstore") as proxy:
    point_at(server.env(proxy.url))
    with pytest.raises(ValueError, match="retry attempts failed"):
      _save_and_restore(epath.Path("gs://bucket/ckpt"))
  assert proxy.faults >= 3
