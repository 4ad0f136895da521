"""The `emulator` command: up, node, admin, message, status, ui, run-job, usage, logs, fake-llm.

Each command imports what it uses when it runs: `--help` and the client commands (admin, status,
run-job, ...) never load the node runtime (SQLAlchemy, alembic, cryptography, the hosts).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emulator.arguments import CommandError, parse_message_arg
from llm_provider import event_loop
from llm_provider.homes import Home, default_root, find_home
from llm_provider.log_format import LogFormat

if TYPE_CHECKING:
    from handlers.settings import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emulator", description="Run llm-provider nodes on this machine.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("up", help="start a network of nodes, each its own process, and wire them")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--base-port", type=int, default=8081)
    p.add_argument("--root", type=Path, default=None, help="folder of the nodes' homes (default ~/.llm-provider)")
    p.add_argument("--llm", default=None, help="OpenAI-compatible base URL for the drivers (default: start a fake LLM)")
    p.add_argument("--llm-port", type=int, default=8080, help="port of the embedded fake LLM")
    p.add_argument("--ttft", type=float, default=0.05, help="fake LLM: seconds to the first token")
    p.add_argument("--tps", type=float, default=50.0, help="fake LLM: tokens per second")
    p.add_argument("--model", default="llama3")
    p.add_argument("--no-wire", dest="wire", action="store_false", help="start the nodes, configure nothing")
    p.add_argument("--fresh", action="store_true", help="delete the nodes' homes first")
    p.add_argument("--restart", action="store_true", help="start a node whose process exited again, by itself, with backoff")
    _add_settings(p)
    _add_log_format(p)
    p.add_argument("--verbose", action="store_true")

    p = commands.add_parser("node", help="run one node in the foreground")
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--directory", type=Path, default=None, help="JSON file of node names to URLs")
    p.add_argument("--peer", action="append", default=[], metavar="NAME=URL[,URL...]#KEY")
    p.add_argument("--database-url", default=None, help="SQLAlchemy async URL (default: SQLite in the home)")
    p.add_argument(
        "--shared", action="store_true",
        help="other processes serve this node name from the same database (router replicas): share wake-ups and nonces",
    )
    _add_settings(p)
    _add_log_format(p)
    p.add_argument("--verbose", action="store_true")

    for name, help_text in (("admin", "send an admin command to a node"), ("message", "send a message to one process of a node")):
        p = commands.add_parser(name, help=help_text)
        p.add_argument("-p", "--port", type=int, required=True)
        if name == "message":
            p.add_argument("process", choices=["driver", "router", "openai"])
        p.add_argument("body", help='e.g. StartRouter or \'{"SetRouter": {"node": "fake.dev"}}\'')
        _add_auth(p)

    p = commands.add_parser("status", help="a router's drivers and queues")
    p.add_argument("-p", "--port", type=int, required=True)
    _add_auth(p)

    p = commands.add_parser("ui", help="the node's web page, and a one-time login URL for a browser elsewhere")
    p.add_argument("-p", "--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1", help="the node's address as the browser will reach it")
    p.add_argument("--valid-for", type=float, default=600.0, help="seconds the login URL may be opened in (once)")
    _add_auth(p)

    p = commands.add_parser("run-job", help="run a job and print its answer as it streams")
    p.add_argument("-p", "--port", type=int, required=True)
    p.add_argument("model")
    p.add_argument("prompt", nargs="+")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--body", type=parse_message_arg, default=None, metavar="JSON",
                   help='more request fields, passed to the LLM as they are: \'{"tools": [...], "tool_choice": "required"}\'')

    p = commands.add_parser("usage", help="who used what: a node's jobs and tokens per day, client and model")
    p.add_argument("-p", "--port", type=int, required=True)
    for name in ("client", "model", "role", "label"):
        p.add_argument(f"--{name}", default=None)
    p.add_argument("--since", default=None, metavar="YYYY-MM-DD", help="first UTC day")
    p.add_argument("--until", default=None, metavar="YYYY-MM-DD", help="last UTC day")
    _add_auth(p)

    p = commands.add_parser("logs", help="print a node's log, found by name among the homes under --root")
    p.add_argument("node", help="the node's name, e.g. fake.dev")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing what the node logs (Ctrl-C stops)")
    p.add_argument("--root", type=Path, default=None, help="folder of the nodes' homes (default ~/.llm-provider)")

    commands.add_parser("fake-llm", help="run the embedded fake OpenAI-compatible LLM (see emulator fake-llm --help)")
    return parser


def _add_log_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format", type=LogFormat, choices=list(LogFormat), default=LogFormat.TEXT,
        help="json: one JSON object a line, with node, process and the job's id and trace id",
    )


def _add_settings(parser: argparse.ArgumentParser) -> None:
    from llm_provider import settings

    settings.add_flags(parser)


def _settings(args: argparse.Namespace) -> Settings:
    from llm_provider import settings

    try:
        return settings.load(args)
    except settings.SettingsError as error:
        raise CommandError(str(error)) from error


def _add_auth(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", type=Path, default=None, help="the node's home, to read its admin token")
    parser.add_argument("--root", type=Path, default=None, help="where to look for the home of the node on --port")
    parser.add_argument("--token", default=None, help="the node's admin token")


def _admin_token(args: argparse.Namespace) -> str:
    if args.token:
        return str(args.token)
    home = Home(args.home) if args.home else find_home(args.root or default_root(), args.port)
    if home is None or not home.token_file.exists():
        raise CommandError(f"no admin token for the node on port {args.port}: pass --home DIR or --token")
    return home.admin_token()


async def _admin(args: argparse.Namespace, process: str | None) -> None:
    from emulator.client import send_admin

    reply = await send_admin(f"http://127.0.0.1:{args.port}", _admin_token(args), parse_message_arg(args.body), process)
    print(json.dumps(reply))


async def _run_job(args: argparse.Namespace) -> int:
    from emulator.client import run_job

    request: dict[str, Any] = {"model": args.model, "prompt": " ".join(args.prompt)}
    for key in ("max_tokens", "seed", "temperature"):
        if getattr(args, key) is not None:
            request[key] = getattr(args, key)
    if args.body is not None:
        if not isinstance(args.body, dict):
            raise CommandError("--body must be a JSON object")
        request |= args.body
    summary = await run_job(f"http://127.0.0.1:{args.port}", request)
    print(summary.line())
    return 0 if summary.status == "succeeded" else 1


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fake-llm"]:
        from emulator import fake_llm

        fake_llm.main(argv[1:])
        return
    args = _parser().parse_args(argv)
    import aiohttp  # past --help: every command from here talks HTTP

    try:
        sys.exit(event_loop.run(_dispatch(args)) or 0)
    except CommandError as error:
        print(f"emulator: {error}", file=sys.stderr)
        sys.exit(1)
    except (aiohttp.ClientConnectionError, TimeoutError) as error:
        where = f"127.0.0.1:{args.port}" if getattr(args, "port", None) else "the node"
        print(f"emulator: cannot reach a node at {where} ({error.__class__.__name__}); is it running?", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


async def _dispatch(args: argparse.Namespace) -> int | None:
    match args.command:
        case "up":
            from emulator.up import UpOptions, up

            root = args.root or default_root()
            return await up(
                UpOptions(
                    nodes=args.nodes, base_port=args.base_port, root=root, llm=args.llm, llm_port=args.llm_port,
                    ttft=args.ttft, tps=args.tps, model=args.model, wire=args.wire, fresh=args.fresh,
                    verbose=args.verbose, settings=_settings(args), log_format=args.log_format, restart=args.restart,
                )
            )
        case "node":
            from llm_provider.directory import parse_peer
            from llm_provider.node import NodeOptions, serve_forever

            peers = dict(parse_peer(text) for text in args.peer)
            await serve_forever(
                NodeOptions(
                    name=args.name, port=args.port, home=args.home, host=args.host, directory_file=args.directory,
                    peers=peers, database_url=args.database_url, shared=args.shared, settings=_settings(args), verbose=args.verbose,
                    log_format=args.log_format,
                )
            )
        case "admin":
            await _admin(args, None)
        case "message":
            await _admin(args, args.process)
        case "run-job":
            return await _run_job(args)
        case "status":
            from emulator.client import format_router_state, send_admin

            state = await send_admin(f"http://127.0.0.1:{args.port}", _admin_token(args), "RouterStatus")
            print(format_router_state(state))
        case "ui":
            from emulator.client import ui_login

            login = await ui_login(f"http://127.0.0.1:{args.port}", _admin_token(args), args.valid_for)
            base = f"http://{args.host}:{args.port}"
            print(f"page:  {base}/ui  (open on this machine as it is)")
            print(f"login: {base}{login.path}  (for a browser elsewhere: it works once, for {args.valid_for:g} s)")
        case "usage":
            from emulator.client import fetch_usage, format_usage

            fields = ("client", "model", "role", "label", "since", "until")
            query = {name: getattr(args, name) for name in fields if getattr(args, name)}
            print(format_usage(await fetch_usage(f"http://127.0.0.1:{args.port}", _admin_token(args), query)))
        case "logs":
            from emulator import log_reader

            await log_reader.show(args.root or default_root(), args.node, args.follow)
    return None


if __name__ == "__main__":
    main()
