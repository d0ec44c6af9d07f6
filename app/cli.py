"""The ``kaizen`` command for operators.

kaizen up [--config FILE] [--address ADDR] [--seed-if-empty] [key=value ...]
kaizen status [--config FILE] [--url URL]
kaizen config check [--list | --markdown] FILE [key=value ...]
kaizen seed [--count N] [--url URL] [--seed S]
kaizen calibrate [--config FILE] [--min-ratings N] [--test-fraction F] [--dry-run] [--json]
kaizen adapters list [--status S] [--json]
kaizen adapters alias NAME ADAPTER|--clear [--actor WHO] [--reason WHY]
kaizen traffic [--minutes M] [--answer TEXT]     (simulated users against a running kaizen up)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import ssl
import sys
import threading
from typing import Any

from app.config import (
    ConfigError,
    KaizenConfig,
    apply_overrides,
    load_config,
    read_config_file,
    resolve_paths,
    validate_config,
)
from app.config_keys import ConfigKey, config_keys
from app.ray_setup import start_ray

__all__ = ["main"]


def _seed(url: str, count: int, seed: int, api_key: str | None, verify: ssl.SSLContext | bool = True) -> dict[str, int]:
    from app.client import KaizenClient
    from app.sample import send_samples

    with KaizenClient(url, api_key=api_key, verify=verify) as client:
        sent = send_samples(client, count, seed=seed)
        delivered = client.flush(timeout=120.0)
        sent["delivered"] = int(delivered)
        sent.update({f"server_{k}": v for k, v in client.stats.items() if k in ("accepted", "duplicate", "rejected")})
    return sent


# --- commands ----------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    import ray

    from actors.stack import KaizenNotReady, start_kaizen, stop_kaizen
    from app.store import open_store

    cfg = resolve_paths(load_config(args.config, args.overrides))
    report = validate_config(cfg.model_dump(mode="json"))
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)

    start_ray(cfg, address=args.address, logging_level="WARNING", log_to_driver=True)
    try:
        url = start_kaizen(cfg)
    except KaizenNotReady as exc:
        print(f"error: {exc}", file=sys.stderr)
        ray.shutdown()
        return 1
    store_desc = cfg.store.sqlite_path if cfg.store.engine == "sqlite" else cfg.store.postgres_dsn.split("@")[-1]
    print(f"Kaizen is up ({cfg.store.engine}: {store_desc})")
    print(f"  events      POST {url}/v1/events")
    print(f"  interaction POST {url}/v1/interactions   GET {url}/v1/interactions/{{id}}")
    if cfg.serve.scorer.enabled:
        print(
            f"  quality     POST {url}/v1/quality/assess   WS {url.replace('http', 'ws', 1)}/v1/quality/stream"
            f"   GET {url}/v1/review"
        )
    if cfg.serve.generator.enabled:
        print(
            f"  chat        POST {url}/v1/chat/completions   GET {url}/v1/models   "
            f"(OpenAI-compatible; model {cfg.model.base_model!r}, an adapter id, champion, challenger)"
        )
    print(
        f"  deployments GET  {url}/v1/deployments   POST {url}/v1/deployments/{{id}}/rollback   "
        f"(deployer: {cfg.model.deployment_strategy}; kaizen deploy status)"
    )
    print(
        f"  training    GET  {url}/v1/training   POST {url}/v1/training/runs   "
        f"(scheduler: {'on' if cfg.enabled and cfg.training.auto_training else 'reporting only'})"
    )
    print(f"  health      GET  {url}/healthz  {url}/readyz")
    print(f"  API docs    {url}/docs   (OpenAPI: {url}/openapi.json)")

    if args.seed_if_empty:
        store = open_store(cfg.store)
        empty = store.count("interactions") == 0
        store.close()
        if empty:
            print(f"The store is empty: seeding {args.seed_count} sample interactions through the client ...")
            sent = _seed(url, args.seed_count, 0, None, cfg.tls_verify())
            print(
                f"  sent {sent['interactions']} interactions ({sent['poor']} poor answers), "
                f"{sent['tool_usage']} tool calls, {sent['feedback']} feedback, {sent['outcomes']} outcomes"
            )

    print("Press Ctrl-C to stop.")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    print("\nShutting down ...")
    stop_kaizen(cfg)
    ray.shutdown()
    print("Stopped.")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from app.store import open_store

    cfg = resolve_paths(load_config(args.config, args.overrides))
    try:
        store = open_store(cfg.store, migrate=False)
        stats = store.stats()
        store.close()
    except Exception as exc:
        print(f"store ({cfg.store.engine}): unavailable: {exc}")
        stats = None
    serve_status = _serve_status(cfg)
    if args.json:
        print(json.dumps({"store": stats, "serve": serve_status}, indent=2, default=str))
        return 0
    if stats:
        print(
            f"store: {stats['engine']} (schema v{stats['schema_version']})  "
            f"interactions {stats['interactions']}, feedback {stats['feedback']}, "
            f"tool calls {stats['tool_usage']}, outcomes {stats['outcomes']}"
        )
        print("interactions per day:")
        for row in stats["per_day"] or [{"day": "(none)", "interactions": 0}]:
            print(f"  {row['day']}  {row['interactions']:>8}")
        print("redactions per kind:")
        for kind, n in (stats["redactions"] or {"(none)": 0}).items():
            print(f"  {kind:<22}{n:>8}")
        print("quality status: " + ", ".join(f"{k} {v}" for k, v in stats["quality_status"].items()))
    print(f"serve: {serve_status['status']}")
    for name, app in serve_status.get("applications", {}).items():
        print(f"  {name}: {app['status']}")
        for dep, info in app.get("deployments", {}).items():
            print(f"    {dep}: {info['status']} replicas {info['replicas']}")
    return 0


def _serve_status(cfg: KaizenConfig) -> dict[str, Any]:
    """Serve's view of the applications, when a Ray cluster with Serve is running."""
    import ray

    address = cfg.ray.address or "auto"
    if address != "auto" and not address.startswith("ray://") and not _reachable(address):
        return {"status": f"not running (no Ray cluster at {address})"}
    if ray.is_initialized():
        return {"status": "unknown (this process already runs Ray)"}
    try:
        ray.init(address=address, namespace=cfg.ray.namespace, logging_level="ERROR", log_to_driver=False)
    except Exception:
        return {"status": "not running (no Ray cluster found)"}
    try:
        from ray import serve

        status = serve.status()
        apps = {}
        for name, app in status.applications.items():
            apps[name] = {
                "status": str(app.status.value if hasattr(app.status, "value") else app.status),
                "deployments": {
                    dname: {
                        "status": str(d.status.value if hasattr(d.status, "value") else d.status),
                        "replicas": dict(d.replica_states),
                    }
                    for dname, d in app.deployments.items()
                },
            }
        return {"status": "running" if apps else "no applications", "applications": apps}
    except Exception as exc:
        return {"status": f"unknown ({exc})"}
    finally:
        ray.shutdown()


