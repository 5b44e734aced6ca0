"""Which family task trains a base model: read from its ``model_index.json`` ``_class_name``.

``train_lora_flow.py`` trains every flow-transformer family listed in :data:`FLOW_TASKS`; each entry names the
module under :mod:`diffusers_ztsnr.training.families` and the :class:`~diffusers_ztsnr.training.task.ModelTask`
subclass in it, imported only when that family is trained (a family's transformers classes load nothing else).
"""

from __future__ import annotations

import argparse
import importlib

from ..task import ModelTask

#: base pipeline class -> (module in this package, task class)
FLOW_TASKS: dict[str, tuple[str, str]] = {
    "StableDiffusion3Pipeline": ("flow_transformers", "FlowTask"),
    "FluxPipeline": ("flow_transformers", "FlowTask"),
    "FluxKontextPipeline": ("flux_kontext", "FluxKontextTask"),
    "ChromaPipeline": ("chroma", "ChromaTask"),
    "ZImagePipeline": ("z_image", "ZImageTask"),
    "QwenImagePipeline": ("qwen_image", "QwenImageTask"),
    "Flux2KleinPipeline": ("flux2", "Flux2KleinTask"),
    "Flux2Pipeline": ("flux2", "Flux2Task"),
}


def flow_task_class(pipeline_class_name: str) -> type[ModelTask]:
    """The task class that trains ``pipeline_class_name`` (a ``KeyError`` for a family not in :data:`FLOW_TASKS`)."""
    module, name = FLOW_TASKS[pipeline_class_name]
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


class FlowFamilies:
    """``train_lora_flow.py``'s ``make_task``: the task of the base model's family. Its ``pipelines``, ``script``
    and ``other_script_hint`` are what the input checks name when the base model is of no supported family."""

    script = "train_lora_flow.py"
    other_script_hint = "SD 1.x / 2.x / SDXL UNets: use train_lora_unet.py (--objective flow trains them as flows)."

    @property
    def pipelines(self) -> tuple[str, ...]:
        return tuple(FLOW_TASKS)

    def __call__(self, args: argparse.Namespace) -> ModelTask:
        from ..inputs import check_pipeline_class

        class_name = check_pipeline_class(args, self.pipelines, self.script, self.other_script_hint)
        task_class = flow_task_class(class_name)
        check_reference_flags(args, task_class, class_name)
        return task_class(args)


def check_reference_flags(args: argparse.Namespace, task_class: type[ModelTask], class_name: str) -> None:
    """``--cond_image_column`` / ``--validation_image`` only for a family whose task ``takes_reference_image``."""
    from ..config import InputError

    given = [flag for flag in ("cond_image_column", "validation_image") if getattr(args, flag, None)]
    if given and not getattr(task_class, "takes_reference_image", False):
        raise InputError(f"--{given[0]}: a {class_name} takes no reference image (an image-editing pipeline such "
                         f"as FluxKontextPipeline does); drop --{given[0]}.")


make_flow_task = FlowFamilies()
