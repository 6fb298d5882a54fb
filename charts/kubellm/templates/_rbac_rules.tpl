{{/*
The least rights the operator needs inside a namespace it serves, each rule with its reason.
Granted cluster-wide by a ClusterRole when the operator watches every namespace, or by a Role in
each of operator.watchNamespaces otherwise. Nothing here allows reading Secrets: the HF token is
passed to engine pods by reference (secretKeyRef), which needs no right of the operator's.
*/}}
{{- define "kubellm.rbac.namespacedRules" -}}
# ModelDeployments: watch them; patch them for kopf's progress annotations (and, in autoscaling mode keda,
# to give spec.replicas its first value, which KEDA then owns through the scale subresource).
# No create/delete/update: users own these objects, the operator only reconciles them.
- apiGroups: [kubellm.io]
  resources: [modeldeployments]
  verbs: [get, list, watch, patch]
# Children's owner references set blockOwnerDeletion, which OwnerReferencesPermissionEnforcement
# (on by default in OpenShift) allows only to whoever may update the owner's finalizers. The
# operator never adds a finalizer: this is the right to block deletion until children are gone.
- apiGroups: [kubellm.io]
  resources: [modeldeployments/finalizers]
  verbs: [update]
# Their status subresource: phase, replicas, endpoint and conditions, written by merge patch.
- apiGroups: [kubellm.io]
  resources: [modeldeployments/status]
  verbs: [get, patch]
# The children of a ModelDeployment, written by server-side apply (apply creates missing objects,
# so create+patch), watched to put back hand-made drift, deleted when the spec stops asking for
# one (e.g. autoscaling turned off removes the HPA). Owner references let the garbage collector
# remove them all when the ModelDeployment goes, so that needs no right here.
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [services, persistentvolumeclaims]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, delete]
# spec.router: an InferencePool (Gateway API Inference Extension) and an HTTPRoute (Gateway API), when
# their CRDs are installed.
- apiGroups: [inference.networking.k8s.io]
  resources: [inferencepools]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [gateway.networking.k8s.io]
  resources: [httproutes]
  verbs: [get, list, watch, create, patch, delete]
# spec.autoscaling.mode keda: a KEDA ScaledObject, when KEDA is installed. KEDA's own HorizontalPodAutoscaler
# then scales the ModelDeployment through its scale subresource (KEDA's role grants it */scale).
- apiGroups: [keda.sh]
  resources: [scaledobjects]
  verbs: [get, list, watch, create, patch, delete]
# Read-only, for status: the engine pods' readiness, pods the scheduler cannot place (condition
# PodScheduled=False, reason Unschedulable, with the scheduler's message) and stuck containers
# (CrashLoopBackOff, ImagePullBackOff). Pods are made by the Deployment, never by the operator.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
# kopf posts Kubernetes events about handler errors on the ModelDeployment (core v1 events, POST only;
# the operator reads pod conditions, not events, so no read access).
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}

{{/* Namespaced kopf peering: the replicas of an operator watching a namespace list agree on one leader. */}}
{{- define "kubellm.rbac.namespacedPeeringRules" -}}
# kopf peering (leader election between operator replicas) in each served namespace: the operator
# creates its peering object on start if missing, then every replica patches keep-alives into it.
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, create, patch]
{{- end }}

{{/* What kopf needs at cluster scope in either mode. */}}
{{- define "kubellm.rbac.clusterScopedRules" -}}
# kopf's resource discovery: notices the ModelDeployment CRD being installed, upgraded or removed
# while the operator runs. Read-only.
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- end }}
