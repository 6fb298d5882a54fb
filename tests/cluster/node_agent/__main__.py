"""The node agent: runs the pods bound to one node of the local control plane as local processes.

    python -m tests.cluster.node_agent --kubeconfig K --workdir W [--node-name local-cpu-0]

Run by LocalCluster.start_cpu_node(); the repository root must be on sys.path after the standard library
(operator/ would shadow it otherwise), so LocalCluster starts it with `-c` and sys.path.append."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from tests.cluster.node_agent.agent import NodeAgent
from tests.cluster.node_agent.kube import KubeApi
from tests.cluster.node_agent.node import LOCAL_NODE_NAME


async def _serve(args: argparse.Namespace) -> None:
    async with KubeApi(args.kubeconfig, args.workdir / "credentials") as api:
        agent = NodeAgent(api, args.node_name, args.workdir)
        task = asyncio.create_task(agent.run())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            logging.getLogger("node-agent").info("stopped: its containers were killed")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.cluster.node_agent", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--node-name", default=LOCAL_NODE_NAME)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
