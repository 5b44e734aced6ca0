"""The model card (README.md of the output folder, pushed to the Hub) is built through the scripts' own
``model_card`` methods and parsed back the way the Hub and Python read it: user strings cannot escape their
context, and what the card says matches the run."""

import argparse
import ast
import html
import re

import pytest
import torch
import yaml
from huggingface_hub.repocard import REGEX_YAML_BLOCK
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers_ztsnr.training import flow, unet
from tests.train_utils import tiny_assets

BASE_TAGS = ["lora", "diffusers", "text-to-image", "diffusers-ztsnr"]
HOSTILE_BASE_MODELS = [
    "a: b",
    "x\nlicense: mit",
    '"quoted"',
    "#hash",
    "x\n---\nlicense: mit\n---\n",
    "<script>alert(1)</script>",
    "[link](javascript:alert(1)) *em* `code` _u_ \\ &amp; ~~s~~ | x",
]
HOSTILE_PROMPTS = [
    '"); import os; ("',
    "a photo\n```\n<script>alert(1)</script>\n```python\nimport os",
    "<script>alert(1)</script>",
    "it's a 'quoted' \"photo\" \\",
    "line\r\nbreak\u2028sep",
]
FENCE_LINE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)")


pytestmark = pytest.mark.usefixtures("quiet_loading")  # diffusers' and transformers' loading chatter


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("card"), "sd15", "sd3", "flux", num_images=1)


@pytest.fixture(scope="module")
def make_card(assets):
    """``make_card(kind, *flags, **overrides)``: the card the script's task writes for a run on the tiny ``kind``
    model with ``flags``, with ``overrides`` (e.g. a hostile ``pretrained_model_name_or_path``) in the args it is
    handed. Each (kind, flags) model is loaded once."""
    built = {}

    def build(kind, *flags, steps=7, grid_name="samples.png", **overrides):
        script = flow if kind in ("sd3", "flux") else unet
        if (kind, flags) not in built:
            args = script.parse_args(["--pretrained_model_name_or_path", str(assets[kind]), "--train_data_dir",
                                      str(assets["data"]), "--output_dir", str(assets["data"].parent / "out"),
                                      "--resolution", "32", *flags])
            task = script.UNetTask(args) if script is unet else script.FlowTask(args)
            built[kind, flags] = task, args
        task, args = built[kind, flags]
        return task.model_card(argparse.Namespace(**{**vars(args), **overrides}), steps, grid_name)

    build.built = built
    return build


# --- reading a card back ----------------------------------------------------------------------------------


def split_card(card):
    """``(front matter as yaml.safe_load reads it, the YAML text, the Markdown after it)``, split with the Hub
    client's own front-matter pattern."""
    match = REGEX_YAML_BLOCK.search(card)
    assert match is not None and match.start() == 0, card[:200]
    return yaml.safe_load(match.group(2)), match.group(2), card[match.end():]


def markdown_lines(markdown):
    return re.split(r"\r\n|\r|\n", markdown)


def markdown_blocks(markdown):
    """``(prose lines, [(info string, code), ...])`` by CommonMark's fenced-code rules (backtick and tilde
    fences; a block closes at a fence line of the same character at least as long)."""
    prose, blocks, fence = [], [], None
    for line in markdown_lines(markdown):
        if fence is None:
            match = FENCE_LINE.match(line)
            if match and not (match.group(1)[0] == "`" and "`" in match.group(2)):
                fence, info, code = match.group(1), match.group(2).strip(), []
            else:
                prose.append(line)
        elif re.fullmatch(rf" {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}[ \t]*", line):
            blocks.append((info, "\n".join(code)))
            fence = None
        else:
            code.append(line)
    assert fence is None, "a fenced block runs to the end of the card"
    return prose, blocks


def fence_line_count(markdown):
    return sum(1 for line in markdown_lines(markdown) if FENCE_LINE.match(line))


def code_spans(line):
    """The contents of a line's code spans, as CommonMark shows them."""
    spans = []
    for match in CODE_SPAN.finditer(line):
        text = match.group(2)
        if len(text) > 1 and text[0] == text[-1] == " " and text.strip():
            text = text[1:-1]
        spans.append(text)
    return spans


def prose_text(markdown):
    """The Markdown outside fenced blocks and code spans: where HTML and Markdown syntax are live."""
    prose, _ = markdown_blocks(markdown)
    return "\n".join(CODE_SPAN.sub("", line) for line in prose)


