"""The ground-truth cache: deterministic pairs, shards + manifest, resume, validation (DESIGN §6)."""

import io
import json
import re
import shutil
import tempfile
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bespoke
import bespoke.cli
from bespoke import BespokeError
from bespoke.noise import draw_labels, draw_noise
from bespoke.train import GTCache, generate_gt, load_gt

F64 = torch.float64
SIZE = 4  # pairs per shard: small shards keep every test well under a second


@pytest.fixture(scope="module")
def flow():
    flow = bespoke.load_model("zoo:gmm2d")
    assert flow.num_classes == 3 and "labels" in flow.cond_keys  # class-conditional: the cache holds labels
    return flow


@pytest.fixture(scope="module")
def reference(flow, tmp_path_factory):
    """An uninterrupted 3-shard cache (num=10 rounds up to 12 pairs)."""
    return generate_gt(flow, tmp_path_factory.mktemp("ref"), num=10, shard_size=SIZE, seed=5, quiet=True)


def same(a: GTCache, b: GTCache) -> bool:
    return (
        torch.equal(a.noise, b.noise)
        and torch.equal(a.samples, b.samples)
        and (a.labels is None) == (b.labels is None)
        and (a.labels is None or torch.equal(a.labels, b.labels))
        and a.nfe == b.nfe
    )


def snapshot(path):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(path.iterdir())}


def edit_manifest(path, **changes):
    m = json.loads((path / "manifest.json").read_text())
    m.update(changes)
    (path / "manifest.json").write_text(json.dumps(m))


def test_draw_from_start_is_the_tail_of_the_full_draw():
    full = draw_noise((3,), 20, seed=4, dtype=F64)
    assert torch.equal(draw_noise((3,), 6, seed=4, dtype=F64, start=9), full[9:15])
    assert torch.equal(draw_noise((3,), 0, seed=4, start=20), full[:0].float())
    assert torch.equal(draw_labels(7, 5, seed=4, start=13), draw_labels(20, 5, seed=4)[13:])
    for bad in (-1, 1.0, True):
        with pytest.raises(BespokeError, match="start"):
            draw_noise((3,), 2, seed=0, start=bad)
        with pytest.raises(BespokeError, match="start"):
            draw_labels(2, 3, seed=0, start=bad)


