"""Each quantize option is declared once, on QuantRecipe: the `llmc quantize` flags, a profile's
[quantize] keys and types, recipe_from_options and the recipe's dict form all follow from that
declaration. The dict form is what quantized checkpoints store: it round-trips and a malformed one
is a one-line error naming the key."""
from __future__ import annotations

import json
from dataclasses import replace
import re
import subprocess
import sys

import pytest
import typer

from llmc.cli import app, main
from llmc.errors import ConfigError, ModelFormatError, OptionError
from llmc.passes.quant.algorithms import ALGORITHMS, applicable_options, check_recipe
from llmc.profiles import SECTIONS
from llmc.quantized.scheme import (KV_CACHE_DTYPES, QUANTIZE_OPTIONS, SCHEMES, QuantRecipe, quantize_option_types,
                                   recipe_from_options)
from tests.helpers import STORIES

NOT_RECIPE = {"output", "profile", "calib", "fmt", "requantize", "force", "as_json", "help"}   # declared in cli.py
RECORD_KEYS = ["scheme", "algorithm", "kv_cache", "head", "embeddings", "calib_samples", "calib_seqlen", "calib_seed",
               "smooth_alpha", "awq_clip", "weight_observer", "act_observer", "percentile", "imatrix", "sensitivity",
               "target_bpw", "target_size"]  # the stored keys, in order


def _squeeze(text: str) -> str:
    return "".join(text.split())                      # help is wrapped, sometimes at a hyphen


def _quantize_params() -> list:
    command = typer.main.get_command(app).commands["quantize"]
    return command.get_params(typer.Context(command))


def _quantize_help(capsys) -> str:
    main(["quantize", "--help"])
    return capsys.readouterr().out


# ---- (a) the command line --------------------------------------------------------------------

def test_every_declared_option_is_a_flag_with_its_help(capsys):
    help_text = _squeeze(_quantize_help(capsys))
    for option in QUANTIZE_OPTIONS.values():
        assert _squeeze(option.flags.replace("/", " / ")) in help_text, option.name
        assert _squeeze(option.help_text) in help_text, option.name


def test_no_other_recipe_flag_exists():
    params = {p.name: p for p in _quantize_params() if p.param_type_name == "option"}
    assert set(params) == set(QUANTIZE_OPTIONS) | NOT_RECIPE
    for name, option in QUANTIZE_OPTIONS.items():
        p = params[name]
        assert "/".join(p.opts + p.secondary_opts) == option.flags and p.default is None, name


def test_the_help_names_only_flags_that_exist(capsys):
    flags = {f for p in _quantize_params() for f in p.opts + p.secondary_opts} | {"--debug"}
    named = set(re.findall(r"--[a-z][a-z0-9-]*[a-z0-9]", _quantize_help(capsys)))
    assert named <= flags, named - flags


def test_the_cli_starts_without_torch():
    """The recipe options join `llmc quantize` only when it runs or shows its help."""
    code = "import sys, typer, llmc.cli; typer.main.get_command(llmc.cli.app); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_an_unset_flag_is_none_so_the_profile_applies(tmp_path, capsys):
    profile = tmp_path / "p.toml"
    profile.write_text('[quantize]\nscheme = "w4a16"\ngroup_size = 32\nasymmetric = true\n')
    main(["quantize", str(STORIES), "-o", str(tmp_path / "q"), "--profile", str(profile), "--json"])
    weight = json.loads(capsys.readouterr().out)["recipe"]["scheme"]["weight"]
    assert weight["group_size"] == 32 and weight["symmetric"] is False
    main(["quantize", str(STORIES), "-o", str(tmp_path / "s"), "--profile", str(profile), "--symmetric", "--json"])
    assert json.loads(capsys.readouterr().out)["recipe"]["scheme"]["weight"]["symmetric"] is True


# ---- (b) profiles ------------------------------------------------------------------------------

def test_profile_types_are_the_declared_types():
    declared = quantize_option_types()
    assert declared == {"scheme": (str,), "algo": (str,), "group_size": (int,), "asymmetric": (bool,),
                        "two_level_scales": (bool,), "kv_cache": (str,), "head": (str,), "embeddings": (str,), "calib_samples": (int,),
                        "calib_seqlen": (int,), "calib_seed": (int,), "alpha": (float, int),
                        "awq_clip": (bool,), "observer": (str,), "act_observer": (str,), "percentile": (float, int),
                        "imatrix": (bool,), "sensitivity": (bool,), "target_bpw": (float, int), "target_size": (int,)}
    assert {k: v for k, v in SECTIONS["quantize"].items() if k not in ("calib", "format")} == declared


