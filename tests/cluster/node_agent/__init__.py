"""A node agent standing in for the kubelet on one CPU node of the local control plane: it runs the pods
bound to that node as local processes (see tests/cluster/README.md). Test infrastructure only."""