def _reachable(address: str, timeout_s: float = 1.0) -> bool:
    """Whether host:port accepts a TCP connection (ray.init would retry for minutes otherwise)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _shown(value: Any, key: str = "") -> str:
    """A value as in YAML (JSON is YAML), with secrets masked: a listing may end up in a ticket."""
    from app.config_keys import masked

    return json.dumps(masked(key, value))


def _key_listing(keys: list[ConfigKey]) -> list[str]:
    """Every key with its value (and its default where it differs), its description below it."""
    lines = []
    for k in keys:
        note = "" if k.value == k.default else f"   (default {_shown(k.default, k.key)})"
        lines += [f"{k.key} = {_shown(k.value, k.key)}{note}", f"    {k.description}"]
    return lines


def _key_table(keys: list[ConfigKey]) -> list[str]:
    """The keys as a Markdown table (key, default, what it does), as the README has it."""
    lines = ["| key | default | what it does |", "| --- | --- | --- |"]
    for k in keys:
        cells = (f"`{k.key}`", f"`{_shown(k.default, k.key)}`", k.description)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        data = apply_overrides(read_config_file(args.file), args.overrides)
    except ConfigError as exc:
        for err in exc.errors:
            print(f"error: {err}")
        return 1
    report = validate_config(data)
    for err in report.errors:
        print(f"error: {err}")
    for warning in report.warnings:
        print(f"warning: {warning}")
    if report.valid:
        print(f"{args.file}: valid ({len(report.warnings)} warning{'s' if len(report.warnings) != 1 else ''})")
    if args.list or args.markdown:
        if report.config is None:
            print("(the keys are listed once the errors are fixed)")
        else:
            print("\n".join((_key_table if args.markdown else _key_listing)(config_keys(report.config))))
    return 0 if report.valid else 1


def cmd_seed(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    url = (args.url or cfg.api_url()).rstrip("/")
    sent = _seed(url, args.count, args.seed, args.api_key or os.environ.get("KAIZEN_API_KEY"), cfg.tls_verify())
    print(json.dumps(sent, indent=2))
    return 0 if sent["delivered"] else 1


def cmd_calibrate(args: argparse.Namespace) -> int:
    from app.quality.service import QualityService
    from app.store import open_store

    cfg = resolve_paths(load_config(args.config, args.overrides))
    store = open_store(cfg.store)
    try:
        service = QualityService(store)
        report = service.calibrate(
            min_ratings=args.min_ratings or cfg.quality.calibration_min_ratings,
            test_fraction=args.test_fraction,
            seed=args.seed,
            activate=not args.dry_run,
        )
    finally:
        store.close()
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    print(f"rated interactions: {report.ratings} (train {report.train}, held out {report.test})")
    if report.seed:
        print(f"{'held-out correlation':<24}{'spearman':>10}{'pearson':>10}")
        print(f"{'seed weights':<24}{report.seed['spearman']:>10.3f}{report.seed['pearson']:>10.3f}")
        print(f"{'calibrated':<24}{report.calibrated['spearman']:>10.3f}{report.calibrated['pearson']:>10.3f}")
    if report.calibration is None:
        print(f"kept the seed's weights: {report.reason}")
        return 0
    weights = ", ".join(f"{k} {v:.3f}" for k, v in report.calibration.weights.items())
    print(f"weights: {weights}")
    if args.dry_run:
        print(f"{report.calibration.version}: not stored (--dry-run)")
    else:
        print(
            f"{report.calibration.version}: active; scorers use it from their next sweep. "
            "Re-score stored interactions with: python -m jobs.score --all"
        )
    return 0


def cmd_adapters_list(args: argparse.Namespace) -> int:
    from app.registry import AdapterRegistry
    from app.store import open_store

    cfg = resolve_paths(load_config(args.config, args.overrides))
    store = open_store(cfg.store)
    try:
        registry = AdapterRegistry(store)
        adapters, aliases = registry.list(status=args.status), registry.aliases()
    finally:
        store.close()
    if args.json:
        print(json.dumps({"adapters": adapters, "aliases": aliases}, indent=2, default=str))
        return 0
    by_adapter: dict[str, list[str]] = {}
    for alias, adapter_id in aliases.items():
        by_adapter.setdefault(adapter_id, []).append(alias)
    print(f"{'adapter':<32}{'status':<12}{'aliases':<22}{'base model':<28}created")
    for row in adapters:
        print(
            f"{row['id']:<32}{row['status']:<12}{','.join(by_adapter.get(row['id'], [])) or '-':<22}"
            f"{row['base_model']:<28}{row['created_at']}"
        )
    if not adapters:
        print("(no adapters registered)")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    """``kaizen deploy status | promote ADAPTER | rollback [ID] | pause [ID] | resume [ID]``: the
    deployer's view and an operator's decisions, made on the store as the deployer actor makes them
    (a promotion's preloading and smoke test are finished by the actor's next tick)."""
    from app.deployment.deployer import Deployer
    from app.deployment.probe import HttpProbe
    from app.deployment.state import DeploymentNotFoundError, StaleDeploymentError
    from app.registry import AdapterNotRegisteredError
    from app.store import open_store

    cfg = resolve_paths(load_config(args.config, args.overrides))
    store = open_store(cfg.store)
    try:
        deployer = Deployer(cfg, store, HttpProbe.for_config(cfg, store), actor="cli")
        action = args.deploy_command
        if action == "status":
            out: Any = deployer.status()
        elif action == "promote":
            out = deployer.promote(args.adapter, args.actor, args.reason).to_json()
        else:
            out = getattr(deployer, action)(args.deployment, args.actor, args.reason).to_json()
    except (ValueError, AdapterNotRegisteredError, DeploymentNotFoundError, StaleDeploymentError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    if args.json or (action == "status" and not out.get("active")):
        print(json.dumps(out, indent=2, default=str))
        return 0
    if action == "status":
        active = out["active"]
        print(f"strategy {out['strategy']}; aliases {out['aliases'] or '(none: the base model serves)'}")
        print(f"active: {active['id']} {active['adapter_id']} {active['state']} (share {active['share']:g})")
        if out.get("live"):
            print(f"  live rule: {out['live']['rule']}: {out['live']['reason']}")
        for d in out.get("decisions", []):
            move = f"{d.get('from_state') or '-'} -> {d['to_state']}"
            print(f"  {d['created_at']}  {d['decision']:<10} {move}: {d['reason']}")
        return 0
    print(f"{out['id']}: {out['adapter_id']} is {out['state']} (share {out['share']:g})")
    if action == "promote" and out["state"] == "preloading":
        print("  the deployer makes it champion once every Generator replica has it loaded and it passed a smoke test")
    return 0


def cmd_training_status(args: argparse.Namespace) -> int:
    """``kaizen training status``: the cycles and the scheduler's latest decisions, from the store."""
    from app.serve.training_api import store_view
    from app.store import open_store

    cfg = resolve_paths(load_config(args.config, args.overrides))
    store = open_store(cfg.store)
    try:
        view = store_view(store)
    finally:
        store.close()
    view.pop("scheduler")
    if args.json:
        print(json.dumps(view, indent=2, default=str))
        return 0
    running = view["running"]
    print(
        f"running: {running['id']} ({running['trigger']}) since {running['started_at']}" if running else "running: none"
    )
    for d in view["decisions"]:
        print(f"  {d.get('at')}  {d.get('code', '-'):<10} {d.get('reason', '')}")
    for r in view["recent"]:
        print(f"  {r['id']}  {r['status']:<10} {r.get('trigger') or '-':<8} {r.get('adapter_id') or ''}")
    if not view["decisions"] and not view["recent"]:
        print("(no decisions yet: kaizen up starts the scheduler)")
    return 0


