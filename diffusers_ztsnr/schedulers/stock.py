"""Where our schedulers meet diffusers' own ("stock") classes: the keywords of a stock scheduler they accept,
and the ``scheduler_config.json`` they write. The conventions are stated in :mod:`diffusers_ztsnr.schedulers.interop`.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection, Mapping
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
    "final_step": None,  # our multistep samplers' last step; a one-step sampler's last step is its own, as solver_order
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

# Our values of diffusers keys that diffusers' classes reject, and the value written in their place: one the
# stock class samples the same model correctly with (the zero-SNR start is kept).
STAND_INS: dict[str, dict[Any, Any]] = {
    "timestep_spacing": {"logsnr": "trailing", "logsnr_warped": "trailing", "flow": "trailing"}}

# The private key of scheduler_config.json that holds what a stock key cannot: diffusers drops "_" keys from a
# class's arguments without a warning and keeps them in ``config``, so they survive a stock load and save.
OWN_SETTINGS_KEY = "_ztsnr_config"


def stand_in(key: str, value: Any) -> Any:
    """The value written to the stock key ``key`` for our ``value``."""
    return STAND_INS[key].get(value, value) if key in STAND_INS else value


def stock_keywords(stock_class: type) -> dict[str, Any]:
    """``{name: default}`` of the keyword arguments of ``stock_class.__init__``."""
    parameters = inspect.signature(stock_class.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}


#: the scheduler of this package that honours a key's non-inert value, where there is one
HONOURED_BY = {"use_flow_sigmas": "ZTSNRFlowMatchScheduler (this config samples a flow-matching model)"}


def cannot_honour(owner: type, key: str, value: Any, allowed: Any) -> ValueError:
    other = HONOURED_BY.get(key, "a scheduler that supports it")
    return ValueError(
        f"{owner.__name__} cannot honour the config key {key}={value!r}: set {key}={allowed!r} or use {other}."
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


def to_stock_config(
    saved: Mapping[str, Any], stock_class: type, own_keys: Collection[str], stock_assumes: Mapping[str, Any]
) -> dict[str, Any]:
    """Our serialized config ``saved`` as ``stock_class`` reads it: ``_class_name`` the stock class; its keys
    with values it accepts (``STAND_INS``; the no-op value of every key whose default is not one, such as
    DDIM's ``clip_sample``); our settings it cannot hold under ``OWN_SETTINGS_KEY``. A setting of ours that
    changes what the model output means, where the stock class assumes one without a key
    (``stock_assumes``), stays a public key: diffusers then warns that it ignores it."""
    stock = stock_keywords(stock_class)
    out = {k: v for k, v in saved.items() if k.startswith("_")}
    out["_class_name"] = stock_class.__name__
    own_settings = {}
    for key in own_keys:
        value = saved[key]
        if key in stock:
            out[key] = stand_in(key, value)
            if out[key] != value:
                own_settings[key] = value
        elif key in stock_assumes and value != stock_assumes[key]:
            out[key] = value
        else:
            own_settings[key] = value
    for key in stock:
        if key not in out and FOREIGN_CONFIG_KEYS.get(key) is not None:
            out[key] = FOREIGN_CONFIG_KEYS[key]
    out[OWN_SETTINGS_KEY] = own_settings
    return out


def restore_own_settings(
    config: Mapping[str, Any], own_keys: Collection[str], overrides: Collection[str]
) -> dict[str, Any]:
    """``config`` with the settings under ``OWN_SETTINGS_KEY`` put back (and that key removed): those that are
    parameters of the loading class (``own_keys``), not passed explicitly (``overrides``), and whose stock key
    still holds the stand-in written for them (a value changed since, e.g. through a stock class, wins)."""
    config = dict(config)
    settings = config.pop(OWN_SETTINGS_KEY, None) or {}
    if not isinstance(settings, Mapping):
        raise ValueError(f"the config key {OWN_SETTINGS_KEY} must be a mapping of settings, got {settings!r}.")
    for key, value in settings.items():
        written = stand_in(key, value)
        if key in own_keys and key not in overrides and config.get(key, written) == written:
            config[key] = value
    return config
