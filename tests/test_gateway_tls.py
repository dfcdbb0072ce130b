"""The gateway's front door on a ``tls://`` cluster: TLS (with client certificates) and a bearer token.

tritonclient's own SSL options talk to ``python -m tdask.gateway --tls-cert --tls-key --tls-ca
--auth-token``; the certificates are made here (``cryptography``). Plain text in front of a
``tls://`` cluster is refused unless ``--insecure`` says so.
"""

from __future__ import annotations

import datetime
import gzip
import http.client
import ipaddress
import json
import os
import queue
import signal
import ssl
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from bench.gateway import start_gateway
from tdask import Deployment, OperatorConfig
from tests.conftest import ROOT, assert_no_children

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

TOKEN = "s3cret-token"


def _certificates(directory):
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def key_file(key, path):
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return str(path)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("tdask test CA"))
        .issuer_name(name("tdask test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    files = {"ca": directory / "ca.pem"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def issue(common, usage, sans):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        (directory / f"{common}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return str(directory / f"{common}.pem"), key_file(key, directory / f"{common}.key")

    files["server"], files["server_key"] = issue(
        "server",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
    )
    files["client"], files["client_key"] = issue("client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    files["ca"] = str(files["ca"])
    return files


def _cluster_env(security, directory):
    """Dask's TLS config for a process joining the cluster made with ``security``."""
    paths = {}
    for attr in ("tls_ca_file", "tls_client_cert", "tls_client_key"):
        path = directory / f"dask-{attr}.pem"
        path.write_text(getattr(security, attr))
        paths[attr] = str(path)
    return {
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": paths["tls_ca_file"],
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": paths["tls_client_cert"],
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": paths["tls_client_key"],
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("cryptography", reason="the test's certificates are made with cryptography")
    from distributed.security import Security

    directory = tmp_path_factory.mktemp("tls")
    security = Security.temporary()
    operators = [(OperatorConfig(name="echo", implementation="tests.operators:Echo"), 1)]
    with Deployment(operators, protocol="tls", security=security, dashboard_address=None) as dep:
        yield {
            "address": dep.scheduler_address,
            "env": _cluster_env(security, directory),
            "certs": _certificates(directory),
            "dir": directory,
        }
    assert_no_children()


@pytest.fixture(scope="module")
def gateway(cluster):
    certs = cluster["certs"]
    log = cluster["dir"] / "gateway.txt"
    flags = ["--tls-cert", certs["server"], "--tls-key", certs["server_key"], "--tls-ca", certs["ca"]]
    flags += ["--auth-token", TOKEN]
    proc, http_address, grpc_address = start_gateway(cluster["address"], str(log), *flags, env=cluster["env"])
    try:
        yield {"http": http_address, "grpc": grpc_address, "log": log}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def test_plain_text_in_front_of_a_tls_cluster_is_refused(cluster):
    run = subprocess.run(
        [sys.executable, "-m", "tdask.gateway", "--scheduler-address", cluster["address"]]
        + ["--http-port", "0", "--grpc-port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": ROOT, **cluster["env"]},
    )
    assert run.returncode == 1, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "--insecure" in lines[0] and "TLS" in lines[0], run.stderr


def test_insecure_serves_plain_text_when_told(cluster):
    log = cluster["dir"] / "insecure.txt"
    proc, http_address, _ = start_gateway(cluster["address"], str(log), "--insecure", env=cluster["env"])
    try:
        with httpclient.InferenceServerClient(http_address) as client:
            inp = httpclient.InferInput("x", [2], "INT64")
            inp.set_data_from_numpy(np.arange(2, dtype=np.int64))
            assert client.infer("echo", [inp]).as_numpy("x").tolist() == [0, 1]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()


def _http_client(gateway, certs, *, client_cert=True):
    options = {"ca_certs": certs["ca"]}
    if client_cert:
        options.update(certfile=certs["client"], keyfile=certs["client_key"])
    return httpclient.InferenceServerClient(gateway["http"], ssl=True, ssl_options=options)


def test_http_over_tls_with_a_client_certificate_and_the_token(cluster, gateway):
    certs = cluster["certs"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    data = np.arange(5, dtype=np.int64)
    with _http_client(gateway, certs) as client:
        inp = httpclient.InferInput("x", [5], "INT64")
        inp.set_data_from_numpy(data)
        np.testing.assert_array_equal(client.infer("echo", [inp], headers=auth).as_numpy("x"), data)
        assert client.get_model_metadata("echo", headers=auth)["name"] == "echo"
        # The health endpoints stay open; everything else wants the token.
        assert client.is_server_live() and client.is_server_ready()
        for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            with pytest.raises(InferenceServerException, match="unauthorized"):
                client.infer("echo", [inp], headers=headers)
            with pytest.raises(InferenceServerException, match="unauthorized"):
                client.get_model_metadata("echo", headers=headers)
    # No client certificate: the handshake fails.
    with _http_client(gateway, certs, client_cert=False) as client:
        with pytest.raises(Exception):  # noqa: B017 - an SSL error, whatever gevent wraps it in
            client.is_server_live()
    # Plain HTTP to the TLS port: no answer from the API.
    connection = http.client.HTTPConnection(gateway["http"], timeout=10)
    try:
        with pytest.raises((http.client.HTTPException, OSError)):
            connection.request("GET", "/v2/health/live")
            connection.getresponse().read()
    finally:
        connection.close()


def test_compressed_bodies_are_refused_by_default(cluster, gateway):
    certs = cluster["certs"]
    context = ssl.create_default_context(cafile=certs["ca"])
    context.load_cert_chain(certs["client"], certs["client_key"])
    body = json.dumps({"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [1]}]}).encode()
    connection = http.client.HTTPSConnection(gateway["http"], timeout=30, context=context)
    try:
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Encoding": "gzip"}
        connection.request("POST", "/v2/models/echo/infer", body=gzip.compress(body), headers=headers)
        response = connection.getresponse()
        answer = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 400 and "--max-inflated-bytes" in answer["error"], answer


def test_grpc_over_tls_with_a_client_certificate_and_the_token(cluster, gateway):
    certs = cluster["certs"]
    auth = {"authorization": f"Bearer {TOKEN}"}
    data = np.arange(4, dtype=np.int64)

    def client(with_cert=True):
        kwargs = {"ssl": True, "root_certificates": certs["ca"]}
        if with_cert:
            kwargs.update(private_key=certs["client_key"], certificate_chain=certs["client"])
        return grpcclient.InferenceServerClient(gateway["grpc"], **kwargs)

    with client() as c:
        inp = grpcclient.InferInput("x", [4], "INT64")
        inp.set_data_from_numpy(data)
        np.testing.assert_array_equal(c.infer("echo", [inp], headers=auth).as_numpy("x"), data)
        assert c.is_server_live() and c.is_server_ready()  # open
        for headers in (None, {"authorization": "Bearer wrong"}):
            with pytest.raises(InferenceServerException) as info:
                c.infer("echo", [inp], headers=headers)
            assert info.value.status() == "StatusCode.UNAUTHENTICATED", info.value
            with pytest.raises(InferenceServerException) as info:
                c.get_model_metadata("echo", headers=headers)
            assert info.value.status() == "StatusCode.UNAUTHENTICATED", info.value
        # The stream too: with the token it streams, without it the stream is refused.
        for headers, expected in ((auth, None), (None, "StatusCode.UNAUTHENTICATED")):
            got: queue.Queue = queue.Queue()
            c.start_stream(
                callback=lambda result, error, got=got: got.put(error if error is not None else result), headers=headers
            )
            try:
                c.async_stream_infer("echo", [inp])
            except InferenceServerException:  # refused before the request went: said in the callback
                assert expected is not None
            answer = got.get(timeout=30)
            c.stop_stream()
            if expected is None:
                np.testing.assert_array_equal(answer.as_numpy("x"), data)
            else:
                assert isinstance(answer, InferenceServerException) and answer.status() == expected, answer
    with client(with_cert=False) as c:
        with pytest.raises(InferenceServerException):
            c.is_server_live(client_timeout=10)
