"""The ModelDeployment spec as pydantic models: the one source of its shape, defaults and docs.

The CRD's openAPIV3Schema is generated from these models (see schema.py / crd.py), so every
description and default written here is what `kubectl explain md.spec` shows. Rules that span
fields are CEL rules (`x-kubernetes-validations`) evaluated by the API server.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from engine.config import EngineConfig  # torch-free: the engine's defaults are quoted from it

DEFAULT_ENGINE_IMAGE = "ghcr.io/kubellm/engine:0.1.0"
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"  # set by NVIDIA GPU feature discovery
EMBEDDED_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Default size of an emptyDir model cache: a replica's weights must fit in its GPUs' memory, so one 80 GB
# GPU's worth per GPU holds them (plus compile caches); CPU models are small; the embedded model's GGUF
# and its float32 conversion take about 1 GB.
DEFAULT_CACHE_GI_PER_GPU = 80
DEFAULT_CPU_CACHE_GI = 20
EMBEDDED_CACHE_GI = 4
# /dev/shm: 2Gi for one engine process; NCCL and the tensor-parallel workers' shared memory need more
# per rank.
DEFAULT_SHM_GI = 2
SHM_GI_PER_TP_RANK = 4

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
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description=(
            "--tensor-parallel-size: GPUs that share each layer of the model (one engine process per GPU "
            "in the pod). gpu.count defaults to it; pick the smallest N whose N GPUs hold the weights "
            "plus room for the KV cache (docs/operations.md, Tensor parallelism)."
        ),
    )
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
    quantization: Literal["fp8"] | None = Field(
        None,
        description=(
            "--quantization: fp8 runs the linear layers and the mixture-of-experts experts in FP8 (weights "
            "per output channel, activations per token; GPUs of compute capability 8.9+) from a float "
            "checkpoint; MoE routers and the LM head stay in the model's dtype. Unset: none; FP8 checkpoints "
            "(compressed-tensors, Hugging Face fp8; dense or MoE) run as published without it."
        ),
    )
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3"] | None = Field(
        None,
        description=(
            "--kv-cache-dtype: fp8 (= fp8_e4m3) keeps the KV cache in float8 e4m3 with a scale per layer, "
            "twice the tokens in the same memory. Unset: auto (the model's dtype)."
        ),
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
    count: int | None = Field(
        None,
        ge=0,
        description=(
            "GPUs per pod (limits of `resourceName`). Unset: engine.tensorParallelSize. Otherwise at least "
            "tensorParallelSize and a multiple of it; 0 runs the engine on the CPU."
        ),
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
    size_limit: Quantity | None = Field(
        None,
        description=(
            "Upper bound of the emptyDir's size, also requested as the pod's ephemeral-storage (the node's "
            f"disk). Unset: {DEFAULT_CACHE_GI_PER_GPU}Gi per tensor-parallel GPU (what fits in the GPUs the model "
            f"is split over), {DEFAULT_CPU_CACHE_GI}Gi on the CPU, {EMBEDDED_CACHE_GI}Gi for the embedded model."
        ),
    )


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
        description=(
            "Where the cache is mounted in the engine container. HF_HOME points here, and every other "
            "cache the engine writes (GGUF conversions, Triton and torch compile caches) lives below it, "
            "so a restarted pod reuses them and the root filesystem can stay read-only."
        ),
    )
    empty_dir: EmptyDirCache | None = Field(
        None, description="A scratch emptyDir on the node's disk (the default), sized by sizeLimit."
    )
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


class HpaScalingPolicy(SpecModel):
    type: Literal["Pods", "Percent"] = Field(
        description="Pods: change by at most `value` pods; Percent: by at most `value` percent of the "
        "current count."
    )
    value: int = Field(gt=0, description="How many pods, or what percentage, one period may change.")
    period_seconds: int = Field(
        ge=1, le=1800, description="The window the policy looks back over (1 to 1800 seconds)."
    )


class HpaScalingRules(SpecModel):
    stabilization_window_seconds: int | None = Field(
        None,
        ge=0,
        le=3600,
        description="How far back the autoscaler looks for earlier recommendations before it acts, so a "
        "short dip or spike does not flap the pod count. Unset: Kubernetes' default (0 up, 300 down).",
    )
    select_policy: Literal["Max", "Min", "Disabled"] | None = Field(
        None,
        description="Which policy wins when several allow a change: Max (the largest change, default), Min, "
        "or Disabled (never scale in this direction).",
    )
    policies: list[HpaScalingPolicy] | None = Field(
        None,
        description="How fast the pod count may change (HorizontalPodAutoscaler HPAScalingPolicy).",
        json_schema_extra={"x-kubernetes-list-type": "atomic"},
    )


class ScalingBehavior(SpecModel):
    """autoscaling/v2 HorizontalPodAutoscalerBehavior, passed through as written."""

    scale_up: HpaScalingRules | None = Field(None, description="Rules for adding pods.")
    scale_down: HpaScalingRules | None = Field(None, description="Rules for removing pods.")

    def manifest(self) -> dict[str, Any]:
        """As an HPA's (or KEDA's horizontalPodAutoscalerConfig's) `behavior`."""
        return self.model_dump(by_alias=True, exclude_none=True)


