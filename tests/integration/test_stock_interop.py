"""Folders our schedulers write, read by diffusers alone, and by us again.

Each class saves a config of its diffusers counterpart (ZTSNR, parameterization, trailing) with our settings
under ``_ztsnr_config``. A Python process that cannot import this package (a meta-path finder refuses it, and
the process shows that ``import diffusers_ztsnr`` raises) loads every folder with the diffusers class and
samples it in the tiny SD 1.5 pipeline; a pipeline folder saved with our scheduler set fails there with an
error naming the package; one saved after ``to_stock()`` loads and samples. Our classes restore our settings
from the same folders. The subprocess runs once per module (about 15 s); the tests read its report.
"""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

from diffusers_ztsnr import ZTSNRDPMSolverMultistepScheduler, ZTSNRFlowMatchScheduler
from diffusers_ztsnr.schedulers.stock import OWN_SETTINGS_KEY, stock_keywords
from diffusers_ztsnr.testing.tiny import make_tiny_pipeline
from tests.oracle_utils import VP_CLASSES

ZTSNR_V_LOGSNR = dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="logsnr")
# settings diffusers' FlowMatchEulerDiscreteScheduler has no key for (Euler is its only rule)
FLOW_OWN = dict(shift=3.0, solver_order=1, epsilon_zero_snr_clamp=1e-3)
FLOW_V = dict(shift=3.0, prediction_type="v_prediction")
STEPS = 4

# Runs in a fresh interpreter (python -I): diffusers only. argv[1]: JSON {"vp": {name: folder}, "flow": {...},
# "ours_pipeline": folder, "stock_pipeline": folder}. Prints one JSON report.
STOCK_ONLY = r'''
import importlib.abc, inspect, json, logging, sys, warnings


class NoPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "diffusers_ztsnr":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoPackage())
try:
    import diffusers_ztsnr  # noqa: F401
    package_importable = True
except ImportError:
    package_importable = False

import numpy as np
import torch
import diffusers

records = []
handler = logging.Handler(logging.WARNING)
handler.emit = lambda record: records.append(record.getMessage())
logging.getLogger("diffusers").addHandler(handler)
args = json.loads(sys.argv[1])
report = {"package_importable": package_importable, "vp": {}, "flow": {}}


def load(folder):
    """The counterpart named in the folder, loaded from it; what diffusers warned of meanwhile (its logger,
    and Python warnings other than numpy's DeprecationWarning inside diffusers' own Euler ancestral code)."""
    records.clear()
    class_name = json.load(open(f"{folder}/scheduler/scheduler_config.json"))["_class_name"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scheduler = getattr(diffusers, class_name).from_pretrained(folder, subfolder="scheduler")
    return scheduler, records + [str(w.message) for w in caught if w.category is not DeprecationWarning]


def describe(scheduler, noise):
    scheduler.set_timesteps(4)
    timesteps = scheduler.timesteps.tolist()
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # the flow sampler has neither
    scale = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters  # UniPC's step takes none
    kwargs = dict(generator=torch.Generator().manual_seed(0)) if takes_generator else {}
    for t in scheduler.timesteps:
        model_output = 0.1 * scale(x, t)
        x = scheduler.step(model_output, t, x, **kwargs).prev_sample
    config = {k: v for k, v in scheduler.config.items() if not k.startswith("_") or k == "_ztsnr_config"}
    return dict(class_name=type(scheduler).__name__, config=config, timesteps=timesteps,
                loop_finite=bool(torch.isfinite(x).all()))


pipe = diffusers.DiffusionPipeline.from_pretrained(args["stock_pipeline"])
pipe.set_progress_bar_config(disable=True)
noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
report["stock_pipeline"] = dict(describe(pipe.scheduler, noise), pipeline=type(pipe).__name__)


def run(pipe):
    return pipe("a cat", num_inference_steps=3, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


report["stock_pipeline"]["image_finite"] = bool(np.isfinite(run(pipe)).all())
for name, folder in args["vp"].items():
    scheduler, messages = load(folder)
    report["vp"][name] = dict(describe(scheduler, noise), warnings=messages)
    pipe.scheduler = scheduler
    image = run(pipe)
    report["vp"][name].update(image_finite=bool(np.isfinite(image).all()), image_std=float(image.std()),
                              pipeline_timesteps=scheduler.timesteps.tolist())
for name, folder in args["flow"].items():
    scheduler, messages = load(folder)
    report["flow"][name] = dict(describe(scheduler, noise), warnings=messages)
try:
    diffusers.DiffusionPipeline.from_pretrained(args["ours_pipeline"])
    report["ours_pipeline_error"] = None
except Exception as error:
    report["ours_pipeline_error"] = f"{type(error).__name__}: {error}"
print("REPORT " + json.dumps(report))
'''