def test_generation_writes_shards_and_manifest_and_loads_back(flow, reference):
    path = reference.path
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "shard-00002.safetensors",
    ]
    m = json.loads((path / "manifest.json").read_text())
    assert (m["format"], m["version"], m["model"], m["fingerprint"]) == ("bespoke-gt", 1, flow.name, flow.fingerprint)
    assert (m["num"], m["stored"], m["complete"], m["seed"], m["shard_size"]) == (10, 12, True, 5, SIZE)
    assert (m["rtol"], m["atol"], m["dtype"], m["sample_shape"], m["guidance"]) == (1e-5, 1e-5, "float64", [2], None)
    assert m["scheduler"] == repr(flow.scheduler) and m["library_version"] == bespoke.__version__
    assert [(s["file"], s["start"], s["stop"]) for s in m["shards"]] == [
        (f"shard-0000{k}.safetensors", SIZE * k, SIZE * (k + 1)) for k in range(3)
    ]
    assert len(reference) == 12 and reference.noise.shape == reference.samples.shape == (12, 2)
    assert reference.noise.dtype == reference.samples.dtype == F64 and reference.labels.dtype == torch.long
    assert torch.equal(reference.noise, draw_noise((2,), 12, seed=5, dtype=F64))
    assert torch.equal(reference.labels, draw_labels(12, 3, seed=5))
    loaded = load_gt(path, flow)
    assert same(loaded, reference) and loaded.manifest == reference.manifest
    for i in (0, 5, 11):  # pair i is the dopri5 solve of exactly its shard
        a = i - i % SIZE
        gt = bespoke.ground_truth(flow, loaded.noise[a : a + SIZE], **loaded.cond(a, a + SIZE))
        assert torch.equal(loaded.samples[i], gt.samples[i - a])
        assert gt.nfe == loaded.nfe[i // SIZE]


def test_progress_bar_on_stderr_shows_nfe(flow, tmp_path, capsys):
    cache = generate_gt(flow, tmp_path, num=SIZE, shard_size=SIZE)
    err = capsys.readouterr().err
    assert "1/1" in err and f"nfe={cache.nfe[0]}" in err


def test_slice_and_cond(reference):
    part = reference.slice(3, 9)
    assert isinstance(part, GTCache) and len(part) == 6 and part.start == 3
    assert torch.equal(part.samples, reference.samples[3:9]) and torch.equal(
        part.cond()["labels"], reference.labels[3:9]
    )
    assert part.nfe == reference.nfe[0:3]  # pairs 3..8 come from shards 0, 1, 2
    assert part.slice(1, 2).nfe == reference.nfe[1:2] and part.slice(1, 2).start == 4
    assert len(reference.slice(10, 100)) == 2 and reference.slice(5, 5).nfe == []
    assert torch.equal(reference.cond(2, 4)["labels"], reference.labels[2:4])


def test_unconditional_float32_model(flow, tmp_path):
    """No labels; noise stored in the model's dtype (float64 draw rounded), samples float32, solve from that noise."""
    plain = bespoke.Flow(
        lambda t, x: flow(t, x.double()).to(x.dtype), sample_shape=(2,), fingerprint="plain", dtype=torch.float32
    )
    cache = generate_gt(plain, tmp_path, num=3, shard_size=3, quiet=True)
    assert cache.labels is None and cache.cond() == {} and cache.manifest["labels"] is False
    assert cache.noise.dtype == cache.samples.dtype == torch.float32
    assert torch.equal(cache.noise, draw_noise((2,), 3, seed=0, dtype=F64).float())
    assert torch.equal(cache.samples, bespoke.ground_truth(plain, cache.noise).samples.float())
    assert same(load_gt(tmp_path, plain), cache)


def test_prefix_property_and_extension(flow, reference, tmp_path):
    """Same seed and shard size: a 2-shard cache is the first 2 shards of a 3-shard one; asking for more extends it."""
    small = generate_gt(flow, tmp_path, num=2 * SIZE, shard_size=SIZE, seed=5, quiet=True)
    assert len(small) == 2 * SIZE and same(small, reference.slice(0, 2 * SIZE))
    before = snapshot(tmp_path)
    grown = generate_gt(flow, tmp_path, num=9, shard_size=SIZE, seed=5, quiet=True)
    assert same(grown, reference)
    after = snapshot(tmp_path)
    assert all(after[f"shard-0000{k}.safetensors"] == before[f"shard-0000{k}.safetensors"] for k in (0, 1))
    assert grown.manifest["num"] == 9 and grown.manifest["complete"]
    # asking for fewer than it holds changes nothing and returns everything
    assert same(generate_gt(flow, tmp_path, num=1, shard_size=SIZE, seed=5, quiet=True), reference)


def test_kill_and_resume_match_an_uninterrupted_run(flow, reference, tmp_path):
    part = generate_gt(flow, tmp_path, num=10, shard_size=SIZE, seed=5, quiet=True, max_shards=1)
    assert len(part) == SIZE and not part.manifest["complete"] and part.manifest["stored"] == SIZE
    assert not load_gt(tmp_path).manifest["complete"] and same(load_gt(tmp_path), part)  # a partial cache loads
    assert same(generate_gt(flow, tmp_path, num=10, shard_size=SIZE, seed=5, quiet=True), reference)
    # killed after writing shard 2 but before the manifest listed it: the shard is made again
    m = json.loads((tmp_path / "manifest.json").read_text())
    edit_manifest(tmp_path, shards=m["shards"][:2])
    assert len(load_gt(tmp_path)) == 2 * SIZE
    (tmp_path / "shard-00002.safetensors").write_bytes(b"half-written")
    assert same(generate_gt(flow, tmp_path, num=10, shard_size=SIZE, seed=5, quiet=True), reference)
    assert same(load_gt(tmp_path, flow), reference)


def test_generation_regenerates_a_damaged_shard(flow, reference, tmp_path):
    generate_gt(flow, tmp_path, num=10, shard_size=SIZE, seed=5, quiet=True)
    shard = tmp_path / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.warns(UserWarning, match="shard-00001.safetensors is missing or damaged; regenerating"):
        assert same(generate_gt(flow, tmp_path, num=10, shard_size=SIZE, seed=5, quiet=True), reference)


def _flip_byte(path):
    shard = path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))


