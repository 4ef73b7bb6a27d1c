"""Text-to-image pipelines end to end, on tiny random-weight SD-, SDXL- and SD3-type pipelines built offline
(tests/pipelines.py): prompts as data, the pipeline's guidance, VAE decoding, GT caches and solver files that
record and check prompts and guidance, the stock pipeline running BespokeScheduler, and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import bespoke
from bespoke import BespokeError, cli
from bespoke.prompts import Prompts, read_prompts
from bespoke.solvers.files import read_metadata

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from bespoke.integrations.diffusers import BespokeScheduler  # noqa: E402
from pipelines import PROMPTS, load_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers' Euler
MAKERS = {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline, "sd3": tiny_sd3_pipeline}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny networks run ~50x faster on one thread than on two competing ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipelines")
    return {name: make(tmp / name) for name, make in MAKERS.items()}


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:3]) + "\n")
    return path


def _run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- prompt files ---------------------------------------------------------------------------------


def test_prompt_files_in_every_format_give_the_same_set(tmp_path):
    (tmp_path / "p.txt").write_text("a red dog\n\n  a photo of cat  \n")
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "a red dog"}, "a photo of cat"]))
    (tmp_path / "p.csv").write_text("id,prompt\n1,a red dog\n2,a photo of cat\n")
    sets = [read_prompts(tmp_path / f"p.{ext}") for ext in ("txt", "json", "csv")]
    assert all(s.texts == ("a red dog", "a photo of cat") for s in sets)
    assert len({s.sha256 for s in sets}) == 1 and len({s.file_sha256 for s in sets}) == 3
    assert read_prompts(tmp_path / "p.txt", negative="blurry").sha256 != sets[0].sha256
    assert Prompts(("a red dog", "a photo of cat")).sha256 == sets[0].sha256


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("empty.txt", "\n  \n", "holds no prompts"),
        ("bad.csv", "text\nhello\n", "needs a 'prompt' column"),
        ("bad.json", '{"a": 1}', "list of strings"),
        ("bad.json", "[1, 2]", "list of strings"),
    ],
)
def test_bad_prompt_files_are_refused(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(BespokeError, match=message):
        read_prompts(tmp_path / name)


# --- a pipeline folder is a model -----------------------------------------------------------------


@pytest.mark.parametrize("kind", list(MAKERS))
def test_pipeline_folder_is_a_text_conditioned_latent_model(folders, kind):
    flow = bespoke.load_model(f"diffusers:{folders[kind]}", prompts=PROMPTS[:2], guidance=3.0)
    assert flow.sample_shape == (4, 8, 8) and flow.cond_keys == ("labels",) and flow.num_classes == 2
    assert flow.guidance.convention == "diffusers" and flow.guidance.null == {"labels": 2}
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t = torch.full((2,), 0.5, dtype=torch.float64)
    u = flow(t, x.clone(), labels=torch.tensor([0, 1]))
    assert not torch.allclose(u[0], flow(t, x.clone(), labels=torch.tensor([1, 1]))[0])  # the prompt matters
    assert flow.decode(x).shape == (2, 3, 16, 16)
    # the fingerprint is the model's (denoiser and text encoders), not the prompts'
    other = bespoke.load_model(f"diffusers:{folders[kind]}", prompts=PROMPTS[2:])
    assert other.fingerprint == flow.fingerprint and other.guidance is None


def _perturbed_bns(flow, nfe):
    """A learned solver that is not a classical one: dpm++2m's NS form, perturbed."""
    bns = bespoke.BNSSolver.from_solver(bespoke.solver("dpm++2m", nfe), flow)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in bns.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return bns