def _save(scheduler, folder):
    scheduler.save_pretrained(folder / "scheduler")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("stock_interop")
    vp = {cls.__name__: _save(cls(**ZTSNR_V_LOGSNR), root / cls.__name__) for cls in VP_CLASSES}
    flow = {"own": _save(ZTSNRFlowMatchScheduler(**FLOW_OWN), root / "flow_own"),
            "v_prediction": _save(ZTSNRFlowMatchScheduler(**FLOW_V), root / "flow_v")}
    pipe = make_tiny_pipeline("sd15")
    pipe.scheduler = ZTSNRDPMSolverMultistepScheduler.from_config(pipe.scheduler.config, **ZTSNR_V_LOGSNR)
    pipe.save_pretrained(str(root / "ours_pipeline"), safe_serialization=True)
    pipe.scheduler = pipe.scheduler.to_stock()
    pipe.save_pretrained(str(root / "stock_pipeline"), safe_serialization=True)
    return dict(vp=vp, flow=flow, ours_pipeline=root / "ours_pipeline", stock_pipeline=root / "stock_pipeline")


@pytest.fixture(scope="module")
def stock_report(folders, tmp_path_factory):
    """What a process with diffusers but without this package makes of the folders."""
    workdir = tmp_path_factory.mktemp("stock_only")
    script = workdir / "stock_only.py"
    script.write_text(STOCK_ONLY, encoding="utf-8")
    args = json.dumps({k: {n: str(p) for n, p in v.items()} if isinstance(v, dict) else str(v)
                       for k, v in folders.items()})
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-I", str(script), args], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("REPORT "):])


def _saved(folder) -> dict:
    return json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))


def test_the_stock_process_cannot_import_the_package(stock_report):
    assert stock_report["package_importable"] is False


@pytest.mark.parametrize("cls", VP_CLASSES, ids=lambda c: c.__name__)
def test_vp_folder_is_a_config_of_the_diffusers_counterpart(cls, folders):
    saved = _saved(folders["vp"][cls.__name__])
    stock = stock_keywords(cls.stock_class)
    assert saved["_class_name"] == cls.stock_class.__name__
    assert {k for k in saved if not k.startswith("_")} <= set(stock)  # nothing diffusers would warn about
    assert saved["timestep_spacing"] == "trailing" and saved["rescale_betas_zero_snr"] is True
    assert saved["prediction_type"] == "v_prediction"
    assert saved[OWN_SETTINGS_KEY]["timestep_spacing"] == "logsnr"
    assert saved.get("clip_sample", False) is False and saved.get("thresholding", False) is False


@pytest.mark.parametrize("cls", VP_CLASSES, ids=lambda c: c.__name__)
def test_diffusers_alone_samples_the_vp_folder_with_ztsnr_v_trailing(cls, stock_report):
    result = stock_report["vp"][cls.__name__]
    assert result["class_name"] == cls.stock_class.__name__
    assert result["warnings"] == []
    config = result["config"]
    assert config["rescale_betas_zero_snr"] is True and config["prediction_type"] == "v_prediction"
    assert config["timestep_spacing"] == "trailing" and config[OWN_SETTINGS_KEY]["timestep_spacing"] == "logsnr"
    assert result["timesteps"] == [999, 749, 499, 249]
    assert result["pipeline_timesteps"] == [999, 666, 332]  # diffusers' trailing grid at 3 steps
    assert result["loop_finite"] and result["image_finite"] and result["image_std"] > 0


@pytest.mark.parametrize("cls", VP_CLASSES, ids=lambda c: c.__name__)
def test_our_class_restores_logsnr_from_the_folder(cls, folders):
    folder = folders["vp"][cls.__name__]
    fresh = cls(**ZTSNR_V_LOGSNR)
    fresh.set_timesteps(STEPS)
    stock = cls.stock_class.from_pretrained(folder, subfolder="scheduler")
    for loaded in (cls.from_pretrained(folder, subfolder="scheduler"), cls.from_config(stock.config)):
        assert type(loaded) is cls and loaded.config.timestep_spacing == "logsnr"
        assert OWN_SETTINGS_KEY not in loaded.config
        loaded.set_timesteps(STEPS)
        assert torch.equal(loaded.timesteps, fresh.timesteps) and loaded.timesteps.tolist()[0] == 999
    # an explicit keyword, or a stock key changed since the save, wins over the kept setting
    assert cls.from_config(stock.config, timestep_spacing="flow").config.timestep_spacing == "flow"
    changed = cls.stock_class.from_config(stock.config, timestep_spacing="linspace")
    assert cls.from_config(changed.config).config.timestep_spacing == "linspace"


