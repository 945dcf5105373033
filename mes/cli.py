"""The ``mes`` command: run the demo, the services, migrations, loads and simulators."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
from datetime import datetime
from pathlib import Path

from mes.settings import Settings


def _openapi_file() -> Path:
    """``openapi/openapi.json`` of the source checkout this runs from; from an installed wheel
    (no checkout around it) the one under the current directory."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file():
        return checkout / "openapi" / "openapi.json"
    return Path("openapi") / "openapi.json"


OPENAPI_FILE = _openapi_file()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mes`` console script."""
    parser = argparse.ArgumentParser(
        prog="mes", description="ISA-95 Manufacturing Execution System"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("demo", help="run the whole product once on embedded defaults, then stop")
    dev = sub.add_parser("dev", help="run the embedded services until Ctrl-C")
    dev.add_argument("--port", type=int, default=8000, help="API port (default 8000)")
    dev.add_argument(
        "--secure",
        action="store_true",
        help="PLCs require OPC UA Basic256Sha256 SignAndEncrypt, a trusted certificate and a "
        "user name and password (made once in .mes/pki)",
    )
    serve = sub.add_parser("serve", help="run the API (uses MES_* settings)")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    sub.add_parser("worker", help="run a Temporal worker (uses MES_* settings)")
    col = sub.add_parser(
        "collector", help="follow the work units' PackML states and counters (for OEE)"
    )
    col.add_argument(
        "--share",
        default="0/1",
        help="K/N: follow the work units whose id %% N == K (default 0/1: all)",
    )
    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    up = db_sub.add_parser(
        "upgrade", help="apply all migrations as the owner; create and grant the app role"
    )
    up.add_argument(
        "--database-url",
        help="the owner's URL (default MES_MIGRATION_DATABASE_URL, else MES_DATABASE_URL)",
    )
    load = sub.add_parser(
        "load", help="load master data: a plant file (YAML or JSON) or a B2MML Sync message (XML)"
    )
    load.add_argument("file", type=Path)
    load.add_argument("--opcua-url", help="point every OPC UA endpoint at this server URL")
    sim = sub.add_parser("sim", help="simulators")
    sim_sub = sim.add_subparsers(dest="sim_command", required=True)
    opcua = sim_sub.add_parser("opcua", help="an OPC UA PLC simulator (OPC 10031-4 job control)")
    opcua.add_argument("--units", type=int, default=3)
    opcua.add_argument("--port", type=int, default=4840)
    opcua.add_argument("--cycle", type=float, default=2.0, help="seconds a job runs")
    opcua.add_argument("--names", help="comma-separated unit names (default Unit1..N)")
    opcua.add_argument(
        "--max-jobs",
        type=int,
        default=100,
        help="MaxDownloadableJobOrders of every unit: jobs its JobOrderList holds (1-65535)",
    )
    modbus = sim_sub.add_parser(
        "modbus", help="a legacy machine over Modbus TCP, with a plant file's register map"
    )
    modbus.add_argument("--plant", type=Path, help="plant file (default: the sample plant)")
    modbus.add_argument("--unit", help="the Modbus work unit (default: the first one)")
    modbus.add_argument("--port", type=int, default=5020)
    modbus.add_argument("--cycle", type=float, default=2.0, help="seconds a job runs")
    modbus.add_argument("--defect-rate", type=float, default=0.0, help="share of bad items")
    modbus.add_argument(
        "--word-order", choices=["ABCD", "CDAB", "BADC", "DCBA"], help="override the map's"
    )
    erp = sim_sub.add_parser(
        "erp", help="an ERP callback receiver that records and shows callbacks"
    )
    erp.add_argument("--port", type=int, default=8099)
    erp.add_argument("--store", type=Path, help="JSON-lines file keeping the history")
    erp.add_argument("--secret", help="the ERP client's signing secret: check every signature")
    token = sub.add_parser("token", help="API tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    tc = token_sub.add_parser("create", help="create a token; prints it alone, once")
    tc.add_argument("--role", required=True, choices=["erp", "supervisor", "auditor", "admin"])
    tc.add_argument("--name", required=True)
    expiry = tc.add_mutually_exclusive_group()
    expiry.add_argument(
        "--expires-in", metavar="LIFETIME", help="valid for this long: 90m, 12h, 30d, 4w"
    )
    expiry.add_argument(
        "--expires-at", metavar="ISO", help="valid until then (ISO 8601 with a time zone)"
    )
    token_sub.add_parser("list", help="list tokens (name, role, created, expiry, state)")
    tr = token_sub.add_parser("revoke", help="revoke a token by name")
    tr.add_argument("name")
    ec = sub.add_parser(
        "erp-client", help="where an ERP client (its erp token's name) gets callbacks"
    )
    ec.add_argument("name")
    ec.add_argument("--url", required=True, help="callback URL")
    ec.add_argument("--format", choices=["json", "b2mml"], default="b2mml")
    aud = sub.add_parser("audit", help="the audit trail: signing key, checkpoints, verify")
    aud_sub = aud.add_subparsers(dest="audit_command", required=True)
    for name, text in (
        ("key", "create the checkpoint signing key if missing; print its public key"),
        ("checkpoint", "sign the chain's newest event now (after checking what came since)"),
        ("verify", "check the chain against the signed checkpoints (--full: every event)"),
    ):
        a = aud_sub.add_parser(name, help=text)
        a.add_argument("--key-file", type=Path, help="Ed25519 key (default MES_AUDIT_KEY_FILE)")
        if name != "key":
            a.add_argument(
                "--checkpoints", type=Path, help="checkpoint file (default MES_AUDIT_CHECKPOINTS)"
            )
        if name == "verify":
            a.add_argument(
                "--full",
                action="store_true",
                help="recompute every event from the first (default: from the newest "
                "checkpoint that still matches its event)",
            )
    api = sub.add_parser("openapi", help="write the OpenAPI document to openapi/")
    api.add_argument("--check", action="store_true", help="fail if openapi/ differs from the app")
    api.add_argument("--output", type=Path, default=OPENAPI_FILE)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # asyncua warns about every session-timeout negotiation and missing security policy on a
    # loopback simulator; its errors still show.
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    settings = Settings.from_env()

    if args.command == "demo":
        from mes.demo import run_demo

        return asyncio.run(run_demo())
    if args.command == "db":
        return _db_upgrade(settings, args.database_url)
    if args.command == "audit":
        return _audit(settings, args)
    if args.command == "load":
        return _load(settings, args.file, args.opcua_url)
    if args.command == "token":
        return _token(settings, args)
    if args.command == "erp-client":
        return _erp_client(settings, args.name, args.url, args.format)
    if args.command == "openapi":
        return _openapi(args.output, args.check)
    return _run_service(settings, args)


def _run_service(settings: Settings, args: argparse.Namespace) -> int:
    """The long-running commands: each runs until Ctrl-C or SIGTERM (see ``mes.launch``)."""

    try:
        return asyncio.run(_service(settings, args))
    except KeyboardInterrupt:  # Ctrl-C while still starting
        return 130


async def _service(settings: Settings, args: argparse.Namespace) -> int:
    from mes import launch

    if args.command == "dev":
        pki = Path(".mes") / "pki" if args.secure else None
        return await launch.run_dev(settings, args.port, pki)
    if args.command == "serve":
        host = args.host or settings.api_host
        return await launch.serve_api(settings, host, args.port or settings.api_port)
    if args.command == "worker":
        return await launch.run_worker(settings)
    if args.command == "collector":
        from mes.collector import Share

        try:
            share = Share.parse(args.share)
        except ValueError as exc:
            print(f"mes collector: --share: {exc}", file=sys.stderr)
            return 2
        return await launch.run_collector(settings, share)
    if args.command == "sim" and args.sim_command == "opcua":
        names = args.names.split(",") if args.names else None
        return await launch.run_plc_simulator(
            args.units, args.port, args.cycle, names, max_job_orders=args.max_jobs
        )
    if args.command == "sim" and args.sim_command == "modbus":
        return await launch.run_modbus_simulator(
            args.plant, args.unit, args.port, args.cycle, args.defect_rate, args.word_order
        )
    if args.command == "sim" and args.sim_command == "erp":
        return await launch.run_erp_receiver(args.port, args.store, signing_secret=args.secret)
    raise AssertionError(f"unhandled command {args}")


def _db_upgrade(settings: Settings, database_url: str | None) -> int:
    from sqlalchemy.engine import make_url

    from mes.migrate import upgrade_database

    url = make_url(upgrade_database(settings, database_url))
    print(f"database at head: {url.render_as_string(hide_password=True)}")
    if url.get_backend_name() == "postgresql":
        print(
            f"app role {settings.database_app_role!r}: DML on the tables, audit_event append-only"
        )
    return 0


def _audit(settings: Settings, args: argparse.Namespace) -> int:
    """``mes audit key|checkpoint|verify``; verify answers 0 when intact, else 1."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from mes import audit_checkpoints as checkpoints
    from mes.launch import open_database

    key_file: Path | None = args.key_file or settings.audit_key_file
    if key_file is None:
        print("error: no key: give --key-file or set MES_AUDIT_KEY_FILE", file=sys.stderr)
        return 2
    if args.audit_command == "key":
        checkpoints.ensure_key(key_file)
        public = checkpoints.load_verify_key(key_file)
        print(f"key {checkpoints.key_id(public)} in {key_file}; its public key:")
        print(checkpoints.public_pem(public), end="")
        return 0
    path: Path = args.checkpoints or settings.audit_checkpoint_file
    try:
        signing = args.audit_command == "checkpoint"
        key = (checkpoints.load_signing_key if signing else checkpoints.load_verify_key)(key_file)
    except (OSError, ValueError) as e:
        print(f"error: {key_file}: {e}", file=sys.stderr)
        return 2
    with open_database(settings.database_url) as sessions, sessions() as s:
        if isinstance(key, Ed25519PrivateKey):
            try:
                cp = checkpoints.write_checkpoint(s, key, path)
            except checkpoints.ChainNotSigned as e:
                print(f"error: not signed: {e}", file=sys.stderr)
                return 1
            print(json.dumps(cp.to_json()) if cp else "nothing new to sign")
            return 0
        report = checkpoints.verify(s, path, key, full=args.full)
    print(json.dumps(dataclasses.asdict(report), default=str, indent=2))
    return 0 if report.intact else 1