def shown_text(markdown_line):
    """What a line of escaped prose displays: backslash escapes and entity references resolved, in one pass."""
    return re.sub(r"\\([!-/:-@\[-`{-~])|(&#?\w+;)",
                  lambda m: m.group(1) if m.group(1) is not None else html.unescape(m.group(2)), markdown_line)


def python_blocks(card):
    _, _, markdown = split_card(card)
    return [ast.parse(code) for info, code in markdown_blocks(markdown)[1] if info == "python"]


def sampling_call(card):
    """The snippet's ``pipe(...)`` call as ``(positional values, keyword values)``, after checking that the
    snippet imports only diffusers and this package."""
    snippet = python_blocks(card)[0]
    imported = {node.module for node in ast.walk(snippet) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(snippet) if isinstance(node, ast.Import) for alias in node.names}
    assert imported == {"diffusers", "diffusers_ztsnr"}
    calls = [node for node in ast.walk(snippet)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "pipe"]
    assert len(calls) == 1
    return ([ast.literal_eval(a) for a in calls[0].args],
            {k.arg: ast.literal_eval(k.value) for k in calls[0].keywords})


def base_model_in_snippet(card):
    snippet = python_blocks(card)[0]
    (call,) = [node for node in ast.walk(snippet) if isinstance(node, ast.Call)
               and isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained"
               and isinstance(node.func.value, ast.Name) and node.func.value.id.endswith("Pipeline")]
    return ast.literal_eval(call.args[0])


def title(markdown):
    (line,) = [line for line in markdown_lines(markdown) if line.startswith("# ")]
    return shown_text(line[2:])


CARD_KINDS = [("sd15", (), BASE_TAGS),
              ("sd15", ("--prediction_type", "v_prediction", "--zero_terminal_snr"),
               BASE_TAGS + ["v-prediction", "zero-terminal-snr"]),
              ("sd3", (), BASE_TAGS + ["flow-matching"])]


# --- front matter -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("base_model", HOSTILE_BASE_MODELS)
@pytest.mark.parametrize("kind,flags,tags", CARD_KINDS)
def test_front_matter_reads_back_as_exactly_the_intended_metadata(make_card, kind, flags, tags, base_model):
    card = make_card(kind, *flags, pretrained_model_name_or_path=base_model)
    metadata, _, markdown = split_card(card)
    # none of these is a Hub id: the card names them, its metadata does not (the Hub validates base_model)
    assert metadata == {"library_name": "diffusers", "pipeline_tag": "text-to-image", "license": "other",
                        "license_name": "base-model-license", "tags": tags}
    assert title(markdown) == "LoRA for " + " ".join(base_model.splitlines())
    assert base_model_in_snippet(card) == base_model


@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_base_model_and_license_metadata_follow_where_the_base_comes_from(make_card, assets, kind):
    hub_id = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    metadata, _, markdown = split_card(make_card(kind, pretrained_model_name_or_path=hub_id))
    assert metadata["base_model"] == hub_id and metadata["pipeline_tag"] == "text-to-image"
    assert (metadata["license"], metadata["license_link"]) == ("other", f"https://huggingface.co/{hub_id}")
    assert "License: the base model's" in markdown
    local, _, _ = split_card(make_card(kind, pretrained_model_name_or_path=str(assets[kind])))
    assert "base_model" not in local and "license_link" not in local  # a local folder is no Hub id
    chosen, _, markdown = split_card(make_card(kind, pretrained_model_name_or_path=hub_id, license="apache-2.0"))
    assert chosen["license"] == "apache-2.0" and "license_name" not in chosen and "License: `apache-2.0`." in markdown


@pytest.mark.parametrize("kind,flags,tags", CARD_KINDS)
def test_tag_list_has_one_tag_per_line_and_nothing_else(make_card, kind, flags, tags):
    _, yaml_text, _ = split_card(make_card(kind, *flags))
    assert yaml_text.split("tags:\n", 1)[1].split("\n") == [f"- {tag}" for tag in tags]


@settings(max_examples=60, deadline=None)
@given(base_model=st.text(min_size=1, max_size=40), prompt=st.text(min_size=1, max_size=40))
def test_any_base_model_and_prompt_read_back_unchanged(make_card, base_model, prompt):
    for kind in ("sd15", "sd3"):
        card = make_card(kind, pretrained_model_name_or_path=base_model, validation_prompt=prompt)
        metadata, _, markdown = split_card(card)
        assert metadata.get("base_model", base_model) == base_model
        assert title(markdown) == "LoRA for " + " ".join(base_model.splitlines())
        assert base_model_in_snippet(card) == base_model and sampling_call(card)[0] == [prompt]


