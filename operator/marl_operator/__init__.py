"""marl-operator's in-cluster half: it runs trained routing policies for edge services and writes
the weights they choose to the service mesh.

The package lives under ``operator/`` without that folder being a package itself, because
``operator`` is a standard-library module.
"""
