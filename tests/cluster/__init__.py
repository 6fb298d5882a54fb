"""A real Kubernetes control plane on loopback for tests: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and KWOK fake GPU nodes, built from source once (build.sh) and started per test session
(localcluster.LocalCluster) or by hand (`make cluster-up` / `make cluster-down`)."""
