"""Mesh writers: turn per-source-node routing weights into service-mesh objects and read them back.

One interface (:class:`~marl_operator.mesh.writer.MeshWriter`), one module per provider
(``istio``, ``gatewayapi``) and a ``factory`` that picks one by name. Everything here is pure:
it builds and compares plain dicts and never calls the Kubernetes API, so the reconcile loop
decides when to create, patch or restore, and tests need no cluster.

- ``model``: what a writer is given (service, nodes, routes) and its errors;
- ``routing``: fractions to integer weights, and the checks a route table must pass;
- ``naming``: the names the cluster must agree on (subsets, per-node Services, header);
- ``ownership``: marks on managed objects, the user's original spec kept in an annotation;
- ``patching``: JSON merge patches that bring a live object to the desired one, or back.
"""