def _load(settings: Settings, file: Path, opcua_url: str | None) -> int:
    from mes.launch import load_plant, open_database
    from mes.masterdata import MasterDataError

    with open_database(settings.database_url) as sessions:
        try:
            report = load_plant(sessions, file, opcua_url, actor="cli")
        except (MasterDataError, OSError) as e:
            print(f"error: {file}: {e}", file=sys.stderr)
            print("nothing was written", file=sys.stderr)
            return 1
    print(f"{file}: {report}")
    return 0


def _erp_client(settings: Settings, name: str, url: str, fmt: str) -> int:
    from mes.callbacks import CallbackPolicy
    from mes.errors import DomainError
    from mes.launch import open_database, point_erp_client

    policy = CallbackPolicy.allowing(settings.callback_allow)
    with open_database(settings.database_url) as sessions:
        try:
            client = point_erp_client(sessions, name, url, fmt, policy, actor="cli")
        except DomainError as e:
            print(f"error: {e.detail}", file=sys.stderr)
            return 1
    # A new client's signing secret is in it, this once.
    print(client.model_dump_json(exclude_none=True))
    return 0


def _token(settings: Settings, args: argparse.Namespace) -> int:
    from mes import auth
    from mes.errors import DomainError
    from mes.launch import open_database

    with open_database(settings.database_url) as sessions, sessions() as s:
        try:
            if args.token_command == "create":
                expires = _expiry(args.expires_in, args.expires_at)
                print(auth.create_token(s, args.name, args.role, "cli", expires))
            elif args.token_command == "list":
                for t in auth.list_tokens(s):
                    until = f"{t.expires_at:%Y-%m-%d %H:%M}" if t.expires_at else "-"
                    state = "expired" if t.expired else "active"
                    state = f"revoked {t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else state
                    print(
                        f"{t.name:<30}{t.role:<12}{t.created_at:%Y-%m-%d %H:%M}  "
                        f"expires {until:<18}{state}"
                    )
            else:
                auth.revoke_token(s, args.name, actor="cli")
                print(f"revoked {args.name}")
        except DomainError as e:
            print(f"error: {e.detail}", file=sys.stderr)
            return 1
    return 0


def _expiry(expires_in: str | None, expires_at: str | None) -> datetime | None:
    """The expiry ``--expires-in`` (from now) or ``--expires-at`` give; None: no expiry."""
    from mes import auth
    from mes.errors import invalid
    from mes.models import utcnow

    if expires_in is not None:
        return utcnow() + auth.parse_lifetime(expires_in)
    if expires_at is None:
        return None
    try:
        return datetime.fromisoformat(expires_at)
    except ValueError:
        raise invalid("expires_at", f"{expires_at!r} is not an ISO 8601 time") from None


def openapi_document() -> str:
    """The app's OpenAPI document as stable, pretty JSON."""
    from mes.api.app import create_app

    schema = create_app(Settings(database_url="sqlite://")).openapi_schema.to_schema()
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def _openapi(output: Path, check: bool) -> int:
    doc = openapi_document()
    if check:
        current = output.read_text() if output.exists() else ""
        if current != doc:
            print(f"{output} is out of date: run `mes openapi`", file=sys.stderr)
            return 1
        print(f"{output} matches the app")
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(doc)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