# The engine metrics KEDA mode scales on, by the name the spec uses for them (defaults in keda.py).
KedaMetric = Literal["numRequestsWaiting", "kvCacheUsage", "numRequestsRunning"]
KEDA_SERVER_ADDRESS_MESSAGE = (
    "autoscaling.keda.serverAddress is required with autoscaling.mode keda: the Prometheus server KEDA "
    "queries, e.g. http://prometheus.monitoring.svc:9090"
)
THRESHOLD_PATTERN = r"^[0-9]+(\.[0-9]+)?$"


class KedaSpec(SpecModel):
    server_address: str | None = Field(
        None,
        pattern=r"^https?://\S+$",
        description="URL of the Prometheus server that scrapes the engine pods, which KEDA queries "
        "(e.g. http://prometheus.monitoring.svc:9090). Required with mode keda.",
    )
    metric: KedaMetric = Field(
        "numRequestsWaiting",
        description="The engine metric to scale on: numRequestsWaiting (vllm:num_requests_waiting, requests "
        "queued for a batch slot), kvCacheUsage (vllm:kv_cache_usage_perc, 0..1) or numRequestsRunning "
        "(vllm:num_requests_running). Summed over this resource's pods (labels namespace and model_name); "
        "see query to change that.",
    )
    threshold: str | None = Field(
        None,
        pattern=THRESHOLD_PATTERN,
        description="Target per replica (KEDA's prometheus trigger threshold, metricType AverageValue): "
        "KEDA's HorizontalPodAutoscaler keeps the metric's sum divided by the replicas near it. Unset: 4 "
        "for numRequestsWaiting, 0.8 for kvCacheUsage, 64 for numRequestsRunning.",
    )
    activation_threshold: str | None = Field(
        None,
        pattern=THRESHOLD_PATTERN,
        description="With minReplicas 0: the metric must exceed this for KEDA to wake the first pod "
        "(KEDA's activationThreshold; unset: 0).",
    )
    query: str | None = Field(
        None,
        description='A PromQL query that replaces the default (`sum(<metric>{namespace="<namespace>",'
        'model_name="<served model name>"})`); it must return one value, the total over this resource\'s '
        "pods. Empty: the default.",
    )
    polling_interval: int | None = Field(
        None, ge=1, description="Seconds between KEDA's queries (KEDA's pollingInterval; unset: 30)."
    )
    cooldown_period: int | None = Field(
        None,
        ge=0,
        description="With minReplicas 0: seconds without activity before KEDA scales to zero "
        "(KEDA's cooldownPeriod; unset: 300).",
    )