# --- code and Markdown ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", HOSTILE_PROMPTS)
@pytest.mark.parametrize("kind,flags", [("sd15", ("--prediction_type", "v_prediction", "--zero_terminal_snr",
                                                  "--objective", "flow")),
                                        ("sd3", ())])
def test_prompt_stays_one_string_literal_in_the_snippet(make_card, kind, flags, prompt):
    benign = make_card(kind, *flags, validation_prompt="a red disc")
    card = make_card(kind, *flags, validation_prompt=prompt)
    positional, _ = sampling_call(card)
    assert positional == [prompt]
    assert len(python_blocks(card)) == len(python_blocks(benign))  # the UNet flow note's block stays a block
    markdown = split_card(card)[2]
    assert fence_line_count(markdown) % 2 == 0 and fence_line_count(markdown) == fence_line_count(
        split_card(benign)[2])
    assert "<script" not in prose_text(markdown).lower()


@pytest.mark.parametrize("base_model", HOSTILE_BASE_MODELS)
@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_base_model_is_inert_text_in_the_markdown(make_card, kind, base_model):
    markdown = split_card(make_card(kind, pretrained_model_name_or_path=base_model))[2]
    assert "<script" not in prose_text(markdown).lower()
    assert fence_line_count(markdown) == fence_line_count(split_card(make_card(kind))[2])


@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_markdown_renders_user_strings_as_plain_text(make_card, kind):
    markdown_it = pytest.importorskip("markdown_it")
    renderer = markdown_it.MarkdownIt("commonmark", {"html": True})
    for base_model in HOSTILE_BASE_MODELS:
        for prompt in HOSTILE_PROMPTS:
            card = make_card(kind, pretrained_model_name_or_path=base_model, validation_prompt=prompt)
            markdown = split_card(card)[2]
            assert "<script" not in renderer.render(markdown)
            tokens = renderer.parse(markdown)
            heading = tokens[[t.type for t in tokens].index("heading_open") + 1]
            assert [child.type for child in heading.children] == ["text"]
            assert heading.content and heading.children[0].content == "LoRA for " + " ".join(
                base_model.splitlines())
            assert [t.info for t in tokens if t.type == "fence"] == [
                t.info for t in renderer.parse(split_card(make_card(kind))[2]) if t.type == "fence"]


def test_flow_lora_layers_show_exactly_in_their_code_span(make_card):
    layers = ("attn.to_q", "`x`", "a``b", "<script>alert(1)</script>")
    card = make_card("sd3", "--lora_layers", ",".join(layers))
    markdown = split_card(card)[2]
    (rank_line,) = [line for line in markdown_lines(markdown) if line.startswith("Rank ")]
    assert code_spans(rank_line)[0] == ",".join(layers)
    assert "<script" not in prose_text(markdown).lower()


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_flow_snippet_passes_guidance_only_to_guidance_distilled_transformers(make_card, kind):
    card = make_card(kind, validation_prompt='say "hi"')
    task, _ = make_card.built[kind, ()]
    positional, keywords = sampling_call(card)
    assert positional == ['say "hi"']
    keywords.pop("max_sequence_length", None)  # the test below
    assert keywords == ({} if task.guidance is None else {"guidance_scale": task.guidance})


@pytest.mark.parametrize(("kind", "flags", "length"), [
    ("sd3", (), 77),  # the script's SD3 default (diffusers' SD3 LoRA example's); StableDiffusion3Pipeline's is 256
    ("sd3", ("--max_sequence_length", "256"), None),
    ("flux", (), None),  # 512, FluxPipeline's default
    ("flux", ("--max_sequence_length", "64"), 64),
])
def test_flow_snippet_samples_at_the_trained_sequence_length(make_card, kind, flags, length):
    card = make_card(kind, *flags)
    (code,) = [code for info, code in markdown_blocks(split_card(card)[2])[1] if info == "python"]
    compile(code, "README.md", "exec")
    assert ("max_sequence_length" in code) == (length is not None)
    assert (f"max_sequence_length={length}" in code) == (length is not None)
    assert sampling_call(card)[1].get("max_sequence_length") == length


# --- true to the run --------------------------------------------------------------------------------------


def fake_unet_lora_state():
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    return {"unet": {f"{module}.lora_A.weight": torch.zeros(4, 32), f"{module}.lora_B.weight": torch.zeros(32, 4)}}


