"""Deployment helpers: certificates, node keys, node data files and Flower commands.

Nothing here imports Flower: the helpers write files and build the ``flower-superlink``
/ ``flower-supernode`` / ``flwr`` command lines that ``fedrec deploy`` runs or prints.
See ``docs/DEPLOY.md``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedrec.config import DataConfig
from fedrec.data import load_dataset
from fedrec.errors import ConfigError
from fedrec.partition import partition_users
from fedrec.report import write_bytes_atomic

CATALOGUE = "catalogue.csv"


def _write_private(path: Path, data: bytes) -> None:
    write_bytes_atomic(path, data, mode=0o600)


def _write_public(path: Path, data: bytes) -> None:
    write_bytes_atomic(path, data, mode=0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certificates(out: Path, hosts: Sequence[str] = ("localhost", "127.0.0.1"),
                      days: int = 365) -> list[Path]:
    """A development CA (``ca.crt``/``ca.key``) and a server cert (``server.pem``/``.key``).

    ``hosts`` become the server certificate's subject alternative names (DNS names or
    IP addresses): the names the SuperNodes and ``flwr`` use to reach the SuperLink.
    """
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrec development CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .sign(ca_key, hashes.SHA384()))
    sans: list[x509.GeneralName] = []
    # loopback always: the Fleet gateway verifies the SuperLink behind it on 127.0.0.1
    hosts = list(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA384()))
    files = {"ca.key": _pem_key(ca_key), "server.key": _pem_key(key)}
    for name, data in files.items():
        _write_private(out / name, data)
    _write_public(out / "ca.crt", ca.public_bytes(serialization.Encoding.PEM))
    _write_public(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM))
    return [out / n for n in ("ca.crt", "ca.key", "server.pem", "server.key")]


def make_node_key(out: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode key pair (EC P-384, OpenSSH format): ``name`` and ``name.pub``."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"node key name {name!r}: use letters, digits, '_', '.', '-'")
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH)
    _write_private(out / name, priv)
    _write_public(out / f"{name}.pub", pub + f" {name}\n".encode())
    return out / name, out / f"{name}.pub"


def write_federation(flwr_home: Path, name: str, address: str, root_certificates: Path
                     ) -> Path:
    """Add (or replace) ``[superlink.NAME]`` in ``$FLWR_HOME/config.toml``."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ConfigError(f"federation name {name!r}: use letters, digits, '_', '-'")
    path = flwr_home / "config.toml"
    flwr_home.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else ""
    if text:
        try:
            tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML ({err}); fix or move it") from err
    kept, skip = [], False
    for line in text.splitlines():
        header = re.match(r"^\s*\[([^\]]+)\]", line)
        if header:
            skip = header.group(1).strip() in (f"superlink.{name}",
                                               f"superlink.{name}.options")
        if not skip:
            kept.append(line)
    block = (f'\n[superlink.{name}]\naddress = "{address}"\n'
             f'root-certificates = "{root_certificates.resolve()}"\n')
    _write_public(path, ("\n".join(kept).rstrip() + "\n" + block).lstrip().encode())
    return path