def _truncate(path):
    shard = path / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])


DAMAGE = {
    "flipped byte": (_flip_byte, r"shard-00001.safetensors is corrupt or truncated.*delete it and re-run"),
    "truncated": (_truncate, r"shard-00002.safetensors is corrupt or truncated.*regenerate it"),
    "missing shard": (lambda p: (p / "shard-00000.safetensors").unlink(), r"shard-00000.safetensors is missing"),
    "missing manifest": (lambda p: (p / "manifest.json").unlink(), r"not a GT cache.*bespoke gt --model SPEC"),
    "garbage manifest": (lambda p: (p / "manifest.json").write_text("{not json"), r"not a GT cache.*cannot be read"),
    "foreign manifest": (lambda p: edit_manifest(p, format="other"), r"not a GT cache.*not a 'bespoke-gt' manifest"),
    "unknown version": (lambda p: edit_manifest(p, version=7), r"manifest version 7.*knows version 1"),
    "bad shard list": (lambda p: edit_manifest(p, shard_size=3), r"manifest.json is damaged"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_cache_is_refused_and_left_alone(flow, tmp_path, damage):
    generate_gt(flow, tmp_path, num=3 * SIZE, shard_size=SIZE, quiet=True)
    spoil, message = DAMAGE[damage]
    spoil(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(BespokeError, match=message) as err:
        load_gt(tmp_path, flow)
    assert "\n" not in str(err.value)
    assert snapshot(tmp_path) == before


def test_not_a_directory(tmp_path):
    with pytest.raises(BespokeError, match="not a GT cache.*bespoke gt"):
        load_gt(tmp_path / "nothing")


def test_cache_of_another_model_is_refused_unless_forced(flow, reference):
    cosine = bespoke.load_model("zoo:gmm2d", path="cosine")
    guided = bespoke.load_model("zoo:gmm2d", guidance=1.0)
    assert cosine.fingerprint != flow.fingerprint and guided.fingerprint == flow.fingerprint
    before = snapshot(reference.path)
    with pytest.raises(BespokeError, match=f"fingerprint {flow.fingerprint}.*not {cosine.fingerprint}.*force=True"):
        load_gt(reference.path, cosine)
    with pytest.raises(BespokeError, match="guidance None, not {'weight': 1.0"):
        load_gt(reference.path, guided)
    with pytest.warns(UserWarning, match="another model.*force=True"):
        assert same(load_gt(reference.path, cosine, force=True), reference)
    assert snapshot(reference.path) == before


@pytest.mark.parametrize(
    "change, field",
    [({"seed": 6}, "seed=5"), ({"rtol": 1e-6}, "rtol=1e-05"), ({"shard_size": 2}, "shard_size=4"), ({}, "guidance")],
)
def test_resume_with_other_settings_is_refused(flow, reference, change, field):
    args = {"num": 10, "shard_size": SIZE, "seed": 5, "quiet": True} | change
    other = flow if change else bespoke.load_model("zoo:gmm2d", guidance=1.0)
    before = snapshot(reference.path)
    with pytest.raises(BespokeError, match=f"other settings: {field}.*another --out directory or the same settings"):
        generate_gt(other, reference.path, **args)
    assert snapshot(reference.path) == before


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num": 0}, "num must be an integer >= 1"),
        ({"num": 2.5}, "num must be"),
        ({"shard_size": 0}, "shard_size must be"),
        ({"max_shards": -1}, "max_shards must be"),
        ({"rtol": 0.0}, "rtol must be a positive number"),
        ({"seed": "1"}, "seed must be an integer"),
    ],
)
def test_bad_arguments(flow, tmp_path, kwargs, message):
    with pytest.raises(BespokeError, match=message):
        generate_gt(flow, tmp_path / "out", **({"num": 4, "quiet": True} | kwargs))
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(BespokeError, match="not a directory"):
        generate_gt(flow, tmp_path / "file", num=4, quiet=True)


# --- dense trajectories (Bespoke training) --------------------------------------------------------


def test_dense_trajectories_are_the_solution_and_velocity_at_their_times(flow, reference, tmp_path):
    dense = generate_gt(flow, tmp_path / "dense", num=10, shard_size=SIZE, seed=5, trajectory=9, quiet=True)
    assert dense.manifest["trajectory"] == 9 and dense.manifest["ode_end"] == 1.0
    assert dense.trajectory_states.shape == (12, 9, 2) == dense.trajectory_velocities.shape
    times = dense.trajectory_times
    assert times[0] == 0 and times[-1] == 1 and torch.all(torch.diff(times) > 0)
    assert torch.all(torch.diff(times)[1:] < torch.diff(times)[:-1])  # denser towards the data
    assert torch.equal(dense.noise, reference.noise) and torch.equal(dense.trajectory_states[:, 0], dense.noise)
    assert (dense.trajectory_states[:, -1] - dense.samples).abs().max() <= 1e-12
    labels = dense.labels.repeat_interleave(9)
    u = flow(times.repeat(12), dense.trajectory_states.flatten(0, 1), labels=labels).reshape(12, 9, 2)
    assert (u - dense.trajectory_velocities).abs().max() <= 1e-12
    assert (dense.samples - reference.samples).abs().max() <= 1e-4  # same pairs, within the dopri5 tolerance
    part = dense.slice(4, 8)
    assert torch.equal(part.trajectory_states, dense.trajectory_states[4:8])
    assert torch.equal(load_gt(tmp_path / "dense", flow).trajectory_velocities, dense.trajectory_velocities)


def test_dense_trajectories_are_a_setting_a_resumed_cache_must_keep(flow, reference, tmp_path):
    with pytest.raises(BespokeError, match="trajectory=0"):
        generate_gt(flow, reference.path, num=10, shard_size=SIZE, seed=5, trajectory=9, quiet=True)
    with pytest.raises(BespokeError, match="at least 2"):
        generate_gt(flow, tmp_path / "x", num=4, shard_size=SIZE, trajectory=1, quiet=True)


def test_the_slope_at_a_singular_data_end_closes_the_last_interval_as_a_quadratic(flow, tmp_path):
    def singular(t, x, **cond):
        u = flow(t, x, **cond)
        return torch.where((t >= 1.0)[:, None], torch.full_like(u, float("nan")), u)

    vp_like = bespoke.Flow(
        singular, scheduler=flow.scheduler, sample_shape=(2,), cond_keys=("labels",), num_classes=3, name="vp-like"
    )
    with pytest.warns(UserWarning, match="fingerprint"):
        dense = generate_gt(vp_like, tmp_path / "d", num=4, shard_size=SIZE, trajectory=5, quiet=True)
    x, v, t = dense.trajectory_states, dense.trajectory_velocities, dense.trajectory_times
    assert torch.isfinite(v).all()
    assert torch.allclose(v[:, -1], 2 * (x[:, -1] - x[:, -2]) / (t[-1] - t[-2]) - v[:, -2], atol=1e-12)


def test_a_cache_made_before_noise_scale_was_recorded_still_extends(flow, tmp_path):
    """Manifests written before the `noise_scale` field read as noise_scale 1, which is what they hold."""
    out = tmp_path / "old"
    generate_gt(flow, out, num=8, shard_size=8, quiet=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest.pop("noise_scale") == 1.0
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert len(generate_gt(flow, out, num=16, shard_size=8, quiet=True)) == 16


def test_shards_written_but_not_yet_in_the_manifest_are_adopted(flow, reference, tmp_path):
    """A run killed between writing a shard and recording it (or another rank's shards under torchrun):
    the next run takes the shard files that say they are shard k instead of solving them again."""
    generate_gt(flow, tmp_path, num=9, shard_size=SIZE, seed=5, quiet=True)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:1]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(tmp_path)
    again = generate_gt(flow, tmp_path, num=9, shard_size=SIZE, seed=5, quiet=True)
    assert same(again, reference) and len(again.manifest["shards"]) == len(reference.manifest["shards"])
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k.startswith("shard")} == {
        k: v for k, v in before.items() if k.startswith("shard")
    }  # no shard was solved again