def test_flow_folder_keeps_what_diffusers_cannot_hold(folders, stock_report):
    saved = _saved(folders["flow"]["own"])
    assert saved["_class_name"] == "FlowMatchEulerDiscreteScheduler" and saved["shift"] == 3.0
    assert saved[OWN_SETTINGS_KEY] == dict(solver_order=1, epsilon_zero_snr_clamp=1e-3,
                                           prediction_type="flow_prediction", timestep_spacing="logsnr",
                                           use_pipeline_sigmas=True, final_step="first_order")
    result = stock_report["flow"]["own"]
    assert result["class_name"] == "FlowMatchEulerDiscreteScheduler" and result["warnings"] == []
    assert result["loop_finite"]
    ours = ZTSNRFlowMatchScheduler.from_pretrained(folders["flow"]["own"], subfolder="scheduler")
    assert {k: ours.config[k] for k in FLOW_OWN} == FLOW_OWN
    assert ours.config.timestep_spacing == "logsnr" and ours.config.use_pipeline_sigmas
    # diffusers samples the folder on its own grid, which is ours with timestep_spacing="linspace"
    linspace = ZTSNRFlowMatchScheduler.from_pretrained(folders["flow"]["own"], subfolder="scheduler",
                                                       timestep_spacing="linspace")
    linspace.set_timesteps(STEPS)
    np.testing.assert_allclose(result["timesteps"], linspace.timesteps.tolist(), rtol=1e-6)
    assert result["timesteps"][0] == 1000.0


def test_flow_prediction_type_diffusers_cannot_hold_is_not_hidden(folders, stock_report):
    """diffusers' flow sampler takes every model output as a velocity: a v_prediction stays a public key, so
    diffusers warns that it ignores it rather than sampling the model silently wrong."""
    assert _saved(folders["flow"]["v_prediction"])["prediction_type"] == "v_prediction"
    messages = stock_report["flow"]["v_prediction"]["warnings"]
    assert any("prediction_type" in m and "will be ignored" in m for m in messages)
    loaded = ZTSNRFlowMatchScheduler.from_pretrained(folders["flow"]["v_prediction"], subfolder="scheduler")
    assert loaded.config.prediction_type == "v_prediction"


def test_pipeline_folder_with_our_scheduler_fails_without_the_package_naming_it(folders, stock_report):
    index = json.loads((folders["ours_pipeline"] / "model_index.json").read_text(encoding="utf-8"))
    assert index["scheduler"] == ["diffusers_ztsnr", "ZTSNRDPMSolverMultistepScheduler"]
    assert stock_report["ours_pipeline_error"] is not None and "diffusers_ztsnr" in stock_report["ours_pipeline_error"]
    # where the package is imported, it loads with our scheduler and our settings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = DiffusionPipeline.from_pretrained(str(folders["ours_pipeline"]))
    assert type(pipe.scheduler) is ZTSNRDPMSolverMultistepScheduler
    assert pipe.scheduler.config.timestep_spacing == "logsnr"


def test_to_stock_pipeline_folder_loads_in_diffusers_alone(folders, stock_report):
    index = json.loads((folders["stock_pipeline"] / "model_index.json").read_text(encoding="utf-8"))
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    result = stock_report["stock_pipeline"]
    assert result["pipeline"] == "StableDiffusionPipeline" and result["class_name"] == "DPMSolverMultistepScheduler"
    assert result["config"]["rescale_betas_zero_snr"] is True and result["config"]["prediction_type"] == "v_prediction"
    assert result["timesteps"] == [999, 749, 499, 249] and result["loop_finite"] and result["image_finite"]
    # here, our class takes our settings back from the loaded pipeline's scheduler config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = DiffusionPipeline.from_pretrained(str(folders["stock_pipeline"]))
    assert type(pipe.scheduler) is DPMSolverMultistepScheduler
    ours = ZTSNRDPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    assert ours.config.timestep_spacing == "logsnr" and ours.schedule.is_zero_terminal_snr


def test_to_stock_is_the_counterpart_as_saved():
    for scheduler in (ZTSNRDPMSolverMultistepScheduler(**ZTSNR_V_LOGSNR), ZTSNRFlowMatchScheduler(**FLOW_OWN)):
        stock = scheduler.to_stock()
        assert type(stock) is scheduler.stock_class
        ours, theirs = json.loads(scheduler.to_json_string()), json.loads(stock.to_json_string())
        assert all(theirs[key] == value for key, value in ours.items())  # theirs adds the stock defaults