def test_applicable_options_are_declared_options():
    for recipe in _accepted_recipes():
        assert applicable_options(recipe) <= set(QUANTIZE_OPTIONS) | {"calib", "format"}
        assert {"head", "embeddings", "kv_cache"} <= applicable_options(recipe)   # every recipe stores them


# ---- recipe_from_options -------------------------------------------------------------------------

def test_recipe_from_options_takes_the_declared_defaults():
    r = recipe_from_options("w8a16")
    assert r == QuantRecipe(scheme=SCHEMES["w8a16"])
    for field, option in (("algorithm", "algo"), ("calib_samples", "calib_samples"), ("smooth_alpha", "alpha"),
                          ("awq_clip", "awq_clip"), ("weight_observer", "observer"), ("percentile", "percentile")):
        assert getattr(r, field) == QUANTIZE_OPTIONS[option].default


@pytest.mark.parametrize("options, error, needle", [
    (dict(scheme=None), ConfigError, "missing --scheme"),
    (dict(scheme="w8a16", nope=1), ConfigError, "unknown quantize option(s): nope"),
    (dict(scheme="w3a16"), OptionError, "scheme: unknown scheme 'w3a16'"),
    (dict(scheme="w8a16", calib_samples="4"), OptionError, "calib_samples: must be int, got '4'"),
    (dict(scheme="w8a16", asymmetric=1), OptionError, "asymmetric: must be bool"),
    (dict(scheme="w8a16", calib_samples=True), OptionError, "calib_samples: must be int, got True"),
    (dict(scheme="w8a16", alpha=1.5), OptionError, "alpha: must be in [0, 1], got 1.5"),
    (dict(scheme="w8a16", calib_seqlen=1), OptionError, "calib_seqlen: must be at least 2"),
    (dict(scheme="w8a16", kv_cache="int4"), OptionError, "kv_cache: unknown KV-cache format 'int4'"),
    (dict(scheme="w8a16", group_size=64), OptionError, "group_size: applies to group-wise schemes"),
])
def test_recipe_from_options_errors(options, error, needle):
    with pytest.raises(error) as e:
        recipe_from_options(**options)
    assert needle in str(e.value)


# ---- (c) to_dict / from_dict -------------------------------------------------------------------------

def _accepted_recipes() -> list[QuantRecipe]:
    """Every scheme x algorithm x KV cache check_recipe accepts, with the options at their
    defaults and changed."""
    out = []
    for scheme in SCHEMES:
        for algo, spec in ALGORITHMS.items():
            for kv in (None, *KV_CACHE_DTYPES):
                changed = dict(calib_samples=7, calib_seqlen=64, calib_seed=3, alpha=0.25, awq_clip=False,
                               act_observer="mse", percentile=99.5,
                               observer="percentile" if spec.observes_weights else None)
                if scheme in ("w4a16", "w4a8"):
                    changed.update(group_size=64, asymmetric=True, head="int8")
                for options in ({}, changed):
                    try:
                        recipe = recipe_from_options(scheme, algo=algo, kv_cache=kv, **options)
                        check_recipe(recipe)
                    except OptionError:
                        continue
                    out.append(recipe)
    return out


def test_from_dict_reads_what_to_dict_writes():
    recipes = _accepted_recipes()
    combinations = {(r.scheme.name, r.algorithm, r.kv_cache) for r in recipes}
    assert len(combinations) == (5 + 3 + 3 + 1) * 3      # rtn: 5 schemes, gptq and awq: 3, smoothquant: 1; x 3 caches
    for r in recipes:
        d = r.to_dict()
        assert list(d) == RECORD_KEYS
        assert QuantRecipe.from_dict(d) == r
        assert QuantRecipe.from_dict(json.loads(json.dumps(d))) == r                   # as a checkpoint stores it


