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
    "ZImagePipeline": ("z_image", "ZImageTask"),
    "QwenImagePipeline": ("qwen_image", "QwenImageTask"),
    "Flux2KleinPipeline": ("flux2", "Flux2KleinTask"),
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
        return flow_task_class(class_name)(args)


make_flow_task = FlowFamilies()
