"""`pi-appliance model install|list|activate|rollback`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from appliance.cli.options import add_json, add_models_dir
from appliance.exitcodes import ApplianceError, ExitCode
from appliance.models.catalog import get_variant, load_catalog
from appliance.models.store import ModelStore, packaged_file


def _store(args: argparse.Namespace) -> ModelStore:
    return ModelStore(args.models_dir,
                      lambda message: print(f"model: {message}", file=sys.stderr, flush=True))


def _byte_count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: a number of bytes")
    return int(text)


def _install(args: argparse.Namespace) -> int:
    store = _store(args)
    catalog = load_catalog()
    catalog_id = args.catalog_id and get_variant(args.catalog_id).id
    if args.source == "-":
        if args.sha256 is None or args.size is None:
            raise ApplianceError("a model from standard input needs --sha256 and --size",
                                 ExitCode.USAGE)
        model = store.receive(sys.stdin.buffer, args.sha256, args.size, args.offset,
                              activate=not args.no_activate, catalog_id=catalog_id)
    elif args.source in catalog:
        model = store.install_variant(catalog[args.source], sha256=args.sha256,
                                      trust=args.trust_unverified, activate=not args.no_activate,
                                      mirror=args.mirror)
    else:
        model = store.install(args.source, args.sha256, trust=args.trust_unverified,
                              activate=not args.no_activate, catalog_id=catalog_id)
    print(model)
    return ExitCode.OK


def _list(args: argparse.Namespace) -> int:
    store = _store(args)
    entries, leftovers = store.installed(), store.leftovers()
    if args.json:
        print(json.dumps(entries + leftovers, indent=2))
        return ExitCode.OK
    for entry in entries:
        marker = "active  " if entry["active"] else "previous" if entry["previous"] else "        "
        print(f"{marker} {entry['sha256'][:16]}  {entry['size_bytes'] / 1e6:9.1f} MB  "
              f"{entry.get('verified', '?'):<10.10}  {entry.get('source', '?')}")
    for leftover in leftovers:
        print(f"problem  {leftover['file']}: {leftover['problem']}")
    return ExitCode.OK


def _locate(args: argparse.Namespace) -> int:
    path = packaged_file(get_variant(args.catalog_id))
    if path is None:
        print(f"pi-appliance: {args.catalog_id} is not shipped as a file by an installed Python "
              "package", file=sys.stderr)
        return ExitCode.NOT_OK
    print(path)
    return ExitCode.OK


def _activate(args: argparse.Namespace) -> int:
    print(_store(args).activate(args.sha256))
    return ExitCode.OK


def _rollback(args: argparse.Namespace) -> int:
    print(_store(args).rollback())
    return ExitCode.OK


def add_commands(commands: Any) -> None:
    model = commands.add_parser("model", help="install, list, activate and roll back models")
    add_models_dir(model)
    actions = model.add_subparsers(dest="model_command", required=True, parser_class=type(model))
    install = actions.add_parser("install", help="download or copy, verify, activate")
    install.add_argument("source", help="a catalog id (see `pi-appliance plan`), an https:// "
                         "(or http:// with --sha256) URL, a file, or - for standard input "
                         "(with --size; what `fleet push-model` sends)")
    install.add_argument("--mirror", help="for a catalog id: a LAN mirror's base URL that "
                         "serves the same file name (checked against the same sha256)")
    install.add_argument("--sha256", help="the expected checksum (required unless trusted)")
    install.add_argument("--trust-unverified", action="store_true",
                         help="accept a file without a checksum (recorded as trusted)")
    install.add_argument("--no-activate", action="store_true", help="install only")
    install.add_argument("--size", type=_byte_count, help="for -: the bytes the whole file has")
    install.add_argument("--offset", type=_byte_count, default=0,
                         help="for -: the byte the input starts at, resuming what "
                         "`model list` shows as partial (default 0)")
    install.add_argument("--catalog-id", help="for a file or URL: the catalog variant it is "
                         "(recorded; /health and the fallback name the model by it)")
    install.set_defaults(handler=_install)
    listing = actions.add_parser("list", help="installed models; which is active")
    add_json(listing)
    listing.set_defaults(handler=_list)
    locate = actions.add_parser(
        "locate", help="the file an installed Python package ships for a catalog id (for copying "
        "to an air-gapped Pi)")
    locate.add_argument("catalog_id")
    locate.set_defaults(handler=_locate)
    activate = actions.add_parser("activate", help="make an installed model the active one")
    activate.add_argument("sha256", help="its sha256 (a unique prefix will do)")
    activate.set_defaults(handler=_activate)
    rollback = actions.add_parser("rollback", help="go back to the previous model")
    rollback.set_defaults(handler=_rollback)
    for verb in (install, listing, activate, rollback):
        add_models_dir(verb, at_verb=True)