# --- a run that fails before its first shard ----------------------------------------------------------


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_a_run_that_fails_before_its_first_shard_leaves_nothing_that_refuses_other_settings(flow, tmp_path, failure):
    def failing(t, x, **cond):
        raise failure("the model failed")

    with pytest.raises(failure, match="the model failed"):
        generate_gt(flow.derived(failing), tmp_path, num=SIZE, shard_size=SIZE, seed=1, quiet=True)
    assert not (tmp_path / "manifest.json").exists()
    cache = generate_gt(flow, tmp_path, num=SIZE, shard_size=SIZE, seed=2, rtol=1e-6, quiet=True)
    assert len(cache) == SIZE and (cache.manifest["seed"], cache.manifest["rtol"]) == (2, 1e-6)
    assert same(load_gt(tmp_path, flow), cache)


def test_an_empty_manifest_of_an_older_version_gives_way_unless_shard_files_exist(flow, tmp_path):
    generate_gt(flow, tmp_path, num=SIZE, shard_size=SIZE, seed=1, quiet=True)
    edit_manifest(tmp_path, shards=[])  # what older versions left when the first shard failed
    with pytest.raises(BespokeError, match="holds no pairs yet.*bespoke gt --model SPEC --num N --out"):
        load_gt(tmp_path, flow)
    with pytest.raises(BespokeError, match="other settings: seed=1"):  # a shard file would be lost: refused
        generate_gt(flow, tmp_path, num=SIZE, shard_size=SIZE, seed=2, quiet=True)
    (tmp_path / "shard-00000.safetensors").unlink()
    cache = generate_gt(flow, tmp_path, num=SIZE, shard_size=SIZE, seed=2, quiet=True)  # nothing to lose: afresh
    assert cache.manifest["seed"] == 2 and same(load_gt(tmp_path, flow), cache)
    empty = generate_gt(flow, tmp_path / "none", num=SIZE, shard_size=SIZE, max_shards=0, quiet=True)
    assert len(empty) == 0 and not empty.manifest["complete"] and not (tmp_path / "none" / "manifest.json").exists()


