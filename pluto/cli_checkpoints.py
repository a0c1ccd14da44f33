"""``pluto checkpoints list|fork|download``: checkpoints from the command line."""

from __future__ import annotations

import argparse
import datetime
from typing import TYPE_CHECKING

from pluto import checkpoints

if TYPE_CHECKING:  # rich is imported when a command prints, not by ``pluto sidecar``
    from rich.console import Console


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("checkpoints", help="list, fork and download checkpoints")
    sub = parser.add_subparsers(dest="checkpoints_command", required=True)

    listing = sub.add_parser("list", help="a run's checkpoints by step")
    listing.add_argument("run", help="numeric id, display id (MMP-3) or external id")
    listing.add_argument("--lineage", action="store_true",
                         help="every checkpoint a fork could start from, ancestors' included")
    _connection(listing)

    fork = sub.add_parser(
        "fork", help="copy the newest checkpoint at or before a step to another run")
    fork.add_argument("--from", dest="from_run", required=True,
                      help="run to take it from (its lineage is searched)")
    fork.add_argument("--to", dest="to_run", required=True, help="run to copy it to")
    fork.add_argument("--not-after-step", type=int, default=None,
                      help="newest at or before this step (default: the newest)")
    fork.add_argument("--from-project", default=None,
                      help="project of --from (default: the project of --to)")
    fork.add_argument("--from-s3-bucket", default=None,
                      help="take it from this bucket, laid out as OpenPipe ART does "
                           "(FROM_PROJECT/models/FROM/checkpoints/STEP/)")
    _connection(fork)

    download = sub.add_parser("download", help="fetch a checkpoint's files")
    download.add_argument("run")
    which = download.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, default=None, help="exactly this step")
    which.add_argument("--not-after-step", type=int, default=None,
                       help="the newest at or before this step")
    download.add_argument("--dest", default=None,
                          help="directory (default: .pluto/checkpoints/RUN/STEP)")
    _connection(download)


def _connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--project", default=None, help="project (env: PLUTO_PROJECT)")
    parser.add_argument("--url", default=None,
                        help="server URL (env: PLUTO_URL; API key from PLUTO_API_KEY)")


def run(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table
    from rich.text import Text

    if args.checkpoints_command == "list":
        found = checkpoints.list_checkpoints(args.run, project=args.project,
                                             lineage=args.lineage, url=args.url)
        table = Table("step", "run", "size", "files", "forked from", "created", "metadata")
        for info in found:
            origin = info.source_uri or (
                f"{info.source_display_id} step {info.source_step}" if info.source_run else "")
            created = datetime.datetime.fromtimestamp(info.created_at).isoformat(
                sep=" ", timespec="seconds")
            # Text, not markup: metadata and names are the user's ("[/red] done" is no style).
            table.add_row(*map(Text, (
                str(info.step), info.run_display_id, checkpoints.human_size(info.size),
                str(len(info.files)), origin, created,
                ", ".join(f"{k}={v}" for k, v in info.metadata.items()))))
        console.print(table if found else Text(f"{args.run} has no checkpoint"))
        return 0
    if args.checkpoints_command == "fork":
        checkpoints.fork_checkpoint(args.to_run, args.from_run, from_project=args.from_project,
                                    not_after_step=args.not_after_step,
                                    from_s3_bucket=args.from_s3_bucket, verbose=True,
                                    project=args.project, url=args.url)
        return 0
    path = checkpoints.download_checkpoint(args.run, args.step, args.dest,
                                           not_after_step=args.not_after_step,
                                           project=args.project, url=args.url)
    console.print(Text(str(path)))
    return 0
