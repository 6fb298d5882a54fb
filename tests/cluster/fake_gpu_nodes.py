"""Fake GPU nodes, shaped like a cloud GPU node pool, that KWOK keeps Ready (no kubelet, no containers)."""

from dataclasses import dataclass
from typing import Any

# KWOK is started with --manage-nodes-with-annotation-selector=<this>=fake: it adopts only these nodes.
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
H100 = "NVIDIA-H100-80GB-HBM3"


@dataclass(frozen=True)
class FakeGpuNode:
    name: str
    gpus: int = 4
    gpu_product: str = H100
    cpu: str = "64"
    memory: str = "512Gi"
    # Local NVMe, as GPU nodes have: engine pods request their emptyDir cache as ephemeral-storage.
    ephemeral_storage: str = "3Ti"
    pods: str = "110"

    def manifest(self) -> dict[str, Any]:
        resources = {
            "cpu": self.cpu,
            "memory": self.memory,
            "ephemeral-storage": self.ephemeral_storage,
            "pods": self.pods,
            GPU_RESOURCE: str(self.gpus),
        }
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "annotations": {KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                    GPU_PRODUCT_LABEL: self.gpu_product,
                    "nvidia.com/gpu.count": str(self.gpus),
                    "nvidia.com/gpu.present": "true",
                },
            },
            # GPU pools are tainted so only pods that tolerate GPUs land there (the operator adds that toleration).
            "spec": {"taints": [{"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}]},
            # A Node's status may be set at creation (kubelets register that way); KWOK keeps these values.
            "status": {"capacity": resources, "allocatable": resources},
        }


def default_gpu_nodes() -> list[FakeGpuNode]:
    """Two nodes with 4 H100s each: a pod asking for 8 GPUs can never be scheduled."""
    return [FakeGpuNode("kwok-gpu-0"), FakeGpuNode("kwok-gpu-1")]
