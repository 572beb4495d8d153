"""Named recipes: ``fp``, ``baseline-wXaY`` (and ``-shared``), ``dgq-wXaY`` (``-g8``/``-g4``),
``dgq-official-wXaY``, and the W4 recipes with learned weight rounding ``dgq-w4aY-adaround`` /
``baseline-w4aY-adaround``; :func:`get_preset` with a did-you-mean for unknown names.

Any recipe can ask for AdaRound weights the same way the ``-adaround`` presets do:
``recipe.replace(weights={"rounding": "adaround"})`` (settings: ``weights={"adaround": {"iters": 500}}``).
"""
from __future__ import annotations

import difflib

from dgq_utils.config.recipe import (
    ActQuantConfig,
    AttentionQuantConfig,
    QuantRecipe,
    WeightQuantConfig,
)

__all__ = [
    "PRESETS",
    "get_preset",
    "list_presets",
]


# ----------------------------------------------------------------------------------------------------------
# presets
# ----------------------------------------------------------------------------------------------------------
_BIT_COMBOS = ((8, 8), (8, 6), (4, 8), (4, 6))


def _baseline(wb: int, ab: int, *, shared: bool = False) -> QuantRecipe:
    return QuantRecipe(
        name=f"baseline-w{wb}a{ab}" + ("-shared" if shared else ""),
        # Same weight quantizer as DGQ (per-channel, MSE range search): the comparison then isolates what DGQ
        # changes -- activation grouping and attention quantization -- instead of mixing in a weight effect
        # that matters at W4. Use .replace(weights={"range_method": "minmax"}) for the plain min-max variant.
        weights=WeightQuantConfig(bits=wb, granularity="per_channel", range_method="mse"),
        activations=ActQuantConfig(
            bits=ab,
            granularity="per_tensor",
            num_groups=1,
            group_range_includes_zero=True,
            range_estimator="ema",
            ema_momentum=0.95,
        ),
        attention=AttentionQuantConfig(
            quantizer="uniform",
            bits=None,
            scale="static",
            keep_start_fp=False,
            keep_start_key_fp=False,
            zero_level=False,
        ),
        per_timestep=not shared,
    )


def _dgq(wb: int, ab: int, *, groups: int = 16, official: bool = False) -> QuantRecipe:
    suffix = "" if groups == 16 else f"-g{groups}"
    act = ActQuantConfig(bits=ab, granularity="group", num_groups=groups, grouping="kmeans", axis="auto",
                         axis_rule="official_spread", group_range_includes_zero=False, range_estimator="minmax")
    att = AttentionQuantConfig(quantizer="log2", scale="per_prompt", keep_start_fp=True, start_in="cross",
                               apply_to="both", keep_start_key_fp=True, zero_level=True)
    recipe = QuantRecipe(
        name=("dgq-official" if official else "dgq") + f"-w{wb}a{ab}{suffix}",
        weights=WeightQuantConfig(bits=wb, granularity="per_channel", range_method="mse"),
        activations=act,
        attention=att,
        per_timestep=True,
        timestep_mapping="exact",
    )
    if official:
        recipe = recipe.replace(
            activations={"conv_input_layout": "unfold", "calibration_upstream": "per_tensor_quantized"},
            attention={"scale": "batch", "zero_level": False},
            timestep_mapping="official",
        )
    return recipe


def _build_presets() -> dict[str, QuantRecipe]:
    presets: dict[str, QuantRecipe] = {"fp": QuantRecipe(name="fp")}
    for wb, ab in _BIT_COMBOS:
        presets[f"baseline-w{wb}a{ab}"] = _baseline(wb, ab)
    for wb, ab in _BIT_COMBOS:
        presets[f"baseline-w{wb}a{ab}-shared"] = _baseline(wb, ab, shared=True)
    for wb, ab in _BIT_COMBOS:
        presets[f"dgq-w{wb}a{ab}"] = _dgq(wb, ab)
    for groups in (8, 4):
        for wb, ab in _BIT_COMBOS:
            presets[f"dgq-w{wb}a{ab}-g{groups}"] = _dgq(wb, ab, groups=groups)
    for wb, ab in _BIT_COMBOS:
        presets[f"dgq-official-w{wb}a{ab}"] = _dgq(wb, ab, official=True)
    for base in ("dgq", "baseline"):  # learned weight rounding where it matters: the 4-bit weights
        for wb, ab in _BIT_COMBOS:
            if wb == 4:
                name = f"{base}-w{wb}a{ab}-adaround"
                presets[name] = presets[f"{base}-w{wb}a{ab}"].replace(name=name, weights={"rounding": "adaround"})
    for key, r in presets.items():
        assert key == r.name, (key, r.name)
    return presets


#: Named recipes; see the module docstring for what each family is.
PRESETS: dict[str, QuantRecipe] = _build_presets()


def list_presets() -> list[str]:
    """Names of the presets, in a logical order (fp, baselines, DGQ, K variants, official variants)."""
    return list(PRESETS)


def get_preset(name: str) -> QuantRecipe:
    """The preset recipe called ``name`` (recipes are frozen, so the shared instance is safe to use)."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(PRESETS), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}.{hint}") from None
