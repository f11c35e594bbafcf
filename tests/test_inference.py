"""Acting without torch: the numpy policy matches torch's ActorCritic.act, the weights reader
refuses anything but plain tensors without running it, and the operator never imports torch."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from policies import checkpoint
from policies.network import ActorCritic
from policies.tensor_archive import ArchiveError, load_state_dict

TESTS = Path(__file__).resolve().parent
BUNDLED = ["dfaas-paise25", "mesh-10x3"]


def observations(model: ActorCritic, shape: tuple[int, ...], rng: np.random.Generator):
    """Raw observations around the model's running mean, about a tenth beyond the clip."""
    mean = model.obs_norm.mean.numpy()
    std = np.sqrt(model.obs_norm.var.numpy())
    return mean + std * rng.normal(scale=6.0, size=(*shape, model.obs_dim))


def random_mask(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """About 40% of entries masked, at least one valid entry per row."""
    mask = rng.random(shape) < 0.6
    rows = np.argwhere(~mask.any(-1))
    mask[(*rows.T, rng.integers(0, shape[-1], len(rows)))] = True
    return mask


def torch_act(model: ActorCritic, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    o = torch.as_tensor(obs, dtype=torch.float32)
    m = torch.as_tensor(np.broadcast_to(mask, (*obs.shape[:-1], mask.shape[-1])).copy())
    return model.act(o, m).numpy().astype(np.float64)


def assert_matches_torch(policy, model: ActorCritic, seed: int) -> None:
    rng = np.random.default_rng(seed)
    agents, k = 10, model.action_dim
    obs = observations(model, (17, agents), rng)
    for mask in (random_mask((agents, k), rng), random_mask((17, agents, k), rng)):
        assert (~mask).sum() > 0.2 * mask.size  # masked entries are exercised
        ours, theirs = policy(obs, mask), torch_act(model, obs, mask)
        assert ours.dtype == np.float64 and ours.shape == (17, agents, k)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
        assert (ours[..., ~mask] == 0).all()
        np.testing.assert_allclose(ours.sum(-1), 1.0, atol=1e-6)
    # A comparison of near-uniform outputs would prove little: the weights must vary.
    assert ours[..., mask].std() > 0.02


def randomised(obs_dim: int, action_dim: int, hidden: int, layers: int, critic: str, seed: int):
    """A freshly initialised ActorCritic with every actor weight and the normaliser at random
    scales (the orthogonal init's 0.01 head alone would give near-uniform actions)."""
    torch.manual_seed(seed)
    model = ActorCritic(obs_dim, action_dim, hidden, layers, critic)
    with torch.no_grad():
        for p in model.actor.parameters():
            p.normal_(0.0, 1.5 / math.sqrt(p.shape[-1]))
        model.obs_norm.mean.normal_(0.0, 50.0)
        model.obs_norm.var.uniform_(0.01, 400.0)
    return model.eval()


# -- the numpy policy against torch --------------------------------------------------------


@pytest.mark.parametrize("name", BUNDLED)
def test_numpy_policy_matches_torch_on_the_bundled_checkpoints(name):
    directory = checkpoint.BUNDLED / name
    policy = checkpoint.load(directory)
    model = checkpoint.load_module(directory)
    assert_matches_torch(policy, model, seed=1)
    # From the live module, the same numbers as from the file.
    obs = observations(model, (3, 10), np.random.default_rng(2))
    mask = random_mask((10, model.action_dim), np.random.default_rng(3))
    live = checkpoint.LoadedPolicy.from_module(model)
    np.testing.assert_array_equal(live(obs, mask), policy(obs, mask))


@pytest.mark.parametrize(
    ("hidden", "layers", "critic"), [(64, 2, "mappo"), (16, 1, "ippo"), (32, 3, "mappo")]
)
def test_numpy_policy_matches_torch_on_a_random_saved_network(tmp_path, hidden, layers, critic):
    model = randomised(24, 5, hidden, layers, critic, seed=hidden + layers)
    checkpoint.save(tmp_path, model, {"scenario": "test"})
    policy = checkpoint.load(tmp_path)
    assert policy.meta["network"]["layers"] == layers and policy.path == tmp_path
    assert_matches_torch(policy, model, seed=layers)
    assert_matches_torch(checkpoint.LoadedPolicy.from_module(model), model, seed=7)
    again = checkpoint.load_module(tmp_path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value)


def test_extremes_match_torch_huge_logits_and_a_fully_masked_row():
    model = randomised(6, 3, 8, 1, "ippo", seed=0)
    with torch.no_grad():
        model.actor[-1].bias[0] = 200.0  # softplus's linear branch; e^200 overflows float32
        model.actor[-1].bias[1] = 15.0
    policy = checkpoint.LoadedPolicy.from_module(model)
    obs = observations(model, (3,), np.random.default_rng(0))
    mask = np.array([[True, False, True], [False, True, True], [False, False, False]])
    ours, theirs = policy(obs, mask), torch_act(model, obs, mask)
    np.testing.assert_allclose(ours[:2], theirs[:2], rtol=0, atol=1e-6)
    assert ours[0, 0] > 0.95 and ours[1, 1] > 0.7  # the large logits do dominate
    assert np.isnan(ours[2]).all() and np.isnan(theirs[2]).all()  # no distribution: NaN


def test_a_feature_constant_in_training_is_centred_not_scaled():
    """A neighbour slot that was always present in training has a running variance of
    about 1e-11: scaled by it, the slot's absence (a neighbour failed) hit the clip, -10,
    through weights that never learned from the feature. Centred alone, it moves by 1."""
    model = randomised(6, 3, 8, 1, "ippo", seed=0)
    with torch.no_grad():
        model.obs_norm.var[2] = 2e-11
    obs = observations(model, (4,), np.random.default_rng(0))
    obs[:, 2] = float(model.obs_norm.mean[2]) - 1.0
    z = model.obs_norm(torch.as_tensor(obs, dtype=torch.float32))
    assert z[:, 2].tolist() == pytest.approx([-1.0] * 4)
    assert (z[:, [0, 1]].abs() > 1.5).any()  # the others are scaled, as before
    mask = np.ones((4, 3), dtype=bool)
    ours = checkpoint.LoadedPolicy.from_module(model)(obs, mask)
    np.testing.assert_allclose(ours, torch_act(model, obs, mask), rtol=0, atol=1e-6)


# -- the weights reader --------------------------------------------------------------------


def test_reader_returns_what_torch_load_returns(tmp_path):
    base = torch.arange(12, dtype=torch.float64)
    state = {
        "f64": base,
        "view_at_offset": base[3:9].view(2, 3),  # shares base's storage, offset 3
        "f32": torch.randn(4, 5),
        "f16": torch.randn(3).half(),
        "i64": torch.tensor([-(2**40), 7]),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(1e-4, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
        "column": torch.randn(4, 1),
    }
    torch.save(state, tmp_path / "w.pt")
    ours = load_state_dict(tmp_path / "w.pt")
    assert list(ours) == list(state)
    for key, tensor in state.items():
        expected = tensor.numpy()
        assert ours[key].dtype == expected.dtype and ours[key].shape == expected.shape, key
        np.testing.assert_array_equal(ours[key], expected)


def test_reader_honours_a_big_endian_byteorder_record(tmp_path):
    values = torch.randn(3, 4)
    torch.save({"w": values}, tmp_path / "little.pt")
    with (
        zipfile.ZipFile(tmp_path / "little.pt") as src,
        zipfile.ZipFile(tmp_path / "big.pt", "w") as dst,
    ):
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename and not info.filename.endswith("serialization_id"):
                data = np.frombuffer(data, "<f4").astype(">f4").tobytes()
            dst.writestr(info, data)
    np.testing.assert_array_equal(load_state_dict(tmp_path / "big.pt")["w"], values.numpy())


def evil_pickle(module: str, name: str, argument: str) -> bytes:
    """Protocol-2 opcodes for ``module.name(argument)``, written by hand (no object needed)."""
    arg = argument.encode()
    return (
        b"\x80\x02c" + f"{module}\n{name}\n".encode()
        + b"X" + len(arg).to_bytes(4, "little") + arg
        + b"\x85R."
    )  # fmt: skip


def write_archive(path: Path, pickle_bytes: bytes) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("policy/data.pkl", pickle_bytes)
        archive.writestr("policy/byteorder", b"little")


@pytest.mark.parametrize(("module", "name"), [("os", "system"), ("builtins", "exec")])
def test_a_pickle_calling_a_forbidden_global_is_refused_unexecuted(tmp_path, module, name):
    marker = tmp_path / "ran"
    code = f"touch {marker}" if name == "system" else f"open({str(marker)!r}, 'w')"
    payload = evil_pickle(module, name, code)
    # The payload is live: an unrestricted unpickler runs it.
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()
    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoint.BUNDLED / "mesh-10x3", directory)
    write_archive(directory / "policy.pt", payload)
    with pytest.raises(checkpoint.CheckpointError, match=rf"refused global {module}\.{name}"):
        checkpoint.load(directory)
    with pytest.raises(ArchiveError, match=rf"refused global {module}\.{name}"):
        load_state_dict(directory / "policy.pt")
    assert not marker.exists()


def test_a_parameter_or_a_strided_tensor_is_refused_by_name(tmp_path):
    torch.save({"w": torch.nn.Parameter(torch.ones(2))}, tmp_path / "param.pt")
    with pytest.raises(ArchiveError, match=r"refused global torch\._utils\._rebuild_parameter"):
        load_state_dict(tmp_path / "param.pt")
    torch.save({"w": torch.ones(2, 3).t()}, tmp_path / "strided.pt")
    with pytest.raises(ArchiveError, match="only contiguous tensors"):
        load_state_dict(tmp_path / "strided.pt")
    (tmp_path / "legacy.pt").write_bytes(io.BytesIO(b"\x80\x02}q\x00.").getvalue())
    with pytest.raises(ArchiveError, match="not a torch zip archive"):
        load_state_dict(tmp_path / "legacy.pt")


def flipped(data: bytes, rng: np.random.Generator) -> bytes:
    """``data`` with one to three bytes set at random."""
    damaged = bytearray(data)
    for _ in range(rng.integers(1, 4)):
        damaged[rng.integers(len(damaged))] = rng.integers(256)
    return bytes(damaged)


def rezipped(source: Path, pickle_bytes: bytes) -> bytes:
    """``source`` with its data.pkl replaced, the zip written anew so its checksums hold:
    damage only the unpickler sees."""
    out = io.BytesIO()
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = pickle_bytes if info.filename.endswith("/data.pkl") else src.read(info)
            dst.writestr(info, data)
    return out.getvalue()


KINDS_OF_DAMAGE = ("not a torch zip archive", "damaged archive", "refused global")


def test_a_damaged_archive_is_refused_as_an_archive_error_and_nothing_else(tmp_path):
    """A checkpoint from a ConfigMap may arrive damaged. Whatever the damage (bytes flipped
    anywhere in the file, or only inside its pickle), the reader loads it or refuses it with
    ArchiveError, the one error its callers turn into a message naming the checkpoint: never
    zipfile's, the unpickler's or a decoder's own exception."""
    torch.save({"w": torch.randn(3, 4), "n": torch.arange(5)}, tmp_path / "good.pt")
    good = (tmp_path / "good.pt").read_bytes()
    with zipfile.ZipFile(tmp_path / "good.pt") as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    rng = np.random.default_rng(0)
    variants = [flipped(good, rng) for _ in range(300)]
    variants += [rezipped(tmp_path / "good.pt", flipped(pickled, rng)) for _ in range(300)]
    reasons = set()
    for data in variants:
        (tmp_path / "damaged.pt").write_bytes(data)
        try:
            state = load_state_dict(tmp_path / "damaged.pt")
        except ArchiveError as exc:
            reasons |= {key for key in KINDS_OF_DAMAGE if key in str(exc)}
        else:  # a flip can leave a valid pickle of another mapping; callers check the names
            assert all(isinstance(v, np.ndarray) for v in state.values())
    assert reasons == set(KINDS_OF_DAMAGE)  # every way of failing was met
    (tmp_path / "ckpt").mkdir()
    shutil.copy(checkpoint.BUNDLED / "mesh-10x3" / "policy.json", tmp_path / "ckpt")
    (tmp_path / "ckpt" / "policy.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="ckpt"):
        checkpoint.load(tmp_path / "ckpt")


def test_a_compressed_entry_is_refused_before_it_is_inflated(tmp_path):
    """torch stores its entries as they are; a deflated one (a zip bomb's way of being small)
    is refused by name, unread."""
    torch.save({"w": torch.zeros(1000)}, tmp_path / "good.pt")
    with (
        zipfile.ZipFile(tmp_path / "good.pt") as src,
        zipfile.ZipFile(tmp_path / "packed.pt", "w", zipfile.ZIP_DEFLATED) as dst,
    ):
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    assert (tmp_path / "packed.pt").stat().st_size < (tmp_path / "good.pt").stat().st_size
    with pytest.raises(ArchiveError, match=r"compressed entries \['good/data.pkl'"):
        load_state_dict(tmp_path / "packed.pt")
    assert set(load_state_dict(tmp_path / "good.pt")) == {"w"}


class Lenient(pickle.Unpickler):
    """Unpickles any structure, every global and storage stood in for by None."""

    def find_class(self, module, name):
        return lambda *args: None

    def persistent_load(self, pid):
        return None


def test_a_memo_index_past_the_pickle_is_refused_before_unpickling(tmp_path):
    """The C unpickler sizes its memo by the largest index a pickle names: one flipped byte
    made a LONG_BINPUT of 1.5e9, about 24 GB. Any index past the pickle's length is
    refused first; at 10**6 (16 MB, which the unpickler would take and load the weights)
    the refusal is the only thing that can tell it apart."""
    torch.save({"w": torch.randn(3, 4)}, tmp_path / "good.pt")
    with zipfile.ZipFile(tmp_path / "good.pt") as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    assert pickled.startswith(b"\x80\x02}q\x00")  # PROTO 2, EMPTY_DICT, BINPUT 0
    far = pickled[:3] + b"r" + (10**6).to_bytes(4, "little") + pickled[5:]  # LONG_BINPUT
    assert set(Lenient(io.BytesIO(far)).load()) == {"w"}  # a pickle the unpickler takes
    (tmp_path / "far.pt").write_bytes(rezipped(tmp_path / "good.pt", far))
    with pytest.raises(ArchiveError, match="memo index 1000000 at byte 3"):
        load_state_dict(tmp_path / "far.pt")


def test_a_storage_rebuilt_over_and_over_costs_its_memory_once(tmp_path):
    """Each rebuilt tensor used to be a copy: a file of 1 MB whose pickle rebuilt its one
    storage 400 times asked for 400 MB, against the reader's promise that nothing it reads
    is larger than the file. torch itself writes such a file for views of one tensor."""
    import tracemalloc  # numpy reports its allocations to it

    base = torch.zeros(2**18)  # 1 MiB
    torch.save({f"w{i}": base.view(-1) for i in range(400)}, tmp_path / "views.pt")
    assert (tmp_path / "views.pt").stat().st_size < 2**21
    tracemalloc.start()
    try:
        state = load_state_dict(tmp_path / "views.pt")
        peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert len(state) == 400 and all(v.shape == (2**18,) for v in state.values())
    assert peak_mb < 20, f"reading a 1 MB file took {peak_mb:.0f} MB"


# -- checkpoint errors name the field ------------------------------------------------------


@pytest.fixture()
def saved(tmp_path) -> tuple[Path, ActorCritic]:
    model = randomised(24, 5, 16, 2, "mappo", seed=0)
    checkpoint.save(tmp_path, model, {})
    return tmp_path, model


def test_a_missing_weight_is_named(saved):
    directory, model = saved
    state = model.state_dict()
    del state["actor.2.weight"]
    torch.save(state, directory / "policy.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"'actor\.2\.weight' missing"):
        checkpoint.load(directory)
    with pytest.raises(checkpoint.CheckpointError, match=r"actor\.2\.weight"):
        checkpoint.load_module(directory)


def test_a_misshapen_or_unexpected_weight_is_named(saved):
    directory, model = saved
    state = model.state_dict()
    state["critic.0.weight"] = torch.zeros(16, 24)  # mappo's critic sees 2 x 24 features
    torch.save(state, directory / "policy.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"'critic\.0\.weight' has shape"):
        checkpoint.load(directory)
    state = model.state_dict()
    state["actor.9.weight"] = torch.zeros(1)
    torch.save(state, directory / "policy.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"'actor\.9\.weight' is not part"):
        checkpoint.load(directory)


def test_a_missing_network_field_is_named(saved):
    directory, _ = saved
    meta = json.loads((directory / "policy.json").read_text())
    del meta["network"]["hidden"]
    (directory / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match=r"'network\.hidden' missing"):
        checkpoint.load(directory)
    meta["network"]["hidden"], meta["network"]["critic"] = 16, "central"
    (directory / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match=r"'network\.critic' is 'central'"):
        checkpoint.load(directory)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda m: m.update(observation=[24]), r"'observation' is \[24\], expected an object"),
        (lambda m: m.pop("observation"), r"'observation\.max_degree' is None"),
        (lambda m: m["action"].update(mode=3), r"'action\.mode' is 3"),
        (lambda m: m["action"].update(dim=0), r"'action\.dim' is 0"),
        (lambda m: m["observation"].pop("max_degree"), r"'observation\.max_degree' is None"),
        (lambda m: m.update(environment="oops"), r"'environment' is 'oops'"),
        (lambda m: m.update(environment={"step_seconds": "1"}), r"'environment\.step_seconds'"),
        (lambda m: m.update(environment={"reject_penalty": -4}), r"environment\.reject_penalty"),
        # A network relabelled for another observation failed every decision, unnamed.
        (lambda m: m["network"].update(obs_dim=6), r"'network\.obs_dim' is 6, but 'observat"),
        (lambda m: m["action"].update(dim=3), r"'network\.action_dim' is \d+, but 'action"),
        # The layout of two million layers took 1.3 GB before any weight was compared.
        (lambda m: m["network"].update(layers=2_000_000), r"'network\.layers' is 2000000, bu"),
    ],
)
def test_a_meta_section_off_its_type_is_named(tmp_path, edit, named):
    """The sections a checkpoint's readers use besides the network's, checked at loading:
    an operator building a policy from such a file reports the field instead of crashing."""
    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoint.BUNDLED / "mesh-10x3", directory)
    meta = json.loads((directory / "policy.json").read_text())
    edit(meta)
    (directory / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match=named):
        checkpoint.load(directory)


@pytest.mark.parametrize(
    "content", [b"\xff\xfe not text", b"[" * 200_000], ids=["not-utf8", "nested-deep"]
)
def test_a_policy_json_that_is_not_json_text_is_named(tmp_path, content):
    """Bytes that are not UTF-8, or JSON nested past the parser's recursion limit, escaped
    as UnicodeDecodeError and RecursionError: tracebacks, and an operator cycle failing
    instead of a condition naming the checkpoint."""
    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoint.BUNDLED / "mesh-10x3", directory)
    (directory / "policy.json").write_bytes(content)
    with pytest.raises(checkpoint.CheckpointError, match=r"policy\.json is not JSON"):
        checkpoint.load(directory)


# -- the operator process ------------------------------------------------------------------


def test_the_operator_decides_without_importing_torch():
    """In a fresh interpreter: import the operator, load the bundled checkpoint and run one
    control cycle on the in-memory fakes; torch must never have been imported."""
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(TESTS)!r})
        import marl_operator.__main__, marl_operator.runtime
        from marl_operator.runtime import Runtime
        from operator_fakes import FakeKube, Reader, example, example_mesh, example_policy_body
        from policies import checkpoint

        calls = []
        act = checkpoint.LoadedPolicy.__call__
        checkpoint.LoadedPolicy.__call__ = lambda self, o, m: calls.append(1) or act(self, o, m)
        checkpoint.load(checkpoint.BUNDLED / "mesh-10x3")
        mesh = example_mesh()
        kube = FakeKube(example("edgenodes.yaml"), example("edgeservice.yaml"))
        runtime = Runtime(kube, mesh=mesh, reader_for=lambda url: Reader(mesh))
        report = runtime.cycle("edge/p", example_policy_body())
        print(json.dumps({{"torch": "torch" in sys.modules, "outcome": report.outcome.value,
                          "reason": report.reason, "calls": len(calls)}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["outcome"] == "Applied", result
    assert result["calls"] > 0, result  # the policy did act
    assert result["torch"] is False, result
