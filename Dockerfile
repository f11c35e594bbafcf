# The marl-operator image: `python -m marl_operator` with the bundled default checkpoints.
#
#   docker build -t marl-operator:0.1.0 .
#   docker run --rm --network host --user "$(id -u):$(id -g)" \
#       -v ~/.kube/config:/kube/config:ro marl-operator:0.1.0 --kubeconfig /kube/config --standalone
#   (your user, to read your 0600 kubeconfig; the host's network, to reach a 127.0.0.1 API
#   server such as kind's; in the cluster it runs as uid 10001, installed by the Helm chart)
#
# Multi-stage, and every package installed checked against a hash: the build stage makes two
# virtualenvs. /opt/tools holds the build tools (pip, setuptools) from their lock
# requirements/build.txt; /opt/venv, made without pip, receives from that pip the operator's
# dependencies, from their lock requirements/operator.txt (the versions the tests run on;
# `make lock` writes both), and the package's wheel, built by the locked setuptools instead of
# whatever a build-isolation environment would fetch. The runtime stage copies /opt/venv
# alone onto a clean slim Python, whose own pip and setuptools it removes (image scanners
# flag them, and nothing runs them), so no installer or build tool ships, and runs it as a
# non-root user. Training, the simulator's tools and the demo are extras of the package
# ([train], [demo]) and stay out, torch with them: the operator reads the checkpoints without
# it (policies/tensor_archive.py) and acts in numpy (policies/actor.py).
# The image works with a read-only root filesystem as long as /tmp is writable (the chart
# mounts an emptyDir there): HOME and TMPDIR point at it.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY requirements/build.txt requirements/operator.txt /tmp/requirements/
RUN python -m venv /opt/tools \
    && /opt/tools/bin/pip install --require-hashes --no-deps -r /tmp/requirements/build.txt \
    && python -m venv --without-pip /opt/venv
# The dependencies first, from the lock alone, so that a source change reuses this layer.
RUN /opt/tools/bin/pip --python /opt/venv/bin/python install --require-hashes --no-deps \
        -r /tmp/requirements/operator.txt
# Then the package; the checkpoints under policies/checkpoints/ are package data. Its wheel
# installs with --no-deps: the lock holds every dependency, which `pip check` confirms. The
# checks, run from / so that they import the installed wheel and not the sources in /src:
# neither torch nor an installer is in the virtualenv, the operator's command line starts
# and the bundled checkpoints load.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY policies/ policies/
COPY simulator/ simulator/
COPY operator/ operator/
RUN /opt/tools/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/wheels . \
    && /opt/tools/bin/pip --python /opt/venv/bin/python install --no-deps /tmp/wheels/*.whl \
    && /opt/tools/bin/pip --python /opt/venv/bin/python check \
    && cd / \
    && /opt/venv/bin/python -c "import importlib.util as u; left = [m for m in ('torch', 'pip', 'setuptools') if u.find_spec(m)]; assert not left, left" \
    && /opt/venv/bin/python -m marl_operator --help > /dev/null \
    && /opt/venv/bin/python -c "from policies import checkpoint; [checkpoint.load(checkpoint.BUNDLED / n) for n in ('mesh-10x3', 'dfaas-paise25')]"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="marl-operator" \
      org.opencontainers.image.description="Multi-agent RL routing policies for edge service meshes, run as a Kubernetes operator" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN python -m pip uninstall --yes --quiet --root-user-action=ignore pip setuptools wheel \
    && python -c "import importlib.util as u; left = [m for m in ('pip', 'setuptools', 'wheel') if u.find_spec(m)]; assert not left, left" \
    && groupadd --system --gid 10001 marl \
    && useradd --system --uid 10001 --gid marl --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin marl
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    TMPDIR=/tmp
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
# The HTTP API's liveness probe (the port of --api-port, 8080 unless changed).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
ENTRYPOINT ["python", "-m", "marl_operator"]
CMD []
