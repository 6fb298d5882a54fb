"""Desired children: the minimal sample gives exactly the documented objects, and every spec field
lands where it should (no cluster needed: desired_children is a pure function)."""

from typing import Any

import pytest
import yaml

from kubellm_operator.desired import Owner, desired_children
from kubellm_operator.spec import ModelDeploymentSpec
from tests.operator.samples import sample_spec

OWNER = Owner(name="vllm", namespace="default", uid="uid-1")

LABELS = """
app.kubernetes.io/name: kubellm
app.kubernetes.io/instance: vllm
app.kubernetes.io/component: engine
app.kubernetes.io/managed-by: kubellm-operator
app.kubernetes.io/part-of: kubellm
"""
OWNER_REFS = """
- {apiVersion: kubellm.io/v1alpha1, kind: ModelDeployment, name: vllm, uid: uid-1, controller: true, blockOwnerDeletion: true}
"""
SELECTOR = {
    "app.kubernetes.io/name": "kubellm",
    "app.kubernetes.io/instance": "vllm",
    "app.kubernetes.io/component": "engine",
}

EXPECTED_DEPLOYMENT = yaml.safe_load(
    f"""
apiVersion: apps/v1
kind: Deployment
metadata:
  name: vllm
  namespace: default
  labels: {yaml.safe_load(LABELS)}
  ownerReferences: {yaml.safe_load(OWNER_REFS)}
spec:
  replicas: 1
  selector: {{matchLabels: {SELECTOR}}}
  progressDeadlineSeconds: 1920
  strategy: {{type: RollingUpdate, rollingUpdate: {{maxSurge: 0, maxUnavailable: 1}}}}
  template:
    metadata: {{labels: {yaml.safe_load(LABELS)}}}
    spec:
      enableServiceLinks: false
      automountServiceAccountToken: false
      securityContext:
        runAsNonRoot: true
        runAsUser: 10001
        runAsGroup: 10001
        fsGroup: 10001
        fsGroupChangePolicy: OnRootMismatch
        seccompProfile: {{type: RuntimeDefault}}
      terminationGracePeriodSeconds: 45
      containers:
      - name: engine
        image: ghcr.io/kubellm/engine:0.1.0
        imagePullPolicy: IfNotPresent
        command: [kubellm, serve]
        args: [--host, 0.0.0.0, --port, "8000", --model, "hf://meta-llama/Llama-3.2-3B-Instruct",
               --served-model-name, meta-llama/Llama-3.2-3B-Instruct, --device, cuda]
        env:
        - {{name: HF_HOME, value: /model-cache}}
        - {{name: KUBELLM_CACHE_DIR, value: /model-cache/kubellm}}
        - {{name: TRITON_CACHE_DIR, value: /model-cache/triton}}
        - {{name: TORCHINDUCTOR_CACHE_DIR, value: /model-cache/torchinductor}}
        - {{name: CUDA_CACHE_PATH, value: /model-cache/nv-compute-cache}}
        - {{name: XDG_CACHE_HOME, value: /model-cache/xdg}}
        ports: [{{name: http, containerPort: 8000, protocol: TCP}}]
        resources:
          requests: {{ephemeral-storage: 83968Mi, nvidia.com/gpu: "1"}}
          limits: {{nvidia.com/gpu: "1"}}
        lifecycle: {{preStop: {{sleep: {{seconds: 5}}}}}}
        terminationMessagePolicy: FallbackToLogsOnError
        securityContext:
          allowPrivilegeEscalation: false
          capabilities: {{drop: [ALL]}}
          readOnlyRootFilesystem: true
        volumeMounts:
        - {{name: dshm, mountPath: /dev/shm}}
        - {{name: tmp, mountPath: /tmp}}
        - {{name: model-cache, mountPath: /model-cache}}
        startupProbe:
          httpGet: {{path: /health, port: http}}
          periodSeconds: 10
          timeoutSeconds: 5
          failureThreshold: 180
        readinessProbe:
          httpGet: {{path: /health, port: http}}
          periodSeconds: 5
          timeoutSeconds: 5
          failureThreshold: 3
        livenessProbe:
          httpGet: {{path: /health, port: http}}
          periodSeconds: 15
          timeoutSeconds: 10
          failureThreshold: 3
      volumes:
      - {{name: dshm, emptyDir: {{medium: Memory, sizeLimit: 2Gi}}}}
      - {{name: tmp, emptyDir: {{sizeLimit: 2Gi}}}}
      - {{name: model-cache, emptyDir: {{sizeLimit: 80Gi}}}}
      tolerations:
      - {{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}}
"""
)