def superlink_command(certs: Path, host: str = "127.0.0.1", port: int = 8000,
                      database: str = ":flwr-in-memory:") -> list[str]:
    """``flower-superlink`` with TLS, SuperNode authentication, no runtime installs.

    In Flower 1.42 the Fleet, Control and Runtime APIs share one HTTPS address, and the
    Control API is not authenticated: keep ``host`` on loopback and let SuperNodes in
    through the Fleet gateway (``gateway_command``, ``fedrec.gateway``).
    """
    return ["flower-superlink", "--ssl-ca-certfile", str(certs / "ca.crt"),
            "--ssl-certfile", str(certs / "server.pem"),
            "--ssl-keyfile", str(certs / "server.key"),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", host, "--port", str(port), "--database", database]


def gateway_command(certs: Path, upstream: str, host: str = "0.0.0.0",
                    port: int = 9092) -> list[str]:
    """The Fleet gateway (``fedrec deploy gateway``) in front of the SuperLink."""
    return [sys.executable, "-m", "fedrec", "deploy", "gateway", "--dir", str(certs),
            "--upstream", upstream, "--host", host, "--port", str(port)]


def _die_with_parent() -> None:
    """In a child before exec (Linux): SIGKILL it when the parent dies, however it dies."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's handlers stop it instead
        pass


def run_superlink_with_gateway(superlink: list[str], certs: Path, upstream: str,
                               host: str, port: int) -> int:
    """Run the SuperLink (a child that dies with this process) and the gateway here.

    Returns when either stops (Ctrl-C/SIGTERM stop both); the SuperLink is terminated.
    """
    import threading

    from fedrec.gateway import build_server

    child = subprocess.Popen(superlink, preexec_fn=_die_with_parent)  # noqa: PLW1509
    server = build_server(upstream, certs, host, port)
    stopped: list[int] = []

    def watch() -> None:  # the SuperLink died: stop the gateway, report its code
        stopped.append(child.wait())
        server.should_exit = True

    threading.Thread(target=watch, daemon=True).start()
    try:
        up_host, up_port = upstream.rsplit(":", 1)
        wait_port(int(up_port), timeout=120, host=up_host, proc=child)
        print(f"SuperLink on {upstream} (Control API: keep it here); Fleet gateway on "
              f"{host}:{port} (SuperNodes: --superlink <this host>:{port})\nnext, here: "
              f"fedrec deploy federation --address {upstream} --dir {certs}", flush=True)
        server.run()
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
    return int(stopped[0]) if stopped and stopped[0] else 0


def _node_value(value: object) -> str:
    """A node-config value in Flower's ``key=value`` syntax."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def supernode_command(certs: Path, key: Path, superlink: str, *, data_file: Path,
                      catalogue: Path, state_dir: Path, partition_id: int = 0,
                      port: int = 9094, node: dict[str, object] | None = None,
                      trusted_entities: Path | None = None) -> list[str]:
    """``flower-supernode`` for one client machine: its key, data file and state dir.

    ``node`` adds node-owned settings the run config cannot change: how the data file
    is parsed (``sep``, ``user-col``, ...) and the node's privacy floor (``dp``,
    ``target-epsilon``, ``epsilon-cap``, ``delta``); see ``client/client_app.py``.
    """
    node_config = (f'data-file="{data_file.resolve()}" catalogue-file="{catalogue.resolve()}" '
                   f'state-dir="{state_dir.resolve()}" partition-id={partition_id}')
    for name, value in (node or {}).items():
        node_config += f" {name}={_node_value(value)}"
    cmd = ["flower-supernode", "--root-certificates", str(certs / "ca.crt"),
           "--superlink", superlink, "--auth-supernode-private-key", str(key),
           "--host", "127.0.0.1", "--port", str(port), "--node-config", node_config]
    if trusted_entities is not None:
        cmd += ["--trusted-entities", str(trusted_entities)]
    return cmd


def split_data(cfg: DataConfig, nodes: int, out: Path) -> list[Path]:
    """Cut a dataset into one ratings file per node plus the shared item catalogue.

    For trying a deployment on one machine, and for tests: in a real deployment each
    node already holds its own file. Users are assigned as in cross-silo partitioning.
    """
    data = load_dataset(cfg)
    out.mkdir(parents=True, exist_ok=True)
    cat = pd.DataFrame({"item": data.item_ids, "title": data.titles, "genres": data.genres})
    cat.to_csv(out / CATALOGUE, index=False)
    paths = [out / CATALOGUE]
    for i, users in enumerate(partition_users("cross-silo", data.n_users, nodes, cfg.seed)):
        mask = np.isin(data.users, users)
        frame = pd.DataFrame({"user": data.user_ids[data.users[mask]],
                              "item": data.item_ids[data.items[mask]],
                              "rating": data.ratings[mask],
                              "timestamp": data.timestamps[mask]})
        path = out / f"node-{i}.csv"
        frame.to_csv(path, index=False)
        paths.append(path)
    return paths


def catalogue_size(path: Path) -> int:
    """Items in an item catalogue file (its rows): the ``num-items`` of ``flwr run``."""
    try:
        return len(pd.read_csv(path))
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise ConfigError(f"{path}: not a readable item catalogue ({err})") from None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60.0, host: str = "127.0.0.1",
              proc: subprocess.Popen | None = None) -> None:
    """Block until something listens on ``host:port`` (fail early if ``proc`` exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with code {proc.returncode} before "
                               f"listening on {host}:{port}")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port}")


class Processes:
    """Started processes, each leading its own process group, stopped by PID.

    Used by the loopback test and benchmark: ``stop_all`` (call it in ``finally``)
    terminates every group (SuperNodes first, then the SuperLink) and kills what is left,
    including ``flower-superexec`` / ``flwr-clientapp`` children.
    """

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        """Start ``cmd`` in a new session; its output goes to ``logs/name.log``."""
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=self.logs)
        self.procs[name] = proc
        return proc

    def stop(self, name: str) -> None:
        """SIGTERM the process group, wait, then SIGKILL whatever remains."""
        proc = self.procs.pop(name)
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        """Stop SuperNodes first, then everything else."""
        for name in sorted(self.procs, key=lambda n: n == "superlink"):
            self.stop(name)

    def log(self, name: str) -> str:
        """The tail of a process's log."""
        return (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]
