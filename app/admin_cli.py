"""The admin's ``kaizen`` commands: ``kaizen keys`` (API keys and the data keys of encryption at
rest), ``kaizen erase`` (a session's or a user's data) and ``kaizen retention run``. Every change
they make is audited. :func:`add_admin_commands` adds them to ``kaizen``'s parser (``app/cli.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from app.config import load_config, resolve_paths

__all__ = ["add_admin_commands"]


def cmd_keys(args: argparse.Namespace) -> int:
    """``kaizen keys create NAME --role R | list | revoke ID``: API keys, kept in the store as salted
    hashes (the key is printed once, by create); every change audited. ``kaizen keys new-data-key |
    rotate-data``: the keys of encryption at rest (``privacy.encryption``)."""
    from app.security.keys import KeyStore
    from app.store import open_store

    if args.keys_command == "new-data-key":
        from app.privacy.encryption import new_key

        print(new_key())
        return 0
    cfg = resolve_paths(load_config(args.config, args.overrides))
    store = open_store(cfg.store)
    try:
        store.migrate()
        keys = KeyStore(store)
        if args.keys_command == "rotate-data":
            done = store.rotate_encryption(progress=lambda table, n: print(f"{table}: {n} rows", file=sys.stderr))
            store.audit(args.actor, "data.rotate", None, {"rows": done})
            print(f"re-encrypted with the newest data key: {', '.join(f'{t} {n}' for t, n in done.items())}")
        elif args.keys_command == "create":
            row, key = keys.create(args.name, args.role, args.actor, args.rate_per_s)
            print(f"created key {row['id']} ({row['name']}, role {row['role']}); it is shown only now:")
            print(key)
        elif args.keys_command == "revoke":
            row = keys.revoke(args.id, args.actor, args.reason)
            print(f"revoked key {row['id']} ({row['name']}) at {row['revoked_at']}")
        else:
            rows = keys.list(include_revoked=args.all)
            if args.json:
                print(json.dumps(rows, indent=2, default=str))
                return 0
            print(f"{'id':<14}{'name':<28}{'role':<10}{'rate/s':<8}{'created':<34}revoked")
            for r in rows:
                rate = f"{r['rate_per_s']:g}" if r.get("rate_per_s") else "-"
                print(
                    f"{r['id']:<14}{r['name'][:27]:<28}{r['role']:<10}{rate:<8}{r['created_at']:<34}"
                    f"{r.get('revoked_at') or '-'}"
                )
            if not rows:
                print("(no keys: the API takes none unless security.api_keys names some)")
    except KeyError as exc:
        print(f"error: no key {exc.args[0]!r}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    return 0


def cmd_erase(args: argparse.Namespace) -> int:
    """``kaizen erase --session ID | --user ID``: remove a session's or a user's data (audited)."""
    from app.privacy.erasure import erase
    from app.store import open_store

    cfg = resolve_paths(load_config(args.config, args.overrides))
    store = open_store(cfg.store)
    try:
        store.migrate()
        done = erase(cfg, store, session_id=args.session, user_id=args.user, actor=args.actor, reason=args.reason)
    finally:
        store.close()
    if args.json:
        print(json.dumps(done, indent=2))
        return 0
    rows = ", ".join(f"{table} {n}" for table, n in done["deleted"].items() if n) or "nothing"
    print(f"erased {done['interactions']} interactions of {done['target']}: {rows}")
    for dataset_id, n in done["stale_datasets"].items():
        print(f"dataset {dataset_id}: {n} of its rows were erased; marked stale")
    return 0


def cmd_retention_run(args: argparse.Namespace) -> int:
    """``kaizen retention run``: what ``python -m jobs.retention`` does, with this command line's config."""
    from app.job_cli import to_jsonable
    from app.privacy.retention import retain

    print(json.dumps(to_jsonable(retain(resolve_paths(load_config(args.config, args.overrides)))), indent=2))
    return 0


def add_admin_commands(sub: argparse._SubParsersAction, with_config: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``erase``, ``retention`` and ``keys`` to ``kaizen``'s subcommands."""
    erasure = sub.add_parser("erase", help="remove a session's or a user's data from the store (admin; audited)")
    who = erasure.add_mutually_exclusive_group(required=True)
    who.add_argument("--session", default=None, help="the session id the agent sent")
    who.add_argument("--user", default=None, help="the user id the agent sent")
    erasure.add_argument("--actor", default=os.environ.get("USER") or "admin", help="who erases (audit)")
    erasure.add_argument("--reason", default="erasure request", help="why (audit)")
    erasure.add_argument("--json", action="store_true", help="print JSON")
    with_config(erasure)
    erasure.set_defaults(func=cmd_erase)

    retention = sub.add_parser("retention", help="data retention (the scheduler runs it daily)")
    retention_sub = retention.add_subparsers(dest="retention_command", required=True)
    retention_run = retention_sub.add_parser(
        "run", help="remove interactions past collection.retention_days and adapters past model.max_checkpoints"
    )
    with_config(retention_run)
    retention_run.set_defaults(func=cmd_retention_run)

    keys = sub.add_parser("keys", help="API keys and their roles (admin): create, list, revoke")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    actor = os.environ.get("USER") or "admin"
    create = keys_sub.add_parser("create", help="a new key, printed once (the store keeps its salted hash)")
    create.add_argument("name", help="what the key is for, e.g. the agent's host")
    create.add_argument("--role", choices=["agent", "operator", "admin"], default="agent")
    create.add_argument("--rate-per-s", type=float, default=None, help="this key's rate limit (default: the config's)")
    create.add_argument("--actor", default=actor, help="who creates it (audit)")
    keys_list = keys_sub.add_parser("list", help="the keys, never their secrets")
    keys_list.add_argument("--all", action="store_true", help="revoked keys too")
    keys_list.add_argument("--json", action="store_true", help="print JSON")
    revoke = keys_sub.add_parser("revoke", help="revoke a key (within seconds on every replica)")
    revoke.add_argument("id", help="the key's id (the part after kz_)")
    revoke.add_argument("--actor", default=actor, help="who revokes it (audit)")
    revoke.add_argument("--reason", default="revoked with kaizen keys revoke", help="why (audit)")
    rotate = keys_sub.add_parser(
        "rotate-data", help="re-encrypt every stored text field with the newest data key (privacy.encryption)"
    )
    rotate.add_argument("--actor", default=actor, help="who rotates (audit)")
    keys_sub.add_parser("new-data-key", help="print a new data key (for privacy.encryption_key_env)")
    with_config(keys_list)
    with_config(rotate)
    for p in (create, revoke):  # a positional argument of their own: the config by file only
        p.add_argument("--config", default=None, help="config file (default: configs/default.yaml)")
        p.set_defaults(overrides=[])
    for p in (create, keys_list, revoke, rotate, keys_sub.choices["new-data-key"]):
        p.set_defaults(func=cmd_keys)
