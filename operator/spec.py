"""The ModelDeployment spec as pydantic models: the one source of its shape, defaults and docs.

The CRD's openAPIV3Schema is generated from these models (see schema.py / crd.py), so every
description and default written here is what `kubectl explain md.spec` shows. Rules that span
fields are CEL rules (`x-kubernetes-validations`) evaluated by the API server.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from engine.config import EngineConfig  # torch-free: the engine's defaults are quoted from it

DEFAULT_ENGINE_IMAGE = "ghcr.io/kubellm/engine:0.1.0"
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"  # set by NVIDIA GPU feature discovery
EMBEDDED_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

# hf://org/name[@revision], or an absolute path inside the container (a mounted volume).
SOURCE_PATTERN = r"^(hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?|/\S*)$"
QUANTITY_PATTERN = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"

# A Kubernetes quantity ("16Gi", "500m", 4): users write both numbers and strings.
Quantity = Annotated[
    int | str,
    Field(json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN}),
]


def defaulted(model: type[BaseModel], description: str) -> Any:
    """A nested object that defaults to {} so the API server fills in its fields' defaults too."""
    return Field(default_factory=model, description=description, json_schema_extra={"default": {}})


class SpecModel(BaseModel):
    """camelCase on the wire (Kubernetes style), snake_case in Python."""

    model_config = ConfigDict(alias_generator=to_camel, validate_by_name=True, validate_by_alias=True)


class SecretKeyRef(SpecModel):
    name: str = Field(min_length=1, description="Name of a Secret in the resource's namespace.")
    key: str = Field("token", min_length=1, description="Key inside the Secret.")


class ModelSource(SpecModel):
    source: str | None = Field(
        None,
        pattern=SOURCE_PATTERN,
        description=(
            "Where the engine loads the model from: `hf://org/name[@revision]` (downloaded from the "
            "Hugging Face Hub into the model cache) or an absolute path inside the container (a Hugging "
            "Face directory or a GGUF file on a mounted volume). Omit it to serve the engine's embedded "
            f"{EMBEDDED_MODEL_NAME} (a small CPU demo model)."
        ),
    )
    served_model_name: str | None = Field(
        None,
        min_length=1,
        description=(
            "The name clients pass as `model`. Default: the repository id of an hf:// source "
            "(`hf://meta-llama/Llama-3.2-3B-Instruct` -> `meta-llama/Llama-3.2-3B-Instruct`), the path "
            f"of a path source, or `{EMBEDDED_MODEL_NAME}` for the embedded model."
        ),
    )
    hf_token_secret: SecretKeyRef | None = Field(
        None,
        description="Secret holding a Hugging Face token, passed to the engine as HF_TOKEN (gated models).",
    )


class EnvVar(SpecModel):
    name: str = Field(min_length=1, description="Environment variable name.")
    value: str | None = Field(None, description="Literal value.")
    value_from: dict[str, Any] | None = Field(
        None, description="A Kubernetes EnvVarSource (secretKeyRef, configMapKeyRef, fieldRef, ...)."
    )