# --- damaged manifests: always a one-line BespokeError, never another exception ----------------------

GEN = {"num": 2 * SIZE, "shard_size": SIZE, "seed": 5, "trajectory": 3, "quiet": True}
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([0, 1, 2, -1, 10**400])
    | st.floats()
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
VALUE = JSON | st.fixed_dictionaries({"weight": JSON, "convention": JSON})  # guidance-like objects too
FUZZ = settings(max_examples=30, deadline=None, database=None)


@pytest.fixture(scope="module")
def small(flow, tmp_path_factory):
    """A 2-shard cache with labels and trajectories (every manifest field in use) and its manifest."""
    path = tmp_path_factory.mktemp("small")
    generate_gt(flow, path, **GEN)
    return path, json.loads((path / "manifest.json").read_text())


def _fields(manifest: dict) -> list[tuple]:
    """The path of every field: top-level keys, shard entries and their keys."""
    shards = manifest["shards"]
    return (
        [(key,) for key in manifest]
        + [("shards", k) for k in range(len(shards))]
        + [("shards", k, key) for k, entry in enumerate(shards) for key in entry]
    )


def _edited(manifest: dict, field: tuple, value=None, delete=False) -> dict:
    m = json.loads(json.dumps(manifest))
    *parents, last = field
    target = m
    for key in parents:
        target = target[key]
    if delete:
        del target[last]
    else:
        target[last] = value
    return m


