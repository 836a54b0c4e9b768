"""The development tools' one command line: ``python -m tools <command>``.

Operator commands, which the images hold, are ``python -m service <command>`` instead.
"""

from __future__ import annotations

import argparse
import sys

from tools import devstack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools", description="Development tools (never in the images)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="find or start PostgreSQL and Redis, migrate, run the API and the worker (make run)",
    )
    run.add_argument(
        "hypercorn_args",
        nargs=argparse.REMAINDER,
        help="options for Hypercorn after a '--', e.g. -- --bind 127.0.0.1:9000",
    )
    commands.add_parser(
        "env", help="print DATABASE_URL and REDIS_URL (starting private servers if need be)"
    )
    commands.add_parser("down", help="stop the private servers under .local/ (make down)")
    # Listed for --help; its options are its own (python -m tools scale-out --help).
    commands.add_parser(
        "scale-out", help="two APIs and two workers sharing PostgreSQL and Redis (make scale-out)"
    )
    commands.add_parser("images", help="build the API and worker images (make images)")
    commands.add_parser(
        "cluster-test", help="the many-host run over network namespaces (make cluster-test)"
    )
    commands.add_parser(
        "lock-check", help="install requirements.lock on each given Python (make lock-check)"
    )
    commands.add_parser(
        "prometheusrule",
        help="write deploy/k8s's PrometheusRule from deploy/prometheus/rules.yml "
        "(make prometheusrule)",
    )
    commands.add_parser(
        "test-busy", help="the suite run after run beside a busy CPU core (make test-busy)"
    )
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["test-busy"]:
        from tools.busy import main as busy_main

        return busy_main(given[1:])
    if given[:1] == ["images"]:
        from tools.images import main as images_main

        return images_main(["build", *given[1:]])
    if given[:1] == ["lock-check"]:
        from tools.lockcheck import main as lockcheck_main

        return lockcheck_main(given[1:])
    if given[:1] == ["prometheusrule"]:
        from tools.prometheusrule import main as prometheusrule_main

        return prometheusrule_main(given[1:])
    if given[:1] == ["cluster-test"]:
        from tools.cluster import main as cluster_main

        return cluster_main(given[1:])
    if given[:1] == ["scale-out"]:
        # Handed over whole (argparse's REMAINDER refuses a first argument that is an
        # option); imported only here, since it needs the test dependencies (httpx).
        from tools.scale_out import main as scale_out_main

        return scale_out_main(given[1:])
    args = parser.parse_args(given)

    if args.command == "run":
        extra: list[str] = args.hypercorn_args
        return devstack.run(extra[1:] if extra[:1] == ["--"] else extra)
    if args.command == "env":
        return devstack.print_env()
    return devstack.down()


if __name__ == "__main__":
    sys.exit(main())
