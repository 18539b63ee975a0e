"""Flower's deployment engine from Python: a SuperLink, SuperNodes and `flwr run` as processes (no flwr import).

    with Loopback(folder, num_clients=3) as fed:     # a SuperLink and 3 SuperNodes on 127.0.0.1
        fed.run(app_folder, {"num-server-rounds": 5})   # `flwr run APP loopback --stream`, returns its output
        fed.kill_node(2)                               # SIGKILL a SuperNode and its children (a drop-out)

Everything is started offline (`--disable-runtime-dependency-installation`: nothing is fetched or installed;
metagrad and flwr must be installed where the nodes run) and each process in its own session, so that
stopping it also ends the processes it started (flower-superexec, flwr-clientapp, flwr-serverapp). Without
`certificates` everything runs insecure (plain HTTP): for loopback only. With `certificates` (a folder from
`write_certificates`) the SuperLink serves TLS and the nodes and `flwr` verify it against the CA.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO


def executable(name: str) -> str:
    """A Flower command beside this Python (a venv's bin/) or on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    import shutil

    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed beside {sys.executable} nor on PATH: "
                                f"pip install 'metagrad[federated]'")
    return found


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free on 127.0.0.1 now."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_for_port(port: int, proc: subprocess.Popen, seconds: float) -> None:
    """Return once something listens on 127.0.0.1:`port`; raise if `proc` exits or `seconds` pass first."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the process for port {port} exited with {proc.returncode} (see its log)")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} after {seconds} s")


def stop(procs: list[subprocess.Popen], grace: float = 15.0) -> None:
    """End every process and its process group (SIGTERM, then SIGKILL after `grace` seconds)."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError):  # children left in the group (superexec, clientapp)
            os.killpg(p.pid, signal.SIGKILL)


def superlink_args(port: int, certificates: Path | None = None, host: str = "127.0.0.1") -> list[str]:
    """`flower-superlink` arguments: offline, one HTTP(S) port on `host` for the Fleet, Control and Runtime APIs
    (`host` 0.0.0.0 to be reached from other machines)."""
    tls = (["--ssl-ca-certfile", str(certificates / "ca.pem"), "--ssl-certfile", str(certificates / "server.pem"),
            "--ssl-keyfile", str(certificates / "server.key")] if certificates else ["--insecure"])
    return ["flower-superlink", *tls, "--disable-runtime-dependency-installation", "--host", host, "--port", str(port)]


def supernode_args(superlink: str, port: int, partition_id: int, certificates: Path | None = None) -> list[str]:
    """`flower-supernode` arguments for client `partition_id` (its `--node-config`)."""
    tls = ["--root-certificates", str(certificates / "ca.pem")] if certificates else ["--insecure"]
    return ["flower-supernode", *tls, "--superlink", superlink, "--port", str(port),
            "--node-config", f"partition-id={partition_id}"]


def write_profile(home: Path, name: str, address: str, certificates: Path | None = None) -> Path:
    """`home/config.toml` with the SuperLink connection `name` (what `flwr run APP name` connects to)."""
    home.mkdir(parents=True, exist_ok=True)
    tls = f'root-certificates = "{certificates / "ca.pem"}"' if certificates else "insecure = true"
    path = home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{tls}\n')
    return path


def write_certificates(folder: str | Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                       days: int = 365) -> Path:
    """A self-signed CA (`ca.pem`) and a server certificate it signs (`server.pem`, `server.key`) for `hosts`,
    made with `cryptography` (installed with flwr). For tests and private networks: anyone holding
    `ca.key` can sign servers, so keep it off the nodes."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "metagrad federated CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    plain = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "server.pem").write_bytes(cert.public_bytes(pem))
    for name, k in (("ca.key", ca_key), ("server.key", key)):
        path = folder / name
        path.write_bytes(k.private_bytes(pem, *plain))
        path.chmod(0o600)
    return folder


class Loopback:
    """A SuperLink and `num_clients` SuperNodes (partition ids 0..n-1) on 127.0.0.1, their logs in `folder`;
    a context manager that stops them all (and their children) on exit."""

    def __init__(self, folder: str | Path, num_clients: int, certificates: str | Path | None = None,
                 start_seconds: float = 120.0) -> None:
        self.folder = Path(folder)
        self.num_clients = num_clients
        self.certificates = Path(certificates).resolve() if certificates else None
        self.start_seconds = start_seconds
        self.procs: list[subprocess.Popen] = []
        self.nodes: dict[int, subprocess.Popen] = {}
        self.logs: list[TextIO] = []
        self.port, *self.node_ports = free_ports(1 + num_clients)
        host = "localhost" if self.certificates else "127.0.0.1"  # a name the certificate holds
        self.address = f"{host}:{self.port}"
        self.home = self.folder / "flwr-home"
        write_profile(self.home, "loopback", self.address, self.certificates)

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        home = self.folder / name
        home.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / f"{name}.log", "w")  # noqa: SIM115 - closed in __exit__
        self.logs.append(log)
        bin_dir = str(Path(executable(args[0])).parent)  # the SuperLink and SuperNodes start flower-superexec
        env = {**os.environ, "FLWR_HOME": str(home), "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
        p = subprocess.Popen([executable(args[0]), *args[1:]], env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def __enter__(self) -> Loopback:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            link = self._start("superlink", superlink_args(self.port, self.certificates))
            wait_for_port(self.port, link, self.start_seconds)
            for k, port in enumerate(self.node_ports):
                self.nodes[k] = self._start(f"supernode{k}", supernode_args(self.address, port, k, self.certificates))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        stop(self.procs)
        for log in self.logs:
            log.close()

    def kill_node(self, k: int) -> None:
        """SIGKILL SuperNode `k` and every process it started (its process group): a client that drops out."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.nodes[k].pid, signal.SIGKILL)
        self.nodes[k].wait(timeout=30)

    def command(self, app: str | Path, run_config: dict[str, Any] | None = None) -> list[str]:
        """`flwr run APP loopback --stream [--run-config ...]`."""
        cmd = [executable("flwr"), "run", str(app), "loopback", "--stream"]
        for k, v in (run_config or {}).items():
            cmd += ["--run-config", f"{k}={toml_value(v)}"]
        return cmd

    def popen(self, app: str | Path, run_config: dict[str, Any] | None = None) -> subprocess.Popen:
        """Start a run and return at once; its streamed log (the ServerApp's) goes to `folder/run.log`."""
        log = open(self.folder / "run.log", "w")  # noqa: SIM115 - closed in __exit__
        self.logs.append(log)
        p = subprocess.Popen(self.command(app, run_config), env={**os.environ, "FLWR_HOME": str(self.home)},
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def run(self, app: str | Path, run_config: dict[str, Any] | None = None, timeout: float = 600.0) -> str:
        """Run the app to its end and return its streamed log; raise RuntimeError if `flwr run` fails."""
        done = subprocess.run(self.command(app, run_config), env={**os.environ, "FLWR_HOME": str(self.home)},
                              capture_output=True, text=True, timeout=timeout, start_new_session=True)
        out = done.stdout + done.stderr
        if done.returncode != 0:
            raise RuntimeError(f"flwr run failed (exit code {done.returncode}):\n{out[-3000:]}")
        return out


def toml_value(v: Any) -> str:
    """A value as TOML (what `--run-config` and the app's pyproject take)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