def _cache_or_error(call) -> None:
    try:
        assert isinstance(call(), GTCache)
    except BespokeError as e:
        assert "\n" not in str(e)


def _info(path) -> tuple[int, str]:
    """`bespoke info PATH`: (exit code, stderr)."""
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()) as err:
        return bespoke.cli.main(["info", str(path)]), err.getvalue()


def _loads_or_refuses(small, flow, manifest) -> None:
    """load_gt with and without the model, `bespoke info` and a resumed generate_gt on a copy of the cache with
    this manifest (bytes or JSON): a GTCache (info: exit 0) or a one-line BespokeError (exit 2), nothing else."""
    data = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "gt"
        shutil.copytree(small[0], path)
        (path / "manifest.json").write_bytes(data)
        _cache_or_error(lambda: load_gt(path, flow))
        _cache_or_error(lambda: load_gt(path))
        code, err = _info(path)
        assert code in (0, 2), err
        _cache_or_error(lambda: generate_gt(flow, path, **GEN))


@FUZZ
@given(data=st.data(), value=VALUE)
def test_any_field_replaced_by_any_json_value(flow, small, data, value):
    _loads_or_refuses(small, flow, _edited(small[1], data.draw(st.sampled_from(_fields(small[1]))), value))


@FUZZ
@given(data=st.data())
def test_any_field_deleted(flow, small, data):
    _loads_or_refuses(small, flow, _edited(small[1], data.draw(st.sampled_from(_fields(small[1]))), delete=True))


@FUZZ
@given(data=st.data())
def test_any_json_as_the_manifest(flow, small, data):
    fields = {key: st.just(value) | JSON for key, value in small[1].items() if key not in ("format", "version")}
    headed = st.fixed_dictionaries({"format": st.just("bespoke-gt"), "version": st.just(1)}, optional=fields)
    _loads_or_refuses(small, flow, data.draw(JSON | headed))


@FUZZ
@given(data=st.data())
def test_any_bytes_as_the_manifest(flow, small, data):
    good = (small[0] / "manifest.json").read_bytes()
    cut = st.integers(0, len(good)).map(lambda n: good[:n])
    flipped = st.tuples(st.integers(0, len(good) - 1), st.integers(1, 255)).map(
        lambda p: good[: p[0]] + bytes([good[p[0]] ^ p[1]]) + good[p[0] + 1 :]
    )
    _loads_or_refuses(small, flow, data.draw(st.binary(max_size=200) | cut | flipped))


DELETE = object()
UNUSUAL = [  # manifests validation passes, however unusual: `bespoke info` prints them
    (("guidance",), {"weight": 2, "convention": "cfg"}),
    (("fingerprint",), None),
    (("scheduler",), None),
    (("rtol",), 1),
    (("num",), 10**400),
    (("seed",), -3),
    (("model",), ""),
    (("noise_scale",), DELETE),
    (("shards", 1, "seconds"), 0),
]
DAMAGED = [  # and ones it refuses: exit 2 with one line naming the field
    (("rtol",), "x", "'rtol' must be a positive number, got 'x'"),
    (("shards", 0, "nfe"), DELETE, "'nfe' of shard entry 0 is missing"),
    (("shards", 1, "seconds"), float("nan"), "'seconds' of shard entry 1 must be a number >= 0, got nan"),
    (("shards", 1, "sha256"), "abc", "'sha256' of shard entry 1 must be 64 hex digits"),
    (("trajectory",), 1, "'trajectory' must be 0 or an integer >= 2, got 1"),
    (("ode_end",), DELETE, "'ode_end' is missing"),
    (("num_classes",), None, "'labels' is True but 'num_classes' is None"),
    (("guidance",), {"weight": "1", "convention": "fm"}, "'guidance' must be null or"),
    (("seed",), True, "'seed' must be an integer, got True"),
    (("shards",), [], "holds no pairs yet"),
    (("version",), True, "manifest version True"),
]