EXPECTED_SERVICE = yaml.safe_load(
    f"""
apiVersion: v1
kind: Service
metadata:
  name: vllm-service
  namespace: default
  labels: {yaml.safe_load(LABELS)}
  ownerReferences: {yaml.safe_load(OWNER_REFS)}
spec:
  type: ClusterIP
  selector: {SELECTOR}
  ports:
  - {{name: http, port: 8000, targetPort: http, protocol: TCP}}
"""
)


def children(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["kind"]: c for c in desired_children(OWNER, ModelDeploymentSpec.model_validate(spec))}


def pod_of(spec: dict[str, Any]) -> dict[str, Any]:
    return children(spec)["Deployment"]["spec"]["template"]["spec"]


def container_of(spec: dict[str, Any]) -> dict[str, Any]:
    return pod_of(spec)["containers"][0]


MINIMAL = {"model": {"source": "hf://meta-llama/Llama-3.2-3B-Instruct"}}


def test_minimal_sample_gives_exactly_a_deployment_and_a_service() -> None:
    assert desired_children(OWNER, sample_spec("vllm.yaml")) == [EXPECTED_DEPLOYMENT, EXPECTED_SERVICE]


def test_cpu_sample_has_no_gpu_and_serves_the_embedded_model() -> None:
    owner = Owner("smollm2", "demo", "uid-2")
    deployment, service = desired_children(owner, sample_spec("cpu-smollm2.yaml"))
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert "--model" not in container["args"]
    assert container["args"][container["args"].index("--device") + 1] == "cpu"
    assert container["args"][container["args"].index("--served-model-name") + 1] == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert container["resources"] == {
        "requests": {"ephemeral-storage": "6144Mi", "cpu": "2", "memory": "4Gi"},  # 4Gi cache + 2Gi /tmp
        "limits": {"memory": "4Gi"},
    }
    assert "tolerations" not in pod
    assert service["metadata"]["name"] == "smollm2-service"


def test_every_child_is_owned_and_labelled() -> None:
    spec = {
        **MINIMAL,
        "modelCache": {"persistentVolumeClaim": {"size": "50Gi"}},
        "autoscaling": {"maxReplicas": 3, "podMetric": {"name": "m", "targetAverageValue": 2}},
        "disruptionBudget": {},
    }
    all_children = desired_children(OWNER, ModelDeploymentSpec.model_validate(spec))
    assert [c["kind"] for c in all_children] == [
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    ]
    for child in all_children:
        assert child["metadata"]["ownerReferences"] == yaml.safe_load(OWNER_REFS)
        assert child["metadata"]["labels"] == yaml.safe_load(LABELS)
        assert child["metadata"]["namespace"] == "default"


def test_gpus_count_resource_name_and_toleration_follow_the_spec() -> None:
    container = container_of({**MINIMAL, "gpu": {"count": 4, "resourceName": "amd.com/gpu"}})
    assert container["resources"]["limits"] == {"amd.com/gpu": "4"}
    pod = pod_of({**MINIMAL, "gpu": {"count": 4, "resourceName": "amd.com/gpu"}})
    assert pod["tolerations"] == [{"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_cpu_and_memory_are_requests_and_memory_is_also_a_limit() -> None:
    container = container_of({**MINIMAL, "resources": {"cpu": 8, "memory": "64Gi"}})
    assert container["resources"] == {
        "requests": {"ephemeral-storage": "83968Mi", "cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"},
        "limits": {"memory": "64Gi", "nvidia.com/gpu": "1"},
    }


def test_gpu_product_joins_every_node_selector_term_of_the_users_affinity() -> None:
    user_affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]},
                ]
            }
        },
        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []},
    }
    spec = {**MINIMAL, "gpu": {"product": "NVIDIA-H100-80GB-HBM3"}, "affinity": user_affinity}
    affinity = pod_of(spec)["affinity"]
    product = {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3"]}
    terms = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert [t["matchExpressions"][-1] for t in terms] == [product, product]
    assert [t["matchExpressions"][0]["values"] for t in terms] == [["a"], ["b"]]
    assert affinity["podAntiAffinity"] == user_affinity["podAntiAffinity"]
    # the user's object is not modified in place
    assert (
        len(
            user_affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
                "nodeSelectorTerms"
            ][0]["matchExpressions"]
        )
        == 1
    )