class AutoscalingSpec(SpecModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.minReplicas <= self.maxReplicas",
                    "message": "autoscaling.minReplicas must be <= autoscaling.maxReplicas",
                    "reason": "FieldValueInvalid",
                },
                {
                    "rule": "self.mode == 'keda' || self.minReplicas >= 1",
                    "message": "autoscaling.minReplicas 0 (scale to zero) needs autoscaling.mode keda: a "
                    "HorizontalPodAutoscaler keeps at least one pod",
                    "fieldPath": ".minReplicas",
                },
                {
                    "rule": "self.mode != 'keda' || (has(self.keda) && has(self.keda.serverAddress))",
                    "message": KEDA_SERVER_ADDRESS_MESSAGE,
                    "fieldPath": ".keda.serverAddress",
                },
                {
                    "rule": "self.mode == 'keda' || !has(self.keda)",
                    "message": "autoscaling.keda is used only with autoscaling.mode keda",
                    "fieldPath": ".keda",
                },
                {
                    "rule": "self.mode != 'keda' || (!has(self.podMetric) && "
                    "!has(self.targetCPUUtilizationPercentage))",
                    "message": "autoscaling.podMetric and autoscaling.targetCPUUtilizationPercentage are for "
                    "mode hpa; with mode keda the trigger is autoscaling.keda.metric (or keda.query)",
                    "fieldPath": ".mode",
                },
            ]
        }
    )
    mode: Literal["hpa", "keda"] = Field(
        "hpa",
        description="hpa: a HorizontalPodAutoscaler (autoscaling/v2) scales the engine Deployment on CPU or "
        "a per-pod custom metric. keda: a KEDA ScaledObject (keda.sh/v1alpha1; KEDA must be installed) "
        "scales this ModelDeployment through its scale subresource on an engine metric queried from "
        "Prometheus (autoscaling.keda).",
    )
    min_replicas: int = Field(
        1, ge=0, description="Lower bound of replicas (0, scale to zero, only with mode keda)."
    )
    max_replicas: int = Field(ge=1, description="Upper bound of replicas.")
    target_cpu_utilization_percentage: int | None = Field(
        None,
        ge=1,
        alias="targetCPUUtilizationPercentage",
        description="Mode hpa: average CPU utilization target. Used (at 80) when no metric is given.",
    )
    pod_metric: PodMetricTarget | None = Field(
        None, description="Mode hpa: scale on an engine metric instead of, or as well as, CPU."
    )
    keda: KedaSpec | None = Field(
        None, description="Mode keda: the Prometheus server, the engine metric and its target per replica."
    )
    behavior: ScalingBehavior | None = Field(
        None,
        description="How fast the pod count may change (autoscaling/v2 behavior: scaleUp/scaleDown with "
        "stabilizationWindowSeconds, selectPolicy, policies), for either mode (with keda it becomes the "
        "ScaledObject's advanced.horizontalPodAutoscalerConfig.behavior).",
    )

    @model_validator(mode="after")
    def _keda_mode_has_a_server(self) -> AutoscalingSpec:
        """The CRD's rules say the same; here so the operator's code can trust a parsed spec."""
        if self.mode == "keda" and (self.keda is None or not self.keda.server_address):
            raise ValueError(KEDA_SERVER_ADDRESS_MESSAGE)
        return self


class DisruptionBudgetSpec(SpecModel):
    max_unavailable: int | str = Field(
        1,
        description="Pods that voluntary disruptions (drains) may take down at once: a number or a percentage.",
        json_schema_extra={"x-kubernetes-int-or-string": True},
    )


class EndpointPickerRef(SpecModel):
    name: str = Field(
        min_length=1,
        description="Service of the endpoint picker (the Gateway API Inference Extension's EPP, e.g. llm-d's) "
        "in the resource's namespace.",
    )
    port: int = Field(
        9002, ge=1, le=65535, description="The picker's port on that Service (its gRPC ext-proc port)."
    )
    failure_mode: Literal["FailOpen", "FailClose"] = Field(
        "FailClose",
        description="What the gateway does when the picker does not answer: FailClose rejects the request, "
        "FailOpen routes it anyway.",
    )


