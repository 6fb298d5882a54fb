"""kubellm's Kubernetes operator: turns a ModelDeployment into engine pods and a Service.

The code lives in the repository's `operator/` folder but is imported as `kubellm_operator`,
because the standard library owns the name `operator`.
"""
