"""The ``pluto`` command: ``server``, ``sidecar``, ``operator``, ``keys``, ``runs``,
``lineage``, ``checkpoints``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pluto.credentials import api_key_from_flags
from pluto.errors import PlutoError

# rich is imported by the commands that print, not here: ``pluto sidecar`` runs in every
# pod, and rich's modules would be a few MB of its memory for nothing.
if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text


#: What ``--log-level`` takes (any case).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _storage_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=Path(".pluto-data"),
                        help="directory of the embedded SQLite database (default: ./.pluto-data)")
    parser.add_argument("--database-url", default=os.environ.get("PLUTO_DATABASE_URL"),
                        help="postgresql://user@host/db to use PostgreSQL instead "
                             "(env: PLUTO_DATABASE_URL)")


def _client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help="server URL (env: PLUTO_URL)")
    parser.add_argument("--project", default=None, help="project (env: PLUTO_PROJECT)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pluto", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    server = commands.add_parser("server", help="run the tracking server")
    server.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; any other turns auth on)")
    server.add_argument("--port", type=int, default=7300, help="port (default 7300)")
    _storage_flags(server)
    server.add_argument("--auth", action="store_true",
                        help="require an API key on every request")
    server.add_argument("--max-body-mb", type=float, default=64.0,
                        help="largest request body accepted, in MiB (default 64)")
    server.add_argument("--public-url", default=None,
                        help="URL users reach the server at, for run links")
    server.add_argument("--sqlite-synchronous", choices=["FULL", "NORMAL"], default="FULL",
                        help="SQLite durability: FULL survives power loss (default)")
    server.add_argument("--storage", default=os.environ.get("PLUTO_STORAGE"),
                        help="where files and checkpoints go: a directory or s3://BUCKET/PREFIX "
                             "(env PLUTO_STORAGE; default DATA_DIR/files)")
    server.add_argument("--s3-endpoint-url", default=None,
                        help="S3-compatible endpoint (else AWS_ENDPOINT_URL; credentials from "
                             "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")
    server.add_argument("--s3-region", default=None,
                        help="S3 region (else AWS_REGION; default us-east-1)")

    sidecar = commands.add_parser(
        "sidecar", help="run the per-pod sidecar (ranks log to it over a Unix socket)")
    sidecar.add_argument("--socket", type=Path, default=None,
                         help="Unix socket to serve (env PLUTO_SIDECAR_SOCKET; "
                              "default /var/run/pluto/pluto.sock)")
    sidecar.add_argument("--api-socket", default=None, metavar="PATH",
                         help="Unix socket of the HTTP proxy of the server API, for files, "
                              "checkpoints and queries (env PLUTO_SIDECAR_API_SOCKET; default "
                              "api.sock beside --socket; '' turns it off)")
    sidecar.add_argument("--server", default=None,
                         help="tracking server URL (env PLUTO_URL; default http://127.0.0.1:7300)")
    sidecar.add_argument("--spool-dir", type=Path, default=None,
                         help="durable spool directory (env PLUTO_SPOOL_DIR; "
                              "default /var/run/pluto/spool)")
    sidecar.add_argument("--api-key-file", type=Path, default=None,
                         help="file holding the API key (else env PLUTO_API_KEY); "
                              "never pass a key on the command line")
    sidecar.add_argument("--api-key-optional", action="store_true",
                         help="a missing --api-key-file means no key until it appears "
                              "(a Secret mounted with optional: true), not an error")
    sidecar.add_argument("--spool-max-mb", type=float, default=1024,
                         help="unsent data the spool may hold before clients are slowed "
                              "down (default 1024)")
    sidecar.add_argument("--batch-max-kb", type=float, default=1024,
                         help="send a batch once it holds this much (default 1024)")
    sidecar.add_argument("--batch-max-age", type=float, default=0.2,
                         help="... or once its oldest record is this old, seconds (default 0.2)")
    sidecar.add_argument("--compression", choices=("zstd", "gzip"), default="zstd",
                         help="how batches are compressed: zstd (default; gzip until the "
                              "server says it takes zstd) or gzip")
    sidecar.add_argument("--drain-seconds", type=float, default=25.0,
                         help="on SIGTERM, forward for at most this long (default 25)")
    sidecar.add_argument("--open-wait", type=float, default=5.0,
                         help="how long opening a run waits for the server before the "
                              "run is pending (default 5)")
    sidecar.add_argument("--health-host", default="127.0.0.1",
                         help="address of /healthz, /readyz, /metrics (default 127.0.0.1)")
    sidecar.add_argument("--health-port", type=int, default=7301,
                         help="port of /healthz, /readyz, /metrics (default 7301; 0: any)")
    sidecar.add_argument("--sys-interval", type=float, default=10.0,
                         help="system metrics every N seconds, 0 to turn off (default 10)")
    sidecar.add_argument("--node-rank", type=int, default=None,
                         help="this node's rank, the writer of its system metrics "
                              "(env PLUTO_NODE_RANK; default 0)")
    sidecar.add_argument("--exit-when-idle", type=float, default=0.0, metavar="SECONDS",
                         help="exit (after draining) once all clients have been gone this "
                              "long; for classic sidecar containers (default 0: off)")
    sidecar.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                         help="the least severe events logged (default INFO)")

    from pluto_operator.cli import add_parser as add_operator_parser

    add_operator_parser(commands)

    keys = commands.add_parser("keys", help="manage API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create a key and print it once")
    create.add_argument("--name", required=True, help="what the key is for")
    create.add_argument("--project", default=None, help="limit the key to one project")
    _storage_flags(create)
    listing = key_commands.add_parser("list", help="list keys (never their secrets)")
    _storage_flags(listing)
    revoke = key_commands.add_parser("revoke", help="revoke a key by its lookup id")
    revoke.add_argument("lookup")
    _storage_flags(revoke)

    runs = commands.add_parser("runs", help="list a project's runs")
    runs.add_argument("project")
    runs.add_argument("--url", default=None, help="server URL (env: PLUTO_URL)")

    from pluto.cli_checkpoints import add_parser as add_checkpoints_parser

    add_checkpoints_parser(commands)

    lineage = commands.add_parser("lineage", help="show a run's ancestors and descendants")
    lineage.add_argument("run", help="numeric id, display id (MMP-3) or external id")
    _client_flags(lineage)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "server":
            return _server(args)
        if args.command == "sidecar":
            return _sidecar(args)
        if args.command == "operator":
            from pluto_operator.cli import run as run_operator

            return run_operator(args)
        from rich.console import Console

        console = Console()
        if args.command == "keys":
            return _keys(args, console)
        if args.command == "checkpoints":
            from pluto.cli_checkpoints import run as checkpoints_command

            return checkpoints_command(args, console)
        if args.command == "runs":
            return _runs(args, console)
        if args.command == "lineage":
            return _lineage(args, console)
    except PlutoError as exc:
        from rich.console import Console
        from rich.markup import escape

        # One line whatever the terminal's width, and the message as written (not markup).
        Console(stderr=True).print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        return 1
    return 2


def _server(args: argparse.Namespace) -> int:
    from pluto_server.main import serve
    from pluto_server.settings import ServerSettings

    serve(ServerSettings(
        host=args.host, port=args.port, data_dir=args.data_dir, database_url=args.database_url,
        auth=args.auth, max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        public_url=args.public_url, sqlite_synchronous=args.sqlite_synchronous,
        storage=args.storage, s3_endpoint_url=args.s3_endpoint_url, s3_region=args.s3_region,
    ))
    return 0


def _sidecar(args: argparse.Namespace) -> int:
    from pluto_sidecar.main import run
    from pluto_sidecar.settings import SidecarSettings, default_api_socket

    env = SidecarSettings.env_defaults()
    api_key = api_key_from_flags(os.environ.get("PLUTO_API_KEY"), args.api_key_file,
                                 args.api_key_optional)
    socket = args.socket or Path(env.get("socket", SidecarSettings().socket))
    api_socket_arg = args.api_socket if args.api_socket is not None else env.get("api_socket")
    api_socket = (None if api_socket_arg == "" else
                  Path(api_socket_arg) if api_socket_arg else default_api_socket(socket))
    if api_socket is not None and api_socket.absolute() == socket.absolute():
        raise PlutoError(f"--api-socket and --socket are both {socket}: give them "
                         "different paths (or --api-socket '' for no API socket)")
    settings = SidecarSettings(
        socket=socket,
        api_socket=api_socket,
        server=args.server or env.get("server", SidecarSettings().server),
        spool_dir=args.spool_dir or Path(env.get("spool_dir", SidecarSettings().spool_dir)),
        api_key=api_key.value,
        api_key_file=args.api_key_file,
        spool_max_bytes=int(args.spool_max_mb * 1024 * 1024),
        batch_max_bytes=int(args.batch_max_kb * 1024),
        batch_max_age=args.batch_max_age,
        compression=args.compression,
        drain_seconds=args.drain_seconds,
        open_wait=args.open_wait,
        health_host=args.health_host,
        health_port=args.health_port,
        sys_interval=args.sys_interval,
        node_rank=_node_rank(args.node_rank, env),
        log_level=args.log_level,
        exit_when_idle=args.exit_when_idle,
    )
    return run(settings)


def _node_rank(flag: int | None, env: dict[str, str]) -> int:
    """``--node-rank``, else ``PLUTO_NODE_RANK`` (0 when neither): the writer label of the
    node's system metrics, so a whole number from 0 to 2**31-1. The server would refuse any
    other, and each refused batch of system metrics would go to the dead letters."""
    from pluto.wire import MAX_WRITER

    if flag is not None:
        given, where = str(flag), f"--node-rank {flag}"
    else:
        given = env.get("node_rank", "0")
        where = f"PLUTO_NODE_RANK={given!r}"
    try:
        rank = int(given)
    except ValueError:
        rank = -1
    if not 0 <= rank <= MAX_WRITER:
        raise PlutoError(f"{where} is not a node rank: set it to a whole number from 0 to "
                         "2**31-1 (this node's rank: torchrun's --node-rank)")
    return rank


def _keys(args: argparse.Namespace, console: Console) -> int:
    from rich.console import Console
    from rich.table import Table

    from pluto_server import auth
    from pluto_server.database import Database, sqlite_url

    if args.database_url is None:
        args.data_dir.mkdir(parents=True, exist_ok=True)
    database = Database(args.database_url or sqlite_url(args.data_dir.resolve()))
    try:
        database.migrate()
        with database.write() as conn:
            if args.keys_command == "create":
                key = auth.create_key(conn, args.name, args.project)
                # The only time the key is ever shown: print it alone so scripts can capture it.
                print(key.plaintext)
                Console(stderr=True).print(
                    "[dim]Store this key now (e.g. in a Kubernetes Secret); "
                    "it cannot be shown again.[/dim]")
                return 0
            if args.keys_command == "list":
                table = Table("lookup", "name", "project", "revoked")
                for row in auth.list_keys(conn):
                    table.add_row(str(row["lookup"]), str(row["name"]),
                                  str(row["project"] or "*"), "yes" if row["revoked_at"] else "")
                console.print(table)
                return 0
            if auth.revoke_key(conn, args.lookup):
                console.print(f"revoked {args.lookup}")
                return 0
            Console(stderr=True).print(f"no active key with lookup id {args.lookup}")
            return 1
    finally:
        database.dispose()


def _runs(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table
    from rich.text import Text

    from pluto import query

    table = Table("id", "display id", "name", "status", "forked from", "fork step", "steps")
    for run in query.list_runs(args.project, url=args.url):
        steps = "" if run.last_step is None else f"{run.first_step}-{run.last_step}"
        # Text, not markup: a run named "[/]x" is a name, not a style.
        table.add_row(*map(Text, (str(run.id), run.display_id, run.name, run.status.value,
                                  run.forked_from_display_id or "", _opt(run.fork_step), steps)))
    console.print(table)
    return 0


def _lineage(args: argparse.Namespace, console: Console) -> int:
    from rich.text import Text
    from rich.tree import Tree

    from pluto import query

    view = query.get_lineage(args.run, args.project, url=args.url)
    chain = " <- ".join(
        f"{display}" + (f" (forked at {step})" if step is not None else "")
        for _, display, step in view.ancestors
    )
    console.print(Text.assemble(("ancestors", "bold"), ": ", chain))
    tree = Tree(_label(view.tree))
    stack = [(view.tree, tree)]
    while stack:
        node, branch = stack.pop()
        for child in node.children:
            sub = branch.add(_label(child))
            stack.append((child, sub))
    console.print("[bold]descendants[/bold]:")
    console.print(tree)
    return 0


def _label(node: object) -> Text:
    from rich.text import Text

    from pluto.query import LineageTree

    assert isinstance(node, LineageTree)
    fork = f" forked at step {node.fork_step}" if node.fork_step is not None else ""
    return Text(f"{node.display_id} {node.name!r}{fork}")


def _opt(value: object) -> str:
    return "" if value is None else str(value)


if __name__ == "__main__":
    sys.exit(main())