class GatewayRouteSpec(SpecModel):
    gateway_name: str = Field(
        min_length=1, description="The Gateway (gateway.networking.k8s.io) to attach to."
    )
    gateway_namespace: str | None = Field(
        None, description="The Gateway's namespace (default: the resource's)."
    )
    section_name: str | None = Field(
        None, description="One listener of the Gateway (default: all that allow it)."
    )
    path_prefix: str = Field(
        "/", pattern=r"^/", description="Requests under this path go to the InferencePool."
    )


class InferencePoolSpec(SpecModel):
    endpoint_picker_ref: EndpointPickerRef = Field(
        description="The endpoint picker the gateway asks which pod serves each request."
    )
    http_route: GatewayRouteSpec | None = Field(
        None,
        description="Also an HTTPRoute (gateway.networking.k8s.io/v1) from a Gateway to the InferencePool.",
    )


class RouterSpec(SpecModel):
    inference_pool: InferencePoolSpec | None = Field(
        None,
        description="An InferencePool (inference.networking.k8s.io/v1) selecting the engine pods on port 8000, "
        "for Gateway API Inference Extension gateways (needs its CRDs installed).",
    )


class ModelDeploymentSpec(SpecModel):
    model: ModelSource = Field(description="What to serve and under which name.")
    engine: EngineSpec = defaulted(EngineSpec, "The engine container: image, `kubellm serve` arguments, env.")
    replicas: int | None = Field(
        None,
        ge=0,
        description=(
            "Engine pods (unset: 1). Written by `kubectl scale` too (scale subresource). Not allowed with "
            "autoscaling mode hpa, whose HorizontalPodAutoscaler sets the Deployment's pod count; with mode "
            "keda, KEDA writes it (through the scale subresource, which needs it set: unset, the operator "
            "sets it to minReplicas) and the Deployment follows it within minReplicas..maxReplicas."
        ),
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
    shm_size: Quantity | None = Field(
        None,
        description=(
            f"Size of the memory-backed /dev/shm (counts against the pod's memory). Unset: {DEFAULT_SHM_GI}Gi "
            f"with one GPU, {SHM_GI_PER_TP_RANK}Gi per rank with tensor parallelism (NCCL needs it)."
        ),
    )
    pod_security_context: dict[str, Any] | None = Field(
        None,
        description=(
            "Fields of the pod's securityContext (Kubernetes PodSecurityContext) that replace the "
            "operator's defaults, which meet Pod Security `restricted`: runAsNonRoot, runAsUser and "
            "runAsGroup 10001 (the engine image's user), fsGroup 10001, seccompProfile RuntimeDefault."
        ),
    )
    security_context: dict[str, Any] | None = Field(
        None,
        description=(
            "Fields of the engine container's securityContext (Kubernetes SecurityContext) that replace "
            "the operator's defaults: allowPrivilegeEscalation false, capabilities drop ALL, "
            "readOnlyRootFilesystem true (the engine writes only to the model cache and /tmp)."
        ),
    )
    startup_timeout_seconds: int = Field(
        1800,
        ge=10,
        description="How long a pod may take to load the model before it is restarted (sizes the startup probe).",
    )
    autoscaling: AutoscalingSpec | None = Field(
        None,
        description="Scale the engine pods between minReplicas and maxReplicas: with a HorizontalPodAutoscaler "
        "(mode hpa, the default; excludes spec.replicas) or a KEDA ScaledObject on an engine metric from "
        "Prometheus (mode keda).",
    )
    disruption_budget: DisruptionBudgetSpec | None = Field(
        None, description="A PodDisruptionBudget for the pods."
    )
    router: RouterSpec | None = Field(
        None, description="Routing through a Gateway: an InferencePool and optionally an HTTPRoute."
    )

    # Defaults that depend on other fields, resolved once here for the operator and the status.
    @property
    def gpus_per_replica(self) -> int:
        return self.engine.tensor_parallel_size if self.gpu.count is None else self.gpu.count

    @property
    def autoscaler(self) -> Literal["hpa", "keda"] | None:
        """What scales the pods: mode hpa's HorizontalPodAutoscaler, mode keda's ScaledObject, or nothing."""
        return None if self.autoscaling is None else self.autoscaling.mode

    @property
    def fixed_replicas(self) -> int | None:
        """The Deployment's pod count as the operator sets it; None when an HPA scales the Deployment."""
        scaling = self.autoscaling
        if scaling is None:
            return 1 if self.replicas is None else self.replicas
        if scaling.mode == "hpa":
            return None
        # KEDA's HPA scales this resource (spec.replicas, via the scale subresource); the Deployment follows,
        # within bounds (before KEDA's first decision, and if KEDA is missing, at the lower bound).
        wanted = scaling.min_replicas if self.replicas is None else self.replicas
        return min(max(wanted, scaling.min_replicas), scaling.max_replicas)

    @property
    def shm_size_limit(self) -> str:
        if self.shm_size is not None:
            return str(self.shm_size)
        tp = self.engine.tensor_parallel_size
        return f"{DEFAULT_SHM_GI if tp == 1 else SHM_GI_PER_TP_RANK * tp}Gi"

    @property
    def cache_size_limit(self) -> str | None:
        """The emptyDir cache's size; None when the cache is a claim (its size is the claim's)."""
        cache = self.model_cache
        if cache.persistent_volume_claim is not None or cache.existing_claim is not None:
            return None
        if cache.empty_dir is not None and cache.empty_dir.size_limit is not None:
            return str(cache.empty_dir.size_limit)
        if self.model.source is None:
            return f"{EMBEDDED_CACHE_GI}Gi"
        if self.gpus_per_replica == 0:
            return f"{DEFAULT_CPU_CACHE_GI}Gi"
        return f"{DEFAULT_CACHE_GI_PER_GPU * self.engine.tensor_parallel_size}Gi"


# metav1.Condition's own validation (k8s.io/apimachinery/pkg/apis/meta/v1/types.go).
CONDITION_TYPE_PATTERN = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"


class Condition(SpecModel):
    """A metav1.Condition, as `kubectl wait --for=condition=Ready` and other tools expect."""

    type: str = Field(
        max_length=316, pattern=CONDITION_TYPE_PATTERN, description="Ready, Progressing or Degraded."
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=CONDITION_REASON_PATTERN,
        description="One CamelCase word a program can match, e.g. Unschedulable.",
    )
    message: str = Field("", max_length=32768, description="What a person should know.")
    last_transition_time: str = Field(
        description="When status last changed (RFC 3339).", json_schema_extra={"format": "date-time"}
    )
    observed_generation: int | None = Field(
        None, ge=0, description="The metadata.generation this condition describes."
    )


class ModelDeploymentStatus(SpecModel):
    phase: Literal["Pending", "Progressing", "Ready", "Degraded", "Failed", "ScaledDown"] = Field(
        "Pending", description="One-word summary of the conditions."
    )
    desired_replicas: int = Field(
        0, description="Engine pods wanted: spec.replicas, or the autoscaler's current choice."
    )
    replicas: int = Field(0, description="Engine pods that exist.")
    ready_replicas: int = Field(0, description="Engine pods that pass their readiness probe.")
    updated_replicas: int = Field(0, description="Engine pods that run the current spec.")
    ready_of_desired: str = Field("", description="`<ready>/<desired>` pods, as `kubectl get` shows it.")
    gpus_per_replica: int = Field(0, description="GPUs each engine pod holds (0: it runs on the CPU).")
    selector: str = Field("", description="Label selector of the engine pods (for the scale subresource).")
    endpoint: str = Field("", description="OpenAI base URL inside the cluster.")
    served_model_name: str = Field("", description="The `model` name clients use.")
    observed_generation: int = Field(0, description="The metadata.generation this status describes.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Progressing and Degraded, as metav1.Condition.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