@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize("weight", [1.0, 3.0])
def test_stock_pipeline_with_bespoke_scheduler_equals_our_sampler(folders, kind, weight, tmp_path):
    """pipe.scheduler = BespokeScheduler.from_solvers(file, flow); pipe(prompt, steps, guidance_scale) gives our
    sampler's samples from the same latents and prompt, to float32 precision."""
    flow = bespoke.load_model(f"diffusers:{folders[kind]}", prompts=PROMPTS, guidance=weight)
    solver = _perturbed_bns(flow, 6)
    bespoke.save_solvers(tmp_path / "bns.safetensors", [solver], flow)
    pipe = load_pipeline(folders[kind])
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = BespokeScheduler.from_solvers(tmp_path / "bns.safetensors", flow)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 3])
    ours = solver.sample(flow, latents.double(), labels=labels).float()
    theirs = pipe(
        [PROMPTS[1], PROMPTS[3]],
        num_inference_steps=6,
        guidance_scale=weight,
        latents=latents.clone(),
        output_type="latent",
        height=16,
        width=16,
    ).images
    scale = ours.abs().max()
    assert (ours - theirs).abs().max() <= 1e-4 * scale, ((ours - theirs).abs().max(), scale)


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_a_guided_solver_takes_the_pipelines_own_guidance_scale(folders, kind, tmp_path):
    """BespokeScheduler.from_solvers(guided file, flow).follow(pipe): pipe(..., guidance_scale=w) samples with the
    guided solver at w (between its anchors too), equal to our sampler at w; a scale out of its range is refused."""
    from bespoke.solvers.guided import GuidedBNSSolver

    flows = {w: bespoke.load_model(f"diffusers:{folders[kind]}", prompts=PROMPTS, guidance=w) for w in (1.0, 4.0)}
    anchors = {w: _perturbed_bns(f, 4).bind_model(f) for w, f in flows.items()}
    with torch.no_grad():
        anchors[4.0].a.mul_(1.05)
    guided = GuidedBNSSolver.from_anchors(anchors, "diffusers")
    bespoke.save_solvers(tmp_path / "guided.safetensors", [guided], flows[1.0])
    pipe = load_pipeline(folders[kind])
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = BespokeScheduler.from_solvers(tmp_path / "guided.safetensors", flows[1.0]).follow(pipe)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2])
    run = dict(num_inference_steps=4, latents=latents, output_type="latent", height=16, width=16)
    for w in (1.0, 2.5):
        flow = bespoke.load_model(f"diffusers:{folders[kind]}", prompts=PROMPTS, guidance=w)
        ours = guided.sample(flow, latents.double(), labels=labels).float()
        theirs = pipe([PROMPTS[0], PROMPTS[2]], guidance_scale=w, **{**run, "latents": latents.clone()}).images
        assert (ours - theirs).abs().max() <= 1e-4 * ours.abs().max()
    with pytest.raises(BespokeError, match=r"serves guidance scales \[1, 4\]"):
        pipe([PROMPTS[0]], guidance_scale=7.0, **{**run, "latents": latents[:1].clone()})


# --- the CLI: gt -> train -> sample with --prompts and --guidance ------------------------------------


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_gt_train_sample_through_the_cli(folders, kind, prompt_file, tmp_path, capsys):
    model = ["--model", f"diffusers:{folders[kind]}", "--prompts", prompt_file, "--guidance", 3]
    gt, bns = tmp_path / "gt", tmp_path / "bns.safetensors"
    quick = ["--quiet", "--seed", 1]
    args = ["gt", *model, "--num", 24, "--shard-size", 8, "--rtol", 1e-3, "--atol", 1e-3, "--out", gt, *quick]
    assert _run(args, capsys)[0] == 0
    manifest = json.loads((gt / "manifest.json").read_text())
    assert manifest["prompts"]["prompts"] == PROMPTS[:3] and manifest["prompts"]["source"] == str(prompt_file)
    assert manifest["guidance"] == {"weight": 3.0, "convention": "diffusers"}
    cache = bespoke.load_gt(gt)
    assert cache.labels.max() < 3 and len(set(cache.labels.tolist())) > 1  # each pair its drawn prompt

    train = ["train", *model, "--solver", "bns", "--nfe", 4, "--gt", gt, "--train-samples", 16, "--val-samples", 8]
    assert _run([*train, "--iterations", 5, "--out", bns, *quick], capsys)[0] == 0
    meta = read_metadata(bns)
    assert meta["model"]["prompts"]["sha256"] == manifest["prompts_sha256"]
    assert meta["model"]["guidance"] == {"weight": 3.0, "convention": "diffusers"}

    out, grid = tmp_path / "s.safetensors", tmp_path / "s.png"
    code, printed, _ = _run(
        ["sample", *model, "--solver", bns, "--num", 4, "--out", out, "--grid", grid, *quick], capsys
    )
    assert code == 0 and grid.stat().st_size > 0 and "NFE 4" in printed
    from safetensors.torch import load_file

    saved = load_file(out)
    assert saved["samples"].shape == (4, 4, 8, 8) and saved["labels"].max() < 3

    # another prompt set or another guidance scale: the cache is refused, in one line, nothing written
    other = tmp_path / "other.txt"
    other.write_text("a red dog\n")
    for change in (["--prompts", other], ["--guidance", 2]):
        argv = [*train, "--iterations", 1, "--out", tmp_path / "x.safetensors", *quick]
        i = argv.index(change[0])
        argv[i + 1] = change[1]
        code, _, err = _run(argv, capsys)
        assert code == 2 and err.count("error") == 1 and "holds ground truth for another" in err.splitlines()[-1]
        assert ("prompts 3" in err) if change[0] == "--prompts" else ("guidance" in err)
        assert not (tmp_path / "x.safetensors").exists()
    # a solver file trained at W refuses W' unless forced
    at_two = ["sample", "--model", f"diffusers:{folders[kind]}", "--prompts", prompt_file, "--guidance", 2]
    code, _, err = _run([*at_two, "--solver", bns, "--num", 2, "--out", tmp_path / "y.safetensors", *quick], capsys)
    assert code == 2 and "trained at guidance w=3" in err and not (tmp_path / "y.safetensors").exists()
    forced = [*at_two, "--solver", bns, "--num", 2, "--out", tmp_path / "y.safetensors", "--force", *quick]
    code, _, err = _run(forced, capsys)
    assert code == 0 and "warning" in err and (tmp_path / "y.safetensors").exists()