def cmd_traffic(args: argparse.Namespace) -> int:
    """``kaizen traffic``: simulated users against a running ``kaizen up``, and the loop's events."""
    from app.simulation import run_traffic

    cfg = resolve_paths(load_config(args.config, args.overrides))
    url = (args.url or cfg.api_url()).rstrip("/")
    try:
        totals = run_traffic(
            cfg,
            url,
            minutes=args.minutes,
            users=args.users,
            threads=args.threads,
            pause_s=args.pause,
            answer=args.answer,
        )
    except KeyboardInterrupt:
        print("stopped")
        return 0
    print(f"{totals['requests']} requests, {totals['failed']} failed, {totals['accepted']} accepted")
    return 0 if totals["requests"] and not totals["failed"] else 1


def cmd_adapters_alias(args: argparse.Namespace) -> int:
    from app.registry import AdapterNotRegisteredError, AdapterRegistry
    from app.store import open_store

    if (args.adapter is None) == (not args.clear):
        print("error: give an ADAPTER, or --clear", file=sys.stderr)
        return 2
    cfg = resolve_paths(load_config(args.config, args.overrides))
    store = open_store(cfg.store)
    try:
        row = AdapterRegistry(store).set_alias(args.name, None if args.clear else args.adapter, args.actor, args.reason)
    except (ValueError, AdapterNotRegisteredError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"{args.name}: {row.get('previous_adapter_id') or '(none)'} -> {row.get('adapter_id') or '(none)'}")
    return 0


