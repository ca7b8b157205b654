"""`lorapipe rollback` and `lorapipe registry set-gate`: the explicit, audited registry moves
outside the gate. Bad input: one line, exit 2."""
from __future__ import annotations

from pipelines.core.defaults import default_tracking_uri


def cmd_rollback(args) -> int:
    from pipelines.registry.promote import rollback

    print(rollback(args.name, args.alias, args.to, args.reason, tracking_uri=default_tracking_uri(args.tracking_uri)))
    return 0


def cmd_set_gate(args) -> int:
    from pipelines.eval.gate import gate_suite, set_gate_suite
    from pipelines.eval.suite import load_suite, prepare_suite
    from pipelines.tracking.runs import client, reachable

    uri = default_tracking_uri(args.tracking_uri)
    suite = load_suite(args.suite)
    fingerprint = prepare_suite(suite).fingerprint
    reachable(uri)
    c = client(uri)
    old = gate_suite(c, args.name)  # also: the model must exist
    set_gate_suite(c, args.name, suite, fingerprint)
    was = f" (was {old.fingerprint[:12]})" if old else ""
    print(f"{args.name}: gate suite {fingerprint[:12]}{was}, primary {suite.primary.metric} ({suite.primary.mode}, "
          f"margin {suite.primary.margin:g}), {len(suite.guards)} guard(s)")
    return 0


def add_rollback_command(sub) -> None:
    rb = sub.add_parser("rollback", help="move an alias back to a version that held it before (audited)")
    rb.add_argument("name")
    rb.add_argument("--alias", default="champion")
    rb.add_argument("--to", required=True, metavar="VERSION")
    rb.add_argument("--reason", required=True)
    rb.add_argument("--tracking-uri")
    rb.set_defaults(fn=cmd_rollback)
