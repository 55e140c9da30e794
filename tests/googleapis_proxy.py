"""TensorFlow's own GCS file system pointed at the test server.

TensorFlow's ``gs://`` file system (what tf.data reads TFRecord files
through) takes no emulator endpoint: it always asks
``https://www.googleapis.com`` and ``https://storage.googleapis.com``. It
does use libcurl, which honours ``HTTPS_PROXY``, and TensorFlow gives curl
the CA bundle ``CURL_CA_BUNDLE`` names. ``GoogleApisProxy`` is such a
proxy: it accepts ``CONNECT *.googleapis.com:443``, makes the TLS handshake
itself with a certificate for those names (made here, and trusted through
``CURL_CA_BUNDLE``), and relays the decrypted HTTP to the test server, which
serves both the JSON API and ``storage.googleapis.com``'s download paths.
No request leaves the machine: anything but a googleapis.com host is
refused.

Reads (stat, listing, ranged reads) work; TensorFlow's resumable uploads
do not (the server returns an ``http://`` upload URL, which curl would take
past the proxy), so tests write through gcsfs and read through TensorFlow.

Use::

  with GoogleApisProxy(server.url) as proxy:
    env = dict(server.env(), **proxy.env())   # for a child process
"""

import datetime
import os
import shutil
import socket
import ssl
import tempfile
import threading
from typing import Dict, List

__all__ = ["GoogleApisProxy"]


def _write_certificate(directory: str):
  """A self-signed certificate for ``*.googleapis.com`` and its key, as PEM
  files in ``directory``: ``(certificate path, key path)``."""
  from cryptography import x509  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives import hashes, serialization  # pylint: disable=g-import-not-at-top,g-multiple-import
  from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=g-import-not-at-top
  from cryptography.x509.oid import NameOID  # pylint: disable=g-import-not-at-top
  key = ec.generate_private_key(ec.SECP256R1())
  name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                       "googleapis.test")])
  now = datetime.datetime.now(datetime.timezone.utc)
  certificate = (
      x509.CertificateBuilder().subject_name(name).issuer_name(name)
      .public_key(key.public_key()).serial_number(x509.random_serial_number())
      .not_valid_before(now - datetime.timedelta(hours=1))
      .not_valid_after(now + datetime.timedelta(days=1))
      .add_extension(x509.SubjectAlternativeName(
          [x509.DNSName("*.googleapis.com")]), critical=False)
      .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                     critical=True)
      .sign(key, hashes.SHA256()))
  cert_path = os.path.join(directory, "googleapis.pem")
  key_path = os.path.join(directory, "googleapis.key")
  with open(cert_path, "wb") as f:
    f.write(certificate.public_bytes(serialization.Encoding.PEM))
  with open(key_path, "wb") as f:
    f.write(key.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
  return cert_path, key_path


def _relay(source: socket.socket, sink: socket.socket) -> None:
  try:
    while True:
      data = source.recv(1 << 16)
      if not data:
        break
      sink.sendall(data)
  except OSError:
    pass
  finally:
    for end in (source, sink):
      try:
        end.shutdown(socket.SHUT_RDWR)
      except OSError:
        pass


class GoogleApisProxy:
  """A CONNECT proxy on 127.0.0.1 for ``*.googleapis.com:443`` that ends
  TLS itself and relays to ``target`` (``http://127.0.0.1:PORT``).

  Attributes:
    hosts: the ``host:port`` of every CONNECT it accepted, in order.
  """

  def __init__(self, target: str):
    host, _, port = target.removeprefix("http://").rstrip("/").partition(":")
    self._target = (host, int(port or 80))
    self.hosts: List[str] = []
    self._dir = None
    self._listener = None
    self._context = None

  def __enter__(self) -> "GoogleApisProxy":
    self._dir = tempfile.mkdtemp(prefix="googleapis_proxy_")
    self.certificate, key = _write_certificate(self._dir)
    self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self._context.load_cert_chain(self.certificate, key)
    self._listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=self._serve, daemon=True,
                     name="GoogleApisProxy").start()
    return self

  def __exit__(self, *exc_info) -> None:
    self._listener.close()
    shutil.rmtree(self._dir, ignore_errors=True)

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

  def env(self) -> Dict[str, str]:
    """What a child process needs for TensorFlow to come through here:
    the proxy and the certificate (``GcsServer.env`` sets the test token,
    and ``NO_GCE_CHECK``, which TensorFlow also reads: no search for a GCE
    metadata server)."""
    return {"HTTPS_PROXY": self.url, "https_proxy": self.url,
            "CURL_CA_BUNDLE": self.certificate}

  def _serve(self) -> None:
    while True:
      try:
        client, _ = self._listener.accept()
      except OSError:   # closed
        return
      threading.Thread(target=self._handle, args=(client,),
                       daemon=True).start()

  def _handle(self, client: socket.socket) -> None:
    request = client.makefile("rb")
    words = request.readline().decode("latin-1").split()
    while request.readline() not in (b"\r\n", b"\n", b""):
      pass
    host = words[1] if len(words) == 3 else ""
    if words[:1] != ["CONNECT"] or not host.endswith(".googleapis.com:443"):
      client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
      client.close()
      return
    self.hosts.append(host)
    client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
    try:
      secure = self._context.wrap_socket(client, server_side=True)
      upstream = socket.create_connection(self._target)
    except OSError:
      client.close()
      return
    threading.Thread(target=_relay, args=(upstream, secure),
                     daemon=True).start()
    _relay(secure, upstream)