# --- bad input: one line, exit 2, nothing written ---------------------------------------------------


def _broken(folders, tmp_path, edit):
    folder = tmp_path / "broken"
    shutil.copytree(folders["sd"], folder)
    edit(folder)
    return folder


def _drop(part):
    def edit(folder):
        shutil.rmtree(folder / part)
        index = json.loads((folder / "model_index.json").read_text())
        index[part] = [None, None]
        (folder / "model_index.json").write_text(json.dumps(index))

    return edit


def _rename(cls):
    def edit(folder):
        index = json.loads((folder / "model_index.json").read_text())
        index["_class_name"] = cls
        (folder / "model_index.json").write_text(json.dumps(index))

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (_drop("text_encoder"), "has no text encoder"),
        (_drop("vae"), "has no VAE"),
        (_rename("FluxPipeline"), "FluxPipeline is not supported: its transformer takes packed"),
        (_rename("KandinskyPipeline"), "not a supported text-to-image pipeline"),
    ],
)
def test_bad_pipeline_folders_are_refused(folders, prompt_file, tmp_path, capsys, edit, message):
    folder = _broken(folders, tmp_path, edit)
    out = tmp_path / "gt"
    argv = ["gt", "--model", f"diffusers:{folder}", "--prompts", prompt_file, "--num", 8, "--out", out]
    code, _, err = _run(argv, capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and not out.exists()


def test_bad_prompt_input_is_refused(folders, prompt_file, tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    sample = ["sample", "--solver", "euler", "--nfe", 2, "--num", 2, "--out", out]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (["--model", f"diffusers:{folders['sd']}", "--prompts", empty], "holds no prompts"),
        (["--model", f"diffusers:{folders['sd']}"], "is a text-to-image model: give its prompts with --prompts"),
        (["--model", "zoo:digits-ot", "--prompts", prompt_file], "takes no text prompts"),
        (["--model", f"diffusers:{folders['sd']}", "--negative-prompt", "x"], "--negative-prompt goes with --prompts"),
        (["--model", f"diffusers:{folders['sd']}", "--prompts", tmp_path / "missing.txt"], "no such file"),
    ]
    for model, message in cases:
        code, _, err = _run([*sample, *model], capsys)
        assert code == 2 and message in err.splitlines()[-1] and err.count("error") == 1, err
        assert not out.exists()


def test_a_prompt_longer_than_the_tokenizer_limit_is_truncated_with_a_warning(folders, tmp_path, capsys):
    prompts = tmp_path / "long.txt"
    prompts.write_text("a red dog\n" + " ".join(["a photo of cat"] * 8) + "\n")  # 34 tokens > 16
    out = tmp_path / "s.safetensors"
    argv = ["sample", "--model", f"diffusers:{folders['sd']}", "--prompts", prompts, "--solver", "euler"]
    code, _, err = _run([*argv, "--nfe", 2, "--num", 2, "--out", out, "--quiet"], capsys)
    assert code == 0 and out.exists()
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "prompt 2 has 34 tokens, more than tokenizer's limit of 16" in warning[0]


# --- the bundled text-to-image model --------------------------------------------------------------


def test_zoo_digits_t2i_is_a_pipeline_folder_that_follows_its_prompts():
    from bespoke.zoo.pretrained import T2I_NAME, WEIGHTS_DIR

    prompts = ["a handwritten three", "a handwritten seven"]
    flow = bespoke.load_model("zoo:digits-t2i", prompts=prompts)
    assert flow.guidance.weight == 3.0 and flow.guidance.convention == "diffusers"  # its default
    same = bespoke.load_model(f"diffusers:{WEIGHTS_DIR / T2I_NAME}", prompts=prompts, guidance=3.0)
    assert same.fingerprint == flow.fingerprint
    labels = torch.tensor([0, 1] * 8)
    noise = bespoke.draw_noise(flow.sample_shape, 16, seed=0, dtype=torch.float64)
    pictures = flow.decode(bespoke.solver("dpm++2m", 12).sample(flow, noise, labels=labels))
    assert pictures.shape == (16, 1, 16, 16)
    accuracy = bespoke.class_accuracy(pictures, torch.tensor([3, 7] * 8))
    assert accuracy >= 0.8, accuracy  # the prompt decides the digit
