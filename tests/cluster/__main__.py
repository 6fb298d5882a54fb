"""`python -m tests.cluster up|down|env`: a local control plane for people (what `make cluster-up` runs).

`up` starts the cluster detached (`--cpu-node`: with the node agent's local-cpu-0) (it outlives this command), records its process groups in
<workdir>/state.json and prints the shell exports; `env` prints them again; `down` stops it and
removes <workdir>. The default workdir is ~/.cache/kubellm/cluster (override with --workdir)."""

import argparse
import json
import shutil
import sys
from pathlib import Path

from tests.cluster.binaries import ClusterBinaries
from tests.cluster.localcluster import NODE_AGENT, LocalCluster
from tests.cluster.node_agent.pod_network import remove_pod_network
from tests.cluster.processes import stop_process_group

STATE_FILE = "state.json"


def default_workdir() -> Path:
    return ClusterBinaries.default().root.parent.parent / "cluster"


def _exports(kubeconfig: Path, bin_dir: Path) -> str:
    return f"export KUBECONFIG={kubeconfig}\nexport PATH={bin_dir}:$PATH\n"


def _read_state(workdir: Path) -> dict | None:
    path = workdir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _owned_live_pids(state: dict) -> dict[str, int]:
    """The recorded processes still running one of our binaries (a recycled pid is someone else's)."""
    live: dict[str, int] = {}
    for name, pid in state["pids"].items():
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if argv0.startswith(state["bin_dir"]) or (name == NODE_AGENT and argv0 == sys.executable):
            live[name] = pid
    return live


def down(workdir: Path) -> None:
    state = _read_state(workdir)
    if state is not None:
        live = _owned_live_pids(state)
        for name in reversed(list(state["pids"])):
            if name in live:
                stop_process_group(live[name])
        if NODE_AGENT in state["pids"]:
            remove_pod_network()  # the agent removes it as it stops; this is for one killed outright
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"local cluster in {workdir} is down", file=sys.stderr)


def up(workdir: Path, cpu_node: bool = False) -> None:
    state = _read_state(workdir)
    if state is not None and len(_owned_live_pids(state)) == len(state["pids"]):
        print(f"local cluster already running in {workdir}", file=sys.stderr)
        print(_exports(Path(state["kubeconfig"]), Path(state["bin_dir"])), end="")
        return
    if workdir.exists():
        down(workdir)  # a half-dead leftover: clear it before starting afresh
    cluster = LocalCluster(workdir, die_with_parent=False)
    cluster.start()
    if cpu_node:
        cluster.start_cpu_node()
    state = {
        "pids": {process.name: process.pid for process in cluster.processes},
        "bin_dir": str(cluster.bin_dir),
        "kubeconfig": str(cluster.kubeconfig),
        "api_server": cluster.api_server,
    }
    (workdir / STATE_FILE).write_text(json.dumps(state, indent=2))
    print(f"local cluster up at {cluster.api_server} (logs in {workdir})", file=sys.stderr)
    print(_exports(cluster.kubeconfig, cluster.bin_dir), end="")


def env(workdir: Path) -> None:
    state = _read_state(workdir)
    if state is None:
        sys.exit(f"no local cluster in {workdir}; run `make cluster-up`")
    print(_exports(Path(state["kubeconfig"]), Path(state["bin_dir"])), end="")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "env"])
    parser.add_argument("--workdir", type=Path, default=default_workdir())
    parser.add_argument(
        "--cpu-node",
        action="store_true",
        help="up: also start the node agent, whose node local-cpu-0 really runs pods (tests/cluster/README.md)",
    )
    args = parser.parse_args()
    if args.command == "up":
        up(args.workdir, args.cpu_node)
    else:
        {"down": down, "env": env}[args.command](args.workdir)


if __name__ == "__main__":
    main()