@pytest.mark.parametrize("prediction_type,zsnr", [("epsilon", False), ("v_prediction", False),
                                                  ("v_prediction", True), ("sample", False), ("sample", True)])
def test_unet_card_names_the_sampling_metadata_the_kohya_export_writes(make_card, tmp_path, prediction_type, zsnr):
    flags = ("--prediction_type", prediction_type) + (("--zero_terminal_snr",) if zsnr else ())
    card = make_card("sd15", *flags)
    task, args = make_card.built["sd15", flags]
    kohya = task.save_lora(tmp_path, fake_unet_lora_state(), args)["kohya"]
    with safe_open(str(kohya), "pt") as f:
        written = {k: v for k, v in f.metadata().items() if k in ("modelspec.prediction_type", "ss_zero_terminal_snr",
                                                                  "modelspec.architecture", "ss_v2")}
    assert not {"v_pred", "ztsnr"} & set(load_file(kohya))  # a LoRA's markers are metadata, never tensors
    markdown = split_card(card)[2]
    (kohya_line,) = [line for line in markdown_lines(markdown) if line.startswith("`lora_kohya.safetensors`")]
    spans = code_spans(kohya_line)[1:]
    assert dict(zip(spans[::2], spans[1::2], strict=True)) == written
    # ComfyUI reads no markers from an SD 1.x LoRA: the card names the node settings wherever v or ZTSNR was trained
    assert ("ModelSamplingDiscrete" in card) == (prediction_type == "v_prediction" or zsnr)
    # guidance_rescale counters the brightness of a zero-terminal-SNR model; it is advised for those only
    assert sampling_call(card)[1] == ({"guidance_rescale": 0.7} if zsnr else {})
    assert ("guidance_rescale" in card) == zsnr
    tags = split_card(card)[0]["tags"]
    assert ("v-prediction" in tags) == (prediction_type == "v_prediction")
    assert ("zero-terminal-snr" in tags) == zsnr


def test_epsilon_card_advises_nothing_and_v_ztsnr_card_gives_the_settings(make_card):
    epsilon = make_card("sd15", "--prediction_type", "epsilon")
    assert "ModelSamplingDiscrete" not in epsilon and "guidance_rescale" not in epsilon
    assert "`modelspec.prediction_type` = `epsilon`" in epsilon
    v_ztsnr = make_card("sd15", "--prediction_type", "v_prediction", "--zero_terminal_snr")
    assert "sampling = `v_prediction` and zsnr = `true`" in v_ztsnr and "guidance_rescale=0.7" in v_ztsnr
    assert "`modelspec.prediction_type` = `v`, `ss_zero_terminal_snr` = `True`" in v_ztsnr


def scheduler_loads(card):
    """``{scheduler class: keyword arguments}`` of every ``<Scheduler>.from_pretrained(...)`` / ``<Scheduler>(...)``
    call in the card's Python blocks."""
    loads = {}
    for block in python_blocks(card):
        for node in ast.walk(block):
            if not isinstance(node, ast.Call):
                continue
            func = node.func.value if isinstance(node.func, ast.Attribute) else node.func
            if isinstance(func, ast.Name) and func.id.endswith("Scheduler"):
                loads[func.id] = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    return loads


def test_cards_keep_the_recipe_hyperparameters_and_sampling_setup(make_card):
    unet_card = make_card("sd15", "--prediction_type", "v_prediction", "--zero_terminal_snr", "--objective",
                          "flow", steps=11)
    for text in ("converted from epsilon to v_prediction", "zero-terminal-SNR rescale", "rectified flow",
                 "11 optimizer steps", "![validation samples](samples.png)", "PathTransformedModel.vp_as_flow"):
        assert text in unet_card, text
    assert scheduler_loads(unet_card) == {"ZTSNRUniPCMultistepScheduler": {"subfolder": "scheduler"},
                                          "ZTSNRFlowMatchScheduler": {"shift": 1.0}}
    assert "epsilon on the base schedule" in make_card("sd15")
    flow_card = make_card("sd3", "--weighting_scheme", "cosmap", grid_name=None)
    for text in ("`train_lora_flow.py`", "flow matching", "`cosmap`", "7 optimizer steps",
                 "`modelspec.architecture` = `stable-diffusion-3"):
        assert text in flow_card, text
    assert scheduler_loads(flow_card) == {"ZTSNRFlowMatchScheduler": {"subfolder": "scheduler"}}
    assert "![" not in flow_card
