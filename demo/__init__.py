"""The embedded demo, for people without a cluster: an emulated Kubernetes API server, a simulated
mesh data plane, a real Prometheus and the operator, all on this machine. The operator's tests use
the same emulated API server, so what the demo shows is what the tests check."""

from policies.extras import require_extra

require_extra("demo", "marl-operator's demo")