class EngineSpec(SpecModel):
    image: str = Field(DEFAULT_ENGINE_IMAGE, min_length=1, description="Engine container image.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="Image pull policy of the engine container."
    )
    max_model_len: int | None = Field(
        None, ge=16, description="--max-model-len: context length. Unset: the model's own."
    )
    max_num_seqs: int | None = Field(
        None,
        ge=1,
        description="--max-num-seqs: sequences batched at once. Unset: the engine's default "
        f"({EngineConfig.per_device_default('max_num_seqs')}).",
    )
    max_num_batched_tokens: int | None = Field(
        None, ge=16, description="--max-num-batched-tokens: token budget of one step. Unset: engine default."
    )
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="--gpu-memory-utilization: share of GPU memory for weights + KV cache. Unset: 0.9.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = Field(
        None, description="--dtype of weights and activations. Unset: auto."
    )
    enable_prefix_caching: bool | None = Field(
        None, description="--enable-prefix-caching / --no-enable-prefix-caching. Unset: engine default (on)."
    )
    api_key_secret: SecretKeyRef | None = Field(
        None, description="Secret holding an API key the engine requires from clients (--api-key)."
    )
    extra_args: list[str] = Field(
        default_factory=list, description="More `kubellm serve` arguments, appended as given."
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        description="Extra environment variables for the engine; a name set here overrides the operator's.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )


class GpuSpec(SpecModel):
    count: int = Field(
        1, ge=0, description="GPUs per pod (limits of `resourceName`). 0 runs the engine on the CPU."
    )
    resource_name: str = Field(
        DEFAULT_GPU_RESOURCE,
        min_length=1,
        description="Extended resource that counts GPUs; pods also tolerate taints with this key.",
    )
    product: str | None = Field(
        None,
        min_length=1,
        description=(
            f"GPU type: schedule only on nodes whose `{GPU_PRODUCT_LABEL}` label equals this "
            "(e.g. NVIDIA-H100-80GB-HBM3)."
        ),
    )


class ComputeResources(SpecModel):
    cpu: Quantity | None = Field(None, description="CPU request of the engine container.")
    memory: Quantity | None = Field(None, description="Memory request and limit of the engine container.")


class Toleration(SpecModel):
    key: str | None = Field(None, description="Taint key; empty with operator Exists matches every taint.")
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal (default Equal).")
    value: str | None = Field(None, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; empty matches all effects."
    )
    toleration_seconds: int | None = Field(None, description="How long a NoExecute taint is tolerated.")


class ServiceSpec(SpecModel):
    name: str | None = Field(
        None,
        pattern=r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$",
        description="Service name. Default: `<metadata.name>-service`.",
    )
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field("ClusterIP", description="Service type.")
    port: int = Field(8000, ge=1, le=65535, description="Service port (named `http`) in front of the engine.")


class NewClaim(SpecModel):
    size: Quantity = Field(description="Requested storage, e.g. 50Gi.")
    storage_class_name: str | None = Field(None, description="StorageClass. Unset: the cluster default.")
    access_modes: list[Literal["ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany", "ReadWriteOncePod"]] = Field(
        default_factory=lambda: ["ReadWriteOnce"],
        min_length=1,
        description="Access modes; use ReadWriteMany to share one cache among replicas on several nodes.",
        json_schema_extra={"default": ["ReadWriteOnce"]},
    )


class EmptyDirCache(SpecModel):
    size_limit: Quantity | None = Field(None, description="Upper bound of the emptyDir's size.")


class ModelCacheSpec(SpecModel):
    """At most one of the three sources; none means an emptyDir (the cache dies with the pod)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "[has(self.emptyDir), has(self.persistentVolumeClaim), has(self.existingClaim)]"
                    ".filter(x, x).size() <= 1",
                    "message": "set at most one of emptyDir, persistentVolumeClaim, existingClaim",
                }
            ]
        }
    )
    mount_path: str = Field(
        "/model-cache",
        pattern=r"^/.*",
        description="Where the cache is mounted in the engine container; HF_HOME points here.",
    )
    empty_dir: EmptyDirCache | None = Field(None, description="A scratch emptyDir (the default).")
    persistent_volume_claim: NewClaim | None = Field(
        None,
        description="A new PVC `<metadata.name>-model-cache`, owned by (and deleted with) this resource.",
    )
    existing_claim: str | None = Field(None, min_length=1, description="Name of an existing PVC to mount.")


class PodMetricTarget(SpecModel):
    name: str = Field(
        min_length=1,
        description="A per-pod custom metric (via a metrics adapter), e.g. the engine's requests waiting.",
    )
    target_average_value: Quantity = Field(description="Scale so the per-pod average stays near this value.")


class AutoscalingSpec(SpecModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.minReplicas <= self.maxReplicas",
                    "message": "autoscaling.minReplicas must be <= autoscaling.maxReplicas",
                    "reason": "FieldValueInvalid",
                }
            ]
        }
    )
    min_replicas: int = Field(1, ge=1, description="Lower bound of replicas.")
    max_replicas: int = Field(ge=1, description="Upper bound of replicas.")
    target_cpu_utilization_percentage: int | None = Field(
        None,
        ge=1,
        alias="targetCPUUtilizationPercentage",
        description="Average CPU utilization target. Used (at 80) when no metric is given.",
    )
    pod_metric: PodMetricTarget | None = Field(
        None, description="Scale on an engine metric instead of, or as well as, CPU."
    )


class DisruptionBudgetSpec(SpecModel):
    max_unavailable: int | str = Field(
        1,
        description="Pods that voluntary disruptions (drains) may take down at once: a number or a percentage.",
        json_schema_extra={"x-kubernetes-int-or-string": True},
    )


class ModelDeploymentSpec(SpecModel):
    model: ModelSource = Field(description="What to serve and under which name.")
    engine: EngineSpec = defaulted(EngineSpec, "The engine container: image, `kubellm serve` arguments, env.")
    replicas: int = Field(
        1, ge=0, description="Engine pods. Written by `kubectl scale` and the autoscaler (scale subresource)."
    )
    gpu: GpuSpec = defaulted(GpuSpec, "GPUs per pod, their resource name and type.")
    resources: ComputeResources = defaulted(ComputeResources, "CPU and memory of the engine container.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod nodeSelector.")
    tolerations: list[Toleration] = Field(
        default_factory=list,
        description="Pod tolerations, added to the default toleration of taints keyed by gpu.resourceName.",
    )
    affinity: dict[str, Any] | None = Field(
        None, description="Pod affinity (Kubernetes Affinity); gpu.product is added to its node affinity."
    )
    priority_class_name: str | None = Field(None, description="Pod priorityClassName.")
    runtime_class_name: str | None = Field(None, description="Pod runtimeClassName (e.g. nvidia).")
    service: ServiceSpec = defaulted(ServiceSpec, "The Service in front of the engine pods.")
    model_cache: ModelCacheSpec = defaulted(ModelCacheSpec, "Volume for downloaded weights (HF_HOME).")
    shm_size: Quantity = Field("2Gi", description="Size of the memory-backed /dev/shm.")
    startup_timeout_seconds: int = Field(
        1800,
        ge=10,
        description="How long a pod may take to load the model before it is restarted (sizes the startup probe).",
    )
    autoscaling: AutoscalingSpec | None = Field(
        None, description="A HorizontalPodAutoscaler (autoscaling/v2) on this resource's scale subresource."
    )
    disruption_budget: DisruptionBudgetSpec | None = Field(
        None, description="A PodDisruptionBudget for the pods."
    )


class Condition(SpecModel):
    type: str = Field(description="Ready, Progressing or Degraded.")
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(description="One CamelCase word, e.g. Unschedulable.")
    message: str = Field("", description="What a person should know.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="The generation this condition describes.")


class ModelDeploymentStatus(SpecModel):
    phase: Literal["Pending", "Progressing", "Ready", "Degraded", "Failed", "ScaledDown"] = Field(
        "Pending", description="One-word summary of the conditions."
    )
    replicas: int = Field(0, description="Engine pods that exist.")
    ready_replicas: int = Field(0, description="Engine pods that pass their readiness probe.")
    updated_replicas: int = Field(0, description="Engine pods that run the current spec.")
    selector: str = Field("", description="Label selector of the engine pods (for the scale subresource).")
    endpoint: str = Field("", description="OpenAI base URL inside the cluster.")
    served_model_name: str = Field("", description="The `model` name clients use.")
    observed_generation: int = Field(0, description="The metadata.generation this status describes.")
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