def test_the_stored_form_is_unchanged():
    """What existing quantized checkpoints hold: the keys and values QuantRecipe.to_dict has always written."""
    r = recipe_from_options("w4a16", algo="gptq", group_size=32, kv_cache="fp8", calib_samples=16)
    assert r.to_dict() == {
        "scheme": {"name": "w4a16", "weight": {"dtype": "int4", "granularity": "group", "group_size": 32,
                                               "symmetric": False},              # w4a16's default since v2
                   "activation": None, "skip": ["lm_head.weight", "model.embed_tokens.weight"]},
        "algorithm": "gptq",
        "kv_cache": {"dtype": "fp8_e4m3", "granularity": "channel", "group_size": None, "symmetric": True},
        "head": None,                                                     # added with --head: absent reads as None
        "embeddings": None,                                               # added with --embeddings: the same
        "calib_samples": 16, "calib_seqlen": 512,
        "calib_seed": None,                                               # added with --calib-seed: the same
        "smooth_alpha": 0.5, "awq_clip": True,
        "weight_observer": None,              # unset: quantize records the one it used (mse for gptq)
        "act_observer": "minmax", "percentile": 99.99,
        "imatrix": False, "sensitivity": False, "target_bpw": None, "target_size": None}   # added since: absent
                                                                                            # reads as these


def test_a_recipe_from_before_the_observers_reads_with_their_defaults():
    d = recipe_from_options("w8a16").to_dict()
    for key in ("awq_clip", "weight_observer", "act_observer", "percentile", "head", "embeddings", "calib_seed",
                "imatrix", "sensitivity", "target_bpw", "target_size"):
        del d[key]
    # a recipe without a weight observer was made before there were observers: with minmax
    assert QuantRecipe.from_dict(d) == replace(recipe_from_options("w8a16"), weight_observer="minmax")


# ---- (d) malformed dicts ----------------------------------------------------------------------------

def _stored(**changes) -> dict:
    d = recipe_from_options("w4a16", group_size=32, kv_cache="int8").to_dict()
    for path, value in changes.items():
        *parents, key = path.split("__")
        target = d
        for p in parents:
            target = target[p]
        if value is KeyError:
            del target[key]
        else:
            target[key] = value
    return d


@pytest.mark.parametrize("d, needle", [
    (_stored(nope=1), "unknown key nope"),
    (_stored(scheme__weight__bits=4), "unknown key scheme.weight.bits"),
    (_stored(calib_samples="128"), "calib_samples is '128', not int"),
    (_stored(calib_samples=True), "calib_samples is True, not int"),
    (_stored(smooth_alpha="0.5"), "smooth_alpha is '0.5', not float or int"),
    (_stored(awq_clip=1), "awq_clip is 1, not bool"),
    (_stored(kv_cache="int8"), "kv_cache is 'int8', not an object"),
    (_stored(scheme__skip=["lm_head.weight", 3]), "scheme.skip[1] is 3, not str"),
    (_stored(algorithm="magic"), "algorithm is 'magic', not one of rtn, gptq, awq, smoothquant"),
    (_stored(scheme__name="w3a16"), "scheme.name is 'w3a16', not one of w8a16, w4a16, w8a8, w4a8, fp8"),
    (_stored(scheme="w4a16"), "scheme is 'w4a16', not an object"),
    (_stored(scheme__weight__dtype="int3"), "scheme.weight.dtype is 'int3'"),
    (_stored(scheme__weight__group_size=0), "scheme.weight.group_size: must be in [1, 65536], got 0"),
    (_stored(scheme__weight__group_size=None), "scheme.weight: group_size must be set exactly when"),
    (_stored(smooth_alpha=2.0), "smooth_alpha: must be in [0, 1], got 2.0"),
    (_stored(calib_seqlen=1), "calib_seqlen: must be at least 2, got 1"),
    (_stored(scheme=KeyError), "missing key scheme"),
    (_stored(scheme__weight=KeyError), "missing key scheme.weight"),
    ([], "quantization recipe is [], not an object"),
    (None, "quantization recipe is None, not an object"),
])
def test_malformed_recipes_are_one_line_errors_naming_the_key(d, needle):
    with pytest.raises(ModelFormatError) as e:
        QuantRecipe.from_dict(d)
    assert needle in str(e.value) and "\n" not in str(e.value)


# ---- the library does what the command line does --------------------------------------------------

def test_quantize_fits_a_default_calibration_window_to_the_context(tmp_path):
    import shutil

    from llmc.quantizer import quantize
    model = tmp_path / "short"
    shutil.copytree(STORIES, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 256}))
    recipe = recipe_from_options("w8a16", kv_cache="int8", calib_samples=2)
    with pytest.raises(OptionError, match="calib_seqlen: 512 tokens is longer than the model's context"):
        quantize(model, tmp_path / "refused", recipe)
    r, _ = quantize(model, tmp_path / "q", recipe, fit_context=True)
    assert r.recipe["calib_seqlen"] == 256
    stored = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["recipe"]
    assert QuantRecipe.from_dict(stored).calib_seqlen == 256
