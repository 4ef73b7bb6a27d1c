"""Solver files against damage and odd input: a checksum over metadata and tensors catches every changed bit,
and any metadata, however shaped, loads or gives a one-line BespokeError (never another exception)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import bespoke
from bespoke import BespokeError, cli
from bespoke.io import save_tensors
from bespoke.solvers.bns import BNSSolver
from bespoke.solvers.files import load_solver, load_solvers, read_metadata, save_solvers

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def flow():
    return bespoke.load_model("zoo:gmm2d")


@pytest.fixture(scope="module")
def saved(flow, tmp_path_factory):
    """A solver file holding BNS solvers at NFE 2 and 4 (euler starts), with a training summary."""
    path = tmp_path_factory.mktemp("files") / "s.safetensors"
    solvers = [BNSSolver.from_solver(bespoke.solver("euler", n), flow) for n in (2, 4)]
    for s in solvers:
        s.training_summary = {"val_psnr_init": 30.0, "val_psnr": 40.0, "val_pairs": 8, "iterations": 5}
    save_solvers(path, solvers, flow)
    return path


def _tensors_and_meta(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["bespoke"])


def _loads_or_refuses(path, flow) -> None:
    """load_solvers, with and without the model, and `bespoke info`: a result or a BespokeError / exit 2."""
    for model in (flow, None):
        try:
            load_solvers(path, flow=model)
        except BespokeError as e:
            assert "\n" not in str(e) and str(path) in str(e), str(e)
    assert cli.main(["info", str(path)]) in (0, 2)


# --- integrity -------------------------------------------------------------------------------------


def test_every_single_bit_flip_of_the_file_is_detected(saved, flow, tmp_path):
    """All 8 x len(file) flips, the tensor data among them: each is refused with a BespokeError."""
    data = saved.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert len(data) - 8 - header == 8 * (2 + 2 + 4 + 2) + 8 * (4 + 4 + 16 + 2)  # float64 tensor data
    damaged = tmp_path / "d.safetensors"
    accepted, data_flips = [], 0
    for i in range(len(data)):
        for bit in range(8):
            d = bytearray(data)
            d[i] ^= 1 << bit
            damaged.write_bytes(bytes(d))
            data_flips += i >= 8 + header
            try:
                load_solvers(damaged, flow=flow)
                accepted.append((i, bit))
            except BespokeError:
                pass
    assert accepted == [] and data_flips == 8 * 288


def test_a_damaged_tensor_names_the_file_not_the_model(saved, flow, tmp_path):
    """An exponent flip in a tensor used to surface as a non-finite velocity of the model."""
    data = bytearray(saved.read_bytes())
    data[-2] ^= 0x40  # high byte of the last float64: its exponent
    damaged = tmp_path / "bns.safetensors"
    damaged.write_bytes(bytes(data))
    with pytest.raises(BespokeError, match=r"bns\.safetensors is damaged: its contents do not match the checksum"):
        load_solver(damaged, 4, flow=flow)


def test_a_version_2_file_without_its_checksum_is_refused(saved, flow, tmp_path):
    tensors, meta = _tensors_and_meta(saved)
    path = tmp_path / "nosum.safetensors"
    save_file(tensors, str(path), metadata={"bespoke": json.dumps(meta)})
    with pytest.raises(BespokeError, match="checksum is missing"):
        load_solvers(path)


def test_a_version_1_file_without_a_checksum_still_loads_with_a_warning(saved, flow, tmp_path):
    tensors, meta = _tensors_and_meta(saved)
    path = tmp_path / "v1.safetensors"
    save_file(tensors, str(path), metadata={"bespoke": json.dumps(dict(meta, version=1))})
    with pytest.warns(UserWarning, match="without a checksum"):
        solvers = load_solvers(path, flow=flow)
    assert sorted(solvers) == [2, 4]


# --- metadata of any shape ---------------------------------------------------------------------------


def _write(path, tensors, meta) -> None:
    """`meta` as the file's metadata with a valid checksum: what the validation itself must catch."""
    save_tensors(path, tensors, meta)


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda m: [], "not a bespoke solver file"),
        (lambda m: dict(m, solvers={"4": "bns"}), "unknown kind 'bns'"),
        (lambda m: dict(m, solvers={"08": m["solvers"]["4"]}), "keyed by NFE"),
        (lambda m: dict(m, solvers={"abc": m["solvers"]["4"]}), "keyed by NFE"),
        (
            lambda m: dict(m, solvers={"4": dict(m["solvers"]["4"], sigma0="big")}),
            "'sigma0' of solver 4 must be a positive",
        ),
        (lambda m: dict(m, solvers={"4": dict(m["solvers"]["4"], nfe=8)}), "says it has NFE 8"),
        (lambda m: dict(m, model=dict(m["model"], guidance={"weight": "2"})), "'guidance' of the model record must be"),
        (lambda m: dict(m, model={}), "'fingerprint' of the model record is missing"),
        (lambda m: dict(m, solvers={"4": dict(m["solvers"]["4"], training={"val_psnr": "high"})}), "'val_psnr'"),
        (lambda m: dict(m, version=True), "version True"),
    ],
)
def test_metadata_of_the_wrong_shape_is_one_line_exit_2(edit, words, saved, flow, tmp_path, capsys):
    tensors, meta = _tensors_and_meta(saved)
    path = tmp_path / "odd.safetensors"
    _write(path, tensors, edit(meta))
    with pytest.raises(BespokeError, match=words):
        load_solvers(path, flow=flow)
    assert cli.main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bespoke: error: ") and words.split("'")[0] in err