def test_gpu_product_without_user_affinity() -> None:
    affinity = pod_of({**MINIMAL, "gpu": {"product": "NVIDIA-A100-SXM4-80GB"}})["affinity"]
    assert affinity == {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {
                                "key": "nvidia.com/gpu.product",
                                "operator": "In",
                                "values": ["NVIDIA-A100-SXM4-80GB"],
                            }
                        ]
                    }
                ]
            }
        }
    }


def test_scheduling_fields_land_on_the_pod() -> None:
    spec = {
        **MINIMAL,
        "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoExecute"}],
        "priorityClassName": "high",
        "runtimeClassName": "nvidia",
    }
    pod = pod_of(spec)
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoExecute"},
    ]
    assert pod["priorityClassName"] == "high"
    assert pod["runtimeClassName"] == "nvidia"


def test_service_name_type_and_port_override() -> None:
    service = children({**MINIMAL, "service": {"name": "llama", "type": "LoadBalancer", "port": 80}})[
        "Service"
    ]
    assert service["metadata"]["name"] == "llama"
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]


@pytest.mark.parametrize(
    ("cache", "volume"),
    [
        ({}, {"emptyDir": {"sizeLimit": "80Gi"}}),
        ({"emptyDir": {"sizeLimit": "20Gi"}}, {"emptyDir": {"sizeLimit": "20Gi"}}),
        ({"existingClaim": "weights"}, {"persistentVolumeClaim": {"claimName": "weights"}}),
        (
            {"persistentVolumeClaim": {"size": "100Gi"}},
            {"persistentVolumeClaim": {"claimName": "vllm-model-cache"}},
        ),
    ],
)
def test_model_cache_volume(cache: dict[str, Any], volume: dict[str, Any]) -> None:
    pod = pod_of({**MINIMAL, "modelCache": cache})
    assert pod["volumes"][2] == {"name": "model-cache", **volume}


def test_new_cache_claim_size_class_and_access_modes() -> None:
    cache = {
        "persistentVolumeClaim": {
            "size": "100Gi",
            "storageClassName": "fast",
            "accessModes": ["ReadWriteMany"],
        }
    }
    claim = children({**MINIMAL, "modelCache": cache})["PersistentVolumeClaim"]
    assert claim["metadata"]["name"] == "vllm-model-cache"
    assert claim["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "100Gi"}},
        "storageClassName": "fast",
    }


def test_cache_mount_path_is_hf_home() -> None:
    container = container_of({**MINIMAL, "modelCache": {"mountPath": "/cache"}})
    assert {"name": "model-cache", "mountPath": "/cache"} in container["volumeMounts"]
    assert {"name": "HF_HOME", "value": "/cache"} in container["env"]


def test_shm_size() -> None:
    pod = pod_of({**MINIMAL, "shmSize": "16Gi"})
    assert pod["volumes"][0] == {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}


