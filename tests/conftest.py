"""Shared fixtures: bundled scenarios are loaded once per session (they are immutable)."""

import pytest

from simulator.scenario import load_scenario


@pytest.fixture(scope="session")
def paise():
    return load_scenario("dfaas-paise25")


@pytest.fixture(scope="session")
def mesh():
    return load_scenario("mesh-10x3")


@pytest.fixture()
def apiserver(tmp_path):
    """An emulated Kubernetes API server (``demo.apiserver``) in a thread of its own, for
    synchronous clients (kubectl, the ``kubernetes`` client): ``.url``, ``.kubeconfig`` (a file
    pointing at it) and ``.api`` (the ApiServer, to inspect its objects). A fresh one per test,
    with the Nodes of the kind cluster ``kind-config.yaml`` describes, Ready, and the demo
    workload's Service and pods, ready."""
    from types import SimpleNamespace

    from demo.apiserver import ApiServer, serve_in_thread, write_kubeconfig
    from demo.cluster import kind_nodes, workload_objects

    api = ApiServer()
    api.register(kind_nodes())
    api.register(workload_objects())
    with serve_in_thread(api) as url:
        kubeconfig = write_kubeconfig(url, tmp_path / "kubeconfig")
        yield SimpleNamespace(url=url, kubeconfig=kubeconfig, api=api)