def test_a_partial_training_summary_loads_and_info_prints_what_it_has(saved, flow, tmp_path, capsys):
    tensors, meta = _tensors_and_meta(saved)
    meta["solvers"]["4"]["training"] = {"val_psnr": 41.5}
    path = tmp_path / "partial.safetensors"
    _write(path, tensors, meta)
    assert sorted(load_solvers(path, flow=flow)) == [2, 4]
    assert cli.main(["info", str(path), "--quiet"]) == 0
    assert "trained: validation PSNR 41.50 dB" in capsys.readouterr().out


@SETTINGS
@given(meta=JSON)
def test_any_whole_metadata_loads_or_is_refused(meta, saved, flow, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "m.safetensors"
    _write(path, _tensors_and_meta(saved)[0], meta)
    _loads_or_refuses(path, flow)


@SETTINGS
@given(where=st.sampled_from(["top", "model", "entry", "training"]), key=st.text(max_size=12), value=JSON)
def test_any_one_field_replaced_loads_or_is_refused(where, key, value, saved, flow, tmp_path_factory):
    tensors, meta = _tensors_and_meta(saved)
    record = {
        "top": meta,
        "model": meta["model"],
        "entry": meta["solvers"]["4"],
        "training": meta["solvers"]["4"]["training"],
    }[where]
    known = sorted(record)
    record[known[hash(key) % len(known)] if key == "" else key] = value  # a known field or any other
    path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    _write(path, tensors, meta)
    _loads_or_refuses(path, flow)


@SETTINGS
@given(name=st.sampled_from(["top", "model", "entry", "training"]), data=st.data())
def test_any_one_field_deleted_loads_or_is_refused(name, data, saved, flow, tmp_path_factory):
    tensors, meta = _tensors_and_meta(saved)
    record = {"top": meta, "model": meta["model"], "entry": meta["solvers"]["4"], "training": {}}[name]
    if record:
        del record[data.draw(st.sampled_from(sorted(record)))]
    path = tmp_path_factory.mktemp("fuzz") / "d.safetensors"
    _write(path, tensors, meta)
    _loads_or_refuses(path, flow)


@SETTINGS
@given(blob=st.binary(max_size=300))
def test_any_bytes_are_refused(blob, flow, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "b.safetensors"
    path.write_bytes(blob)
    with pytest.raises(BespokeError):
        load_solvers(path, flow=flow)


# --- guidance --------------------------------------------------------------------------------------


def test_a_file_trained_at_another_guidance_scale_is_refused_unless_forced(tmp_path, capsys):
    guided = lambda w: bespoke.load_model("zoo:gmm2d", guidance=w)  # noqa: E731
    path = tmp_path / "w2.safetensors"
    save_solvers(path, [BNSSolver.from_solver(bespoke.solver("euler", 4), guided(2.0))], guided(2.0))
    assert read_metadata(path)["model"]["guidance"]["weight"] == 2.0
    load_solver(path, 4, flow=guided(2.0))  # the scale it was trained at
    with pytest.raises(BespokeError, match=r"trained at guidance w=2 \(fm\), but .* runs at guidance w=3"):
        load_solver(path, 4, flow=guided(3.0))
    s = load_solver(path, 4)  # loaded without a model: refused when it meets another scale
    noise = torch.randn(4, 2, dtype=torch.float64)
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(BespokeError, match="guidance w=3"):
        s.sample(guided(3.0), noise, labels=labels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_solver(path, 4, flow=guided(3.0), force=True).sample(guided(3.0), noise, labels=labels)
    assert any("used anyway" in str(w.message) for w in caught)
    argv = ["sample", "--model", "zoo:gmm2d", "--solver", path, "--num", "4", "--out", tmp_path / "o.safetensors"]
    assert cli.main([str(a) for a in [*argv, "--guidance", "3", "--quiet"]]) == 2
    assert "--guidance" in capsys.readouterr().err
    assert cli.main([str(a) for a in [*argv, "--guidance", "3", "--force", "--quiet"]]) == 0
    err = capsys.readouterr().err  # one warning line, not one per batch, without Python's source line
    assert err.count("bespoke: warning: this solver was trained at guidance w=2") == 1 and err.count("\n") == 1
    assert cli.main([str(a) for a in [*argv, "--guidance", "2", "--quiet"]]) == 0