@pytest.mark.parametrize(("timeout", "failures"), [(600, 60), (605, 61), (10, 1)])
def test_startup_probe_covers_the_startup_timeout(timeout: int, failures: int) -> None:
    probe = container_of({**MINIMAL, "startupTimeoutSeconds": timeout})["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= timeout
    assert probe["failureThreshold"] == failures


def test_volumes_are_writable_by_the_engine_images_group() -> None:
    """A fresh PVC's root belongs to root; fsGroup makes the kubelet hand it to the image's user 10001."""
    pod = pod_of({**MINIMAL, "modelCache": {"persistentVolumeClaim": {"size": "50Gi"}}})
    assert pod["securityContext"]["fsGroup"] == 10001


@pytest.mark.parametrize(
    ("spec", "rolling_update"),
    [
        (MINIMAL, {"maxSurge": 0, "maxUnavailable": 1}),  # a GPU pod: no spare GPU to surge onto
        (
            {**MINIMAL, "gpu": {"count": 0}, "modelCache": {"persistentVolumeClaim": {"size": "5Gi"}}},
            {"maxSurge": 0, "maxUnavailable": 1},  # ReadWriteOnce: a second pod elsewhere can't mount it
        ),
        (
            {**MINIMAL, "gpu": {"count": 0}, "modelCache": {"existingClaim": "weights"}},
            {"maxSurge": 0, "maxUnavailable": 1},
        ),
        (
            {
                **MINIMAL,
                "gpu": {"count": 0},
                "modelCache": {"persistentVolumeClaim": {"size": "5Gi", "accessModes": ["ReadWriteMany"]}},
            },
            {"maxSurge": "25%", "maxUnavailable": "25%"},
        ),
        ({**MINIMAL, "gpu": {"count": 0}}, {"maxSurge": "25%", "maxUnavailable": "25%"}),
    ],
)
def test_rollout_surges_only_where_a_surge_pod_can_start(
    spec: dict[str, Any], rolling_update: dict[str, Any]
) -> None:
    strategy = children(spec)["Deployment"]["spec"]["strategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": rolling_update}


@pytest.mark.parametrize(
    ("extra_args", "grace"),
    [([], 45), (["--shutdown-timeout", "120"], 135), (["--shutdown-timeout=7.5"], 23)],
)
def test_termination_grace_outlasts_the_engines_drain(extra_args: list[str], grace: int) -> None:
    pod = pod_of({**MINIMAL, "engine": {"extraArgs": extra_args}})
    assert pod["terminationGracePeriodSeconds"] == grace


def test_engine_image_and_pull_policy() -> None:
    container = container_of(
        {**MINIMAL, "engine": {"image": "registry.local/engine:dev", "imagePullPolicy": "Always"}}
    )
    assert (container["image"], container["imagePullPolicy"]) == ("registry.local/engine:dev", "Always")


def test_replicas() -> None:
    assert children({**MINIMAL, "replicas": 3})["Deployment"]["spec"]["replicas"] == 3


def test_replicas_default_to_one() -> None:
    assert children(MINIMAL)["Deployment"]["spec"]["replicas"] == 1


def test_cpu_autoscaler_scales_the_deployment_whose_replicas_the_operator_leaves_alone() -> None:
    spec = {**MINIMAL, "resources": {"cpu": 4}, "autoscaling": {"minReplicas": 2, "maxReplicas": 5}}
    hpa = children(spec)["HorizontalPodAutoscaler"]
    # Applying a replica count would fight the autoscaler's on every reconcile.
    assert "replicas" not in children(spec)["Deployment"]["spec"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"] == {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "vllm"},
        "minReplicas": 2,
        "maxReplicas": 5,
        "metrics": [
            {
                "type": "Resource",
                "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}},
            }
        ],
    }


def test_engine_metric_autoscaler() -> None:
    scaling = {
        "maxReplicas": 4,
        "podMetric": {"name": "vllm_num_requests_waiting", "targetAverageValue": "5"},
    }
    hpa = children({**MINIMAL, "autoscaling": scaling})["HorizontalPodAutoscaler"]
    assert hpa["spec"]["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "vllm_num_requests_waiting"},
                "target": {"type": "AverageValue", "averageValue": "5"},
            },
        }
    ]


def test_disruption_budget() -> None:
    pdb = children({**MINIMAL, "disruptionBudget": {"maxUnavailable": "50%"}})["PodDisruptionBudget"]
    assert pdb["spec"] == {"maxUnavailable": "50%", "selector": {"matchLabels": SELECTOR}}


def test_gpu_autoscaled_sample_has_every_optional_child() -> None:
    kinds = [c["kind"] for c in desired_children(OWNER, sample_spec("gpu-autoscaled.yaml"))]
    assert kinds == [
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    ]


# --- Pod Security, caches and disk (issue 16) ---------------------------------------------------------