def _copy_with(source: Path, dest: Path, field: tuple, value) -> Path:
    shutil.copytree(source, dest)
    manifest = json.loads((source / "manifest.json").read_text())
    edited = _edited(manifest, field, delete=True) if value is DELETE else _edited(manifest, field, value)
    (dest / "manifest.json").write_text(json.dumps(edited))
    return dest


def test_info_prints_every_manifest_that_validation_passes(small, reference, tmp_path):
    guided = bespoke.load_model("zoo:gmm2d", guidance=1.0)
    generate_gt(guided, tmp_path / "guided", num=SIZE, shard_size=SIZE, quiet=True)
    old = _copy_with(reference.path, tmp_path / "old", ("ode_end",), DELETE)  # no trajectories: ode_end optional
    for path in [tmp_path / "guided", old, small[0]]:
        assert _info(path) == (0, "")
    for k, (field, value) in enumerate(UNUSUAL):
        path = _copy_with(small[0], tmp_path / f"unusual{k}", field, value)
        assert _info(path) == (0, ""), field
        assert isinstance(load_gt(path), GTCache)
    with redirect_stdout(io.StringIO()) as out:
        assert bespoke.cli.main(["info", str(tmp_path / "unusual0")]) == 0
    assert "guidance w=2 (cfg)" in out.getvalue() and "trajectories at 3 times" in out.getvalue()
    for k, (field, value, message) in enumerate(DAMAGED):
        code, err = _info(_copy_with(small[0], tmp_path / f"damaged{k}", field, value))
        assert code == 2 and message in err and err.count("\n") == 1, (field, err)


def test_suggested_commands_are_ones_the_cli_accepts(flow, small, tmp_path):
    """Every `bespoke ...` command the errors of this module suggest parses, placeholders filled in."""
    cosine = bespoke.load_model("zoo:gmm2d", path="cosine")
    corrupt = _copy_with(small[0], tmp_path / "corrupt", ("shards", 0, "sha256"), "0" * 64)
    missing = Path(shutil.copytree(small[0], tmp_path / "missing"))
    (missing / "shard-00001.safetensors").unlink()
    attempts = [
        lambda: load_gt(tmp_path / "nothing"),
        lambda: load_gt(tmp_path),
        lambda: load_gt(small[0], cosine),
        lambda: load_gt(corrupt),
        lambda: load_gt(missing),
        lambda: generate_gt(flow, small[0], **(GEN | {"seed": 6})),
    ] + [lambda d=d: load_gt(_copy_with(small[0], tmp_path / f"d{d}", *DAMAGED[d][:2])) for d in (0, 9, 10)]
    commands = []
    for attempt in attempts:
        with pytest.raises(BespokeError) as err:
            attempt()
        commands += re.findall(r"`(bespoke [^`]*)`", str(err.value))
    assert len(commands) >= len(attempts) - 1  # "use another --out directory" names no command
    fill = {"SPEC": "zoo:gmm2d", "N": "4", "DIR": "gt", "NEW_DIR": "gt2"}
    for command in commands:
        args = bespoke.cli.build_parser().parse_args([fill.get(w, w) for w in command.split()[1:]])
        assert args.command == "gt" and args.num == 4, command