def _parser() -> argparse.ArgumentParser:
    from app.admin_cli import add_admin_commands
    from jobs import learn as learn_job
    from jobs import validate as validate_job

    parser = argparse.ArgumentParser(prog="kaizen", description="Continuous learning for LLM coding agents.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", default=None, help="config file (default: configs/default.yaml)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. collection.capture_rate=0.5")

    up = sub.add_parser("up", help="start Ray (or join one), deploy Kaizen, run until Ctrl-C")
    with_config(up)
    up.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    up.add_argument("--seed-if-empty", action="store_true", help="send sample interactions to an empty store")
    up.add_argument("--seed-count", type=int, default=200, help="how many (with --seed-if-empty)")
    up.set_defaults(func=cmd_up)

    status = sub.add_parser("status", help="interactions per day, redactions per kind, store and Serve status")
    with_config(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=cmd_status)

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="print a config file's errors and warnings (and its keys)")
    check.add_argument("file")
    check.add_argument("overrides", nargs="*")
    check.add_argument("--list", action="store_true", help="then every key: value, default, what it does")
    check.add_argument("--markdown", action="store_true", help="then every key as a Markdown table (the README's)")
    check.set_defaults(func=cmd_config_check)

    seed = sub.add_parser("seed", help="send realistic sample interactions through the client")
    with_config(seed)
    seed.add_argument("--count", type=int, default=200)
    seed.add_argument("--seed", type=int, default=0, help="random seed of the sample")
    seed.add_argument("--url", default=None, help="Kaizen's base URL (default: from the config)")
    seed.add_argument("--api-key", default=None, help="API key (default: $KAIZEN_API_KEY)")
    seed.set_defaults(func=cmd_seed)

    calibrate = sub.add_parser("calibrate", help="fit how the quality dimensions combine to the human ratings")
    with_config(calibrate)
    calibrate.add_argument(
        "--min-ratings", type=int, default=None, help="ratings needed (default: quality.calibration_min_ratings)"
    )
    calibrate.add_argument("--test-fraction", type=float, default=0.25, help="share held out for evaluation")
    calibrate.add_argument("--seed", type=int, default=0, help="random seed of the split")
    calibrate.add_argument("--dry-run", action="store_true", help="report, but do not store or activate")
    calibrate.add_argument("--json", action="store_true", help="print JSON")
    calibrate.set_defaults(func=cmd_calibrate)

    learn = sub.add_parser(
        "learn", help="one learning cycle: dataset, rehearsal, fine-tuning (or a sweep), a candidate"
    )
    learn_job.add_arguments(learn)
    learn.set_defaults(func=learn_job.run)

    deploy = sub.add_parser(
        "deploy", help="deployments: status, and an operator's promote, rollback, pause or resume (audited)"
    )
    deploy_sub = deploy.add_subparsers(dest="deploy_command", required=True)
    who = os.environ.get("USER") or "operator"
    for name, helptext in (
        ("status", "what serves, the active deployment, its decisions and the live rule's current answer"),
        ("promote", "make ADAPTER champion (from a canary at once; otherwise after preloading and a smoke test)"),
        ("rollback", "end the active deployment (or ID): the champion it replaced serves again"),
        ("pause", "stop the canary's traffic without deciding"),
        ("resume", "send a paused canary its share again"),
    ):
        p = deploy_sub.add_parser(name, help=helptext)
        if name == "promote":
            p.add_argument("adapter", help="the adapter id to make champion")
        with_config(p)
        if name not in ("status", "promote"):
            p.add_argument("--deployment", default=None, help="deployment id (default: the active one)")
        if name != "status":
            p.add_argument("--reason", required=True, help="why (kept with the decision and audited)")
            p.add_argument("--actor", default=who, help="who decides (audit)")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(func=cmd_deploy)

    training = sub.add_parser("training", help="the scheduler's learning cycles and decisions")
    training_sub = training.add_subparsers(dest="training_command", required=True)
    tstatus = training_sub.add_parser("status", help="the running cycle, the latest decisions and their reasons")
    with_config(tstatus)
    tstatus.add_argument("--json", action="store_true", help="print JSON")
    tstatus.set_defaults(func=cmd_training_status)

    traffic = sub.add_parser(
        "traffic",
        help="simulated users against a running kaizen up: requests whose right answer is always --answer, "
        "corrected when wrong; prints the acceptance and what the loop does (cycle, canary, promotion)",
    )
    with_config(traffic)
    traffic.add_argument("--url", default=None, help="the Kaizen API (default: the config's serve address)")
    traffic.add_argument("--minutes", type=float, default=30.0, help="how long (default 30)")
    traffic.add_argument("--users", type=int, default=12, help="sessions (default 12)")
    traffic.add_argument("--threads", type=int, default=2, help="requests in flight (default 2)")
    traffic.add_argument("--pause", type=float, default=0.2, help="seconds between a thread's requests")
    traffic.add_argument("--answer", default="ok", help="the right answer to every request (default ok)")
    traffic.set_defaults(func=cmd_traffic)

    validate = sub.add_parser(
        "validate",
        help="validate an adapter (default: the newest candidate) against the champion or the base model: "
        "performance, quality, safety, forgetting; the verdict production | staging | rejected",
    )
    validate_job.add_arguments(validate)
    validate.set_defaults(func=validate_job.run)

    adapters = sub.add_parser("adapters", help="the adapter registry: versions and the champion/challenger aliases")
    adapters_sub = adapters.add_subparsers(dest="adapters_command", required=True)
    listing = adapters_sub.add_parser("list", help="registered adapters, their statuses and aliases")
    with_config(listing)
    listing.add_argument("--status", default=None, help="only adapters with this status")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=cmd_adapters_list)
    alias = adapters_sub.add_parser("alias", help="point champion or challenger at an adapter (audited)")
    alias.add_argument("name", help="champion or challenger")
    alias.add_argument("adapter", nargs="?", default=None, help="adapter id")
    alias.add_argument("--clear", action="store_true", help="remove the alias")
    alias.add_argument("--actor", default=os.environ.get("USER") or "operator", help="who moves it (audit)")
    alias.add_argument("--reason", default="set by hand with kaizen adapters alias", help="why (audit)")
    alias.add_argument("--config", default=None, help="config file (default: configs/default.yaml)")
    alias.set_defaults(func=cmd_adapters_alias, overrides=[])

    add_admin_commands(sub, with_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