def test_pods_meet_pod_security_restricted_by_default() -> None:
    pod = pod_of(MINIMAL)
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (10001, 10001)
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["containers"][0]["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
    }


def test_security_contexts_are_overridable_field_by_field() -> None:
    pod = pod_of(
        {
            **MINIMAL,
            "podSecurityContext": {"runAsUser": 2000, "supplementalGroups": [44]},
            "securityContext": {"readOnlyRootFilesystem": False, "capabilities": {"add": ["IPC_LOCK"]}},
        }
    )
    assert pod["securityContext"]["runAsUser"] == 2000 and pod["securityContext"]["supplementalGroups"] == [
        44
    ]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}  # the rest stays
    container = pod["containers"][0]["securityContext"]
    assert container["readOnlyRootFilesystem"] is False
    assert container["capabilities"] == {"add": ["IPC_LOCK"]}
    assert container["allowPrivilegeEscalation"] is False


def test_every_engine_cache_lives_on_the_cache_volume_and_tmp_is_an_empty_dir() -> None:
    container = container_of({**MINIMAL, "modelCache": {"mountPath": "/weights"}})
    env = {var["name"]: var["value"] for var in container["env"]}
    assert env["HF_HOME"] == "/weights"
    for name in ("KUBELLM_CACHE_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "CUDA_CACHE_PATH"):
        assert env[name].startswith("/weights/"), name
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts == {"/dev/shm": "dshm", "/tmp": "tmp", "/weights": "model-cache"}
    tmp = next(v for v in pod_of(MINIMAL)["volumes"] if v["name"] == "tmp")
    assert tmp == {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}}


@pytest.mark.parametrize(
    ("spec", "cache_limit", "ephemeral"),
    [
        (MINIMAL, "80Gi", "83968Mi"),  # one GPU: its memory's worth of weights, + 2Gi /tmp
        ({**MINIMAL, "engine": {"tensorParallelSize": 4}}, "320Gi", "329728Mi"),
        ({**MINIMAL, "gpu": {"count": 0}}, "20Gi", "22528Mi"),
        ({"model": {}, "gpu": {"count": 0}}, "4Gi", "6144Mi"),  # the embedded model
        ({**MINIMAL, "modelCache": {"emptyDir": {"sizeLimit": "500G"}}}, "500G", "478886Mi"),
        ({**MINIMAL, "modelCache": {"existingClaim": "weights"}}, None, "2048Mi"),
    ],
)
def test_emptydir_cache_is_bounded_and_its_disk_requested(
    spec: dict[str, Any], cache_limit: str | None, ephemeral: str
) -> None:
    pod = pod_of(spec)
    cache = next(v for v in pod["volumes"] if v["name"] == "model-cache")
    assert cache.get("emptyDir", {}).get("sizeLimit") == cache_limit
    assert pod["containers"][0]["resources"]["requests"]["ephemeral-storage"] == ephemeral


# --- tensor parallelism (issue 11) -------------------------------------------------------------------


def test_tensor_parallel_size_sets_the_flag_the_gpus_and_a_bigger_shm() -> None:
    pod = pod_of({**MINIMAL, "engine": {"tensorParallelSize": 4}})
    container = pod["containers"][0]
    args = container["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "4"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "4"
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}


def test_one_gpu_has_no_tensor_parallel_flag_and_2gi_shm() -> None:
    pod = pod_of(MINIMAL)
    assert "--tensor-parallel-size" not in pod["containers"][0]["args"]
    assert next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"] == "2Gi"


def test_explicit_gpu_count_and_shm_win_over_the_tensor_parallel_defaults() -> None:
    spec = {**MINIMAL, "engine": {"tensorParallelSize": 2}, "gpu": {"count": 4}, "shmSize": "1Gi"}
    pod = pod_of(spec)
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"] == "1Gi"


def test_tensor_parallel_on_the_cpu() -> None:
    container = container_of({**MINIMAL, "engine": {"tensorParallelSize": 2}, "gpu": {"count": 0}})
    args = container["args"]
    assert args[args.index("--device") + 1] == "cpu"
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert "nvidia.com/gpu" not in container["resources"]["requests"]
