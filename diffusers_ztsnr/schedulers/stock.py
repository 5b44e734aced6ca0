"""Where our schedulers meet diffusers' own ("stock") classes: the keywords and config keys of diffusers
schedulers they accept. The conventions are stated in :mod:`diffusers_ztsnr.schedulers.base`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

# diffusers config keys that some diffusers scheduler has and none of ours needs: the value that
# makes each a no-op. ``None`` means any value is a no-op (it only configures something we replace).
FOREIGN_CONFIG_KEYS: dict[str, Any] = {
    "skip_prk_steps": None,  # PNDM's Runge-Kutta warm-up; we have no PNDM steps to skip
    "clip_sample": False,
    "clip_sample_range": None,
    "thresholding": False,
    "dynamic_thresholding_ratio": None,
    "sample_max_value": None,
    "variance_type": None,  # learned-variance models are sampled from their mean prediction here
    "interpolation_type": "linear",
    "timestep_type": "discrete",
    "sigma_min": None,
    "sigma_max": None,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "lambda_min_clipped": None,
    "euler_at_final": None,
    "lower_order_final": None,  # our multistep rule is first order wherever the second order is undefined
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "flow_shift": None,
    "invert_sigmas": False,
    "stochastic_sampling": False,
    "use_dynamic_shifting": False,
    "base_shift": None,
    "max_shift": None,
    "base_image_seq_len": None,
    "max_image_seq_len": None,
    "shift": 1.0,
    "shift_terminal": None,
    "time_shift_type": None,
    "set_alpha_to_one": None,
    "steps_offset": None,
    "rescale_betas_zero_snr": False,
    "beta_start": None,
    "beta_end": None,
    "beta_schedule": None,
    "trained_betas": None,
    "use_karras_sigmas": False,
    "final_sigmas_type": "zero",
    "solver_order": None,
    "eta": None,  # the ancestral sampler's noise; DDIM takes eta per step
    "algorithm_type": None,
    "solver_type": None,
    "predict_x0": None,
    "solver_p": None,
    "disable_corrector": None,
    "timestep_spacing": None,
    "prediction_type": None,
}

def stock_keywords(stock_class: type) -> dict[str, Any]:
    """``{name: default}`` of the keyword arguments of ``stock_class.__init__``."""
    parameters = inspect.signature(stock_class.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}


def cannot_honour(owner: type, key: str, value: Any, allowed: Any) -> ValueError:
    return ValueError(
        f"{owner.__name__} cannot honour the config key {key}={value!r}: set {key}={allowed!r} "
        "or use a scheduler that supports it."
    )


def check_foreign_keys(owner: type, items: Mapping[str, Any], stock_defaults: Mapping[str, Any]) -> list[str]:
    """Judge config keys or keyword arguments that are not ``owner``'s own parameters: a key of the other
    path (``owner.rejected_config_keys``), or a value that would change sampling, is a ``ValueError``
    naming the key and the value that works; no-op values pass. A keyword of the counterpart that no table
    knows (``stock_defaults``: a newer diffusers) passes at its default only. Returns the keys left unknown."""
    unknown = []
    for key, value in items.items():
        if key in owner.rejected_config_keys:
            raise ValueError(
                f"{owner.__name__} samples the {owner.path} path, but the config key {key}={value!r} belongs to "
                "a scheduler of the other path; pick the scheduler class matching the model."
            )
        if key in FOREIGN_CONFIG_KEYS:
            inert = FOREIGN_CONFIG_KEYS[key]
            if inert is not None and value is not None and value != inert:
                raise cannot_honour(owner, key, value, inert)
        elif key in stock_defaults:
            if value != stock_defaults[key]:
                raise cannot_honour(owner, key, value, stock_defaults[key])
        else:
            unknown.append(key)
    return unknown
