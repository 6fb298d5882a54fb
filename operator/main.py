"""`kubellm operator`: run the reconciler against the cluster from the kubeconfig or the pod.

The `kubellm` CLI (engine/cli.py) hands the words after `operator` to `main(argv)`.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import sys

import kopf
from kubernetes.config import ConfigException

from kubellm_operator.kube import ApiError, Kube
from kubellm_operator.peering import ensure_peering
from kubellm_operator.reconcile import Reconciler

DEFAULT_PEERING = "kubellm-operator"
DEFAULT_LIVENESS_PORT = 8080

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubellm operator",
        description="Run the kubellm operator: ModelDeployment resources -> engine Deployments and Services.",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        "-n",
        dest="namespaces",
        action="append",
        metavar="NS",
        help="watch only this namespace (repeat for several)",
    )
    scope.add_argument(
        "--all-namespaces", "-A", action="store_true", help="watch every namespace (the default)"
    )
    parser.add_argument(
        "--liveness-port",
        type=int,
        default=DEFAULT_LIVENESS_PORT,
        help=f"serve GET /healthz on this port for a liveness probe; 0 turns it off (default {DEFAULT_LIVENESS_PORT})",
    )
    parser.add_argument(
        "--peering",
        default=DEFAULT_PEERING,
        help=f"name of the kopf peering object replicas elect a leader through (default {DEFAULT_PEERING})",
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=None,
        help="peering priority: the live replica with the highest one works, the others wait (default: random)",
    )
    parser.add_argument("--standalone", action="store_true", help="no leader election (a single replica)")
    parser.add_argument("--verbose", "-v", action="store_true", help="log more")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run until SIGINT/SIGTERM; returns the process exit code."""
    args = build_parser().parse_args(argv)
    kopf.configure(verbose=args.verbose, log_prefix=True)  # prefix: which object a line is about
    logging.getLogger("urllib3").setLevel(logging.WARNING)  # one line per API request drowns the rest
    if not args.verbose:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # "handler succeeded" for every pod event
    from kubellm_operator import handlers  # noqa: F401  (registers the handlers with kopf)

    try:
        kube = Kube.from_environment()
    except ConfigException as error:
        print(
            f"kubellm operator: no cluster to talk to ({error}); set KUBECONFIG or run in a pod",
            file=sys.stderr,
        )
        return 1
    namespaces = args.namespaces or []
    try:
        peering = not args.standalone and ensure_peering(kube, args.peering, namespaces)
    except ApiError as error:
        print(f"kubellm operator: cannot reach the API server: {error}", file=sys.stderr)
        return 1
    # Equal priorities make kopf pause every replica, so each replica draws its own.
    priority = args.priority if args.priority is not None else 1 + secrets.randbelow(1_000_000)
    liveness = f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None
    log.info(
        "starting: %s, peering %s",
        ", ".join(namespaces) or "all namespaces",
        args.peering if peering else "off",
    )
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=not peering,
        peering_name=args.peering if peering else None,
        priority=priority,
        liveness_endpoint=liveness,
        memo=kopf.Memo(reconciler=Reconciler(kube)),
    )
    return 0
