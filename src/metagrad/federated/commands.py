"""`metagrad federated ...`: Flower's deployment engine with metagrad's apps, offline (nothing fetched at run time).

    metagrad federated app DIR [--set key=value ...]           write the Flower app (its run config) into DIR
    metagrad federated loopback --num-clients 3 [--tls] ...    SuperLink + SuperNodes on 127.0.0.1, one run, stop
    metagrad federated certificates DIR [--host NAME ...]       a self-signed CA and server certificate (TLS)
    metagrad federated superlink [--host 0.0.0.0] [--port 9092] [--certificates DIR | --insecure]
    metagrad federated supernode --superlink HOST:PORT --partition-id K [--certificates DIR | --insecure]
    metagrad federated run DIR --superlink HOST:PORT [--certificates DIR | --insecure] [--set key=value ...]

The run config keys are those of `metagrad.federated.flower.DEFAULTS` (README: Federated meta-learning).
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

from metagrad.federated import deploy


def _config(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs as run-config values: integers, floats and true/false typed, the rest strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes key=value, got {pair!r}")
        out[key] = {"true": True, "false": False}.get(value, value)
        for kind in (int, float):
            try:
                out[key] = kind(value)
                break
            except ValueError:
                pass
    return out


def _flower() -> Any:
    from metagrad.cli import CommandError

    try:
        from metagrad.federated import flower
    except ImportError as err:
        raise CommandError(str(err)) from err
    return flower


def _tls(args: argparse.Namespace) -> Path | None:
    if bool(args.certificates) == bool(args.insecure):
        raise ValueError("give --certificates DIR (TLS) or --insecure (plain HTTP: loopback and trusted networks only)")
    return Path(args.certificates).resolve() if args.certificates else None


def cmd_app(args: argparse.Namespace) -> int:
    config = _config(args.set)
    unknown = sorted(set(config) - set(_flower().DEFAULTS))
    if unknown:
        raise ValueError(f"unknown run config key(s) {unknown}; known: {sorted(_flower().DEFAULTS)}")
    folder = _flower().write_app(args.dir, **{k.replace("-", "_"): v for k, v in config.items()})
    print(f"wrote {folder / 'pyproject.toml'}")
    return 0


def cmd_loopback(args: argparse.Namespace) -> int:
    folder = Path(args.folder).resolve()
    config = {"num-clients": args.num_clients, "out": str(folder / "out"), **_config(args.set)}
    unknown = sorted(set(config) - set(_flower().DEFAULTS))
    if unknown:
        raise ValueError(f"unknown run config key(s) {unknown}; known: {sorted(_flower().DEFAULTS)}")
    app = _flower().write_app(folder / "app", **{k.replace("-", "_"): v for k, v in config.items()})
    certificates = deploy.write_certificates(folder / "certificates") if args.tls else None
    log = folder / "out" / "rounds.jsonl"
    done = len(log.read_text().splitlines()) if log.is_file() else 0  # rounds of earlier runs (a resumed server)
    with deploy.Loopback(folder / "nodes", args.num_clients, certificates) as fed:
        print(f"SuperLink on {fed.address} ({'TLS' if certificates else 'insecure, loopback only'}), "
              f"{args.num_clients} SuperNodes; logs in {fed.folder}", flush=True)
        try:
            streamed = fed.run(app, timeout=args.timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            from metagrad.cli import CommandError

            raise CommandError(f"{err} (node logs in {fed.folder})") from err
    if args.verbose:
        print(streamed)
    for r in [json.loads(x) for x in log.read_text().splitlines()[done:]]:
        print(f"round {r['round']}: accepted {sorted(r['accepted'])}, attempts {r['attempts']}, {r['seconds']:.1f} s"
              + (f", meta_loss {r['meta_loss']:.4f}" if "meta_loss" in r else "")
              + (f", eval_loss {r['eval_loss']:.4f}" if "eval_loss" in r else ""))
    print(f"server checkpoint: {folder / 'out' / 'server.safetensors'}")
    return 0


def cmd_certificates(args: argparse.Namespace) -> int:
    hosts = tuple(args.host or ("127.0.0.1", "localhost"))
    folder = deploy.write_certificates(args.dir, hosts)
    print(f"wrote {folder}/ca.pem (give it to every SuperNode and to flwr), server.pem and server.key (the "
          f"SuperLink's), ca.key (keep it off the nodes); valid for {', '.join(hosts)}")
    return 0


def _call(cmd: list[str], home: Path | None = None) -> int:
    import os

    exe = deploy.executable(cmd[0])
    env = {**os.environ, "PATH": str(Path(exe).parent) + os.pathsep + os.environ.get("PATH", "")}
    if home is not None:
        env["FLWR_HOME"] = str(home)
    print("+", " ".join(cmd), flush=True)
    return subprocess.call([exe, *cmd[1:]], env=env)


def cmd_superlink(args: argparse.Namespace) -> int:
    return _call(deploy.superlink_args(args.port, _tls(args), args.host))


def cmd_supernode(args: argparse.Namespace) -> int:
    return _call(deploy.supernode_args(args.superlink, args.port, args.partition_id, _tls(args)))


def cmd_run(args: argparse.Namespace) -> int:
    home = Path(args.flwr_home).resolve()
    deploy.write_profile(home, "metagrad", args.superlink, _tls(args))
    cmd = ["flwr", "run", str(Path(args.dir).resolve()), "metagrad", "--stream"]
    for k, v in _config(args.set).items():
        cmd += ["--run-config", f"{k}={deploy.toml_value(v)}"]
    return _call(cmd, home)


def add_parser(sub: Any, formatter: type) -> None:
    """The `federated` subcommand and its own subcommands."""
    p = sub.add_parser("federated", help="federated meta-learning on Flower (needs the federated extra)",
                       description=__doc__.split("\n\n")[0], formatter_class=formatter)
    fsub = p.add_subparsers(dest="federated_command", required=True)
    setting = {"action": "append", "default": [], "metavar": "KEY=VALUE",
               "help": "a run config key (strategy, num-server-rounds, round-timeout, min-train-nodes, ...)"}

    def transport(q: argparse.ArgumentParser) -> None:
        q.add_argument("--certificates", help="folder of `metagrad federated certificates` (TLS)")
        q.add_argument("--insecure", action="store_true", help="plain HTTP: loopback and trusted networks only")

    q = fsub.add_parser("app", help="write the Flower app folder (pyproject.toml with the run config)",
                        formatter_class=formatter)
    q.add_argument("dir")
    q.add_argument("--set", **setting)
    q.set_defaults(fn=cmd_app)

    q = fsub.add_parser("loopback", help="a SuperLink and SuperNodes on 127.0.0.1, one run to its end, all stopped",
                        formatter_class=formatter)
    q.add_argument("--num-clients", type=int, default=2, help="SuperNodes (one client each: partition-id 0..n-1)")
    q.add_argument("--folder", default="runs/federated", help="app, node logs, out/ (server checkpoint, rounds.jsonl)")
    q.add_argument("--tls", action="store_true", help="self-signed certificates in FOLDER/certificates (default: "
                                                      "insecure, loopback only)")
    q.add_argument("--timeout", type=float, default=3600.0, help="seconds the whole run may take")
    q.add_argument("--verbose", action="store_true", help="print the ServerApp's streamed log")
    q.add_argument("--set", **setting)
    q.set_defaults(fn=cmd_loopback)

    q = fsub.add_parser("certificates", help="a self-signed CA and a server certificate for the SuperLink",
                        formatter_class=formatter)
    q.add_argument("dir")
    q.add_argument("--host", action="append", default=None,
                   help="a name or IP address the SuperLink is reached by (repeat; default 127.0.0.1, localhost)")
    q.set_defaults(fn=cmd_certificates)

    q = fsub.add_parser("superlink", help="flower-superlink, offline (no dependency installation)",
                        formatter_class=formatter)
    q.add_argument("--port", type=int, default=9092, help="the SuperLink's one port (Fleet, Control, Runtime APIs)")
    q.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: reachable from other machines)")
    transport(q)
    q.set_defaults(fn=cmd_superlink)

    q = fsub.add_parser("supernode", help="flower-supernode for one client", formatter_class=formatter)
    q.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    q.add_argument("--partition-id", type=int, required=True, help="which client this node is (0..num-clients-1)")
    q.add_argument("--port", type=int, default=9094, help="this node's local Runtime API port")
    transport(q)
    q.set_defaults(fn=cmd_supernode)

    q = fsub.add_parser("run", help="flwr run of an app folder on a SuperLink", formatter_class=formatter)
    q.add_argument("dir", help="the app folder (metagrad federated app)")
    q.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    q.add_argument("--flwr-home", default=".flwr", help="where the connection profile is written (FLWR_HOME)")
    q.add_argument("--set", **setting)
    transport(q)
    q.set_defaults(fn=cmd_run)

