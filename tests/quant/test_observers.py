"""Observers: minmax is exactly the formats' own parameters, percentile and MSE exact on
hand-made data, and each one reaches the checkpoint through the recipe and the CLI."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llmc.errors import ConfigError
from llmc.kernels.reference.dequant import dequantize
from llmc.quantized.formats import TensorQuant, params, quantize
from llmc.passes.quant.observers import Observer
from llmc.quantizer import quantize_checkpoint
from llmc.quantized.scheme import QuantRecipe, resolve_scheme
from tests.helpers import STORIES

FORMATS = [TensorQuant(dtype="int8", granularity="channel"),
           TensorQuant(dtype="int4", granularity="group", group_size=16),
           TensorQuant(dtype="int4", granularity="group", group_size=16, symmetric=False),
           TensorQuant(dtype="fp8_e4m3", granularity="channel")]


def heavy_tailed(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Student-t (3 degrees of freedom) rows: a few large values stretch every minmax range."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) / torch.randn(n, k, 3, generator=g).pow(2).mean(-1).sqrt()


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.key)
def test_minmax_is_the_formats_own_params(fmt):
    x = heavy_tailed(8, 48)
    x[3] = 0                                                            # an all-zero row
    s0, z0 = params(x, fmt)
    s1, z1 = Observer("minmax").params(x, fmt)
    assert torch.equal(s0, s1) and (z0 is None) == (z1 is None) and (z0 is None or torch.equal(z0, z1))
    w = x.reshape(8, 48)
    assert torch.equal(dequantize(quantize(w, fmt)), dequantize(quantize(w, fmt, observer=Observer("minmax"))))


def test_percentile_exact():
    x = torch.arange(1.0, 10001.0)[None]                                # 1 .. 10000
    sym, asym = FORMATS[1], FORMATS[2]
    lo, hi = Observer("percentile", 99.99).range(x, sym)
    assert (lo.item(), hi.item()) == (-9999.0, 9999.0)                 # ceil(0.9999 * 10000) = 9999th smallest
    lo, hi = Observer("percentile", 99.9).range(x, asym)
    assert (lo.item(), hi.item()) == (11.0, 9990.0)                    # the 0.1th and 99.9th percentiles
    assert Observer("percentile", 100).range(x, sym)[1].item() == 10000.0


def test_percentile_saturates_a_lone_outlier():
    x = torch.linspace(-1, 1, 1000)[None].clone()
    x[0, 500] = 50.0                                                    # one x50 outlier
    fmt = FORMATS[0]
    s_max, _ = params(x, fmt)
    s_pct, _ = Observer("percentile", 99.9).params(x, fmt)
    assert s_max.item() == pytest.approx(50 / 127, rel=2 ** -11)                 # a float16 value
    assert s_pct.item() == pytest.approx(1 / 127, rel=1e-3)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.key)
def test_mse_never_worse_than_minmax_and_better_for_int4_on_heavy_tails(fmt):
    w = heavy_tailed(64, 128, seed=3)

    def row_err(qw):
        return (dequantize(qw) - w).pow(2).sum(dim=1)
    base, mse = row_err(quantize(w, fmt)), row_err(quantize(w, fmt, observer=Observer("mse")))
    if fmt.granularity == "channel":                                    # whole rows: compare row by row
        assert (mse <= base * (1 + 1e-6)).all()
    assert mse.sum() <= base.sum() * (1 + 1e-6)
    if fmt.dtype == "int4":        # 16 levels: clipping the tails pays; at int8 / fp8 it rarely does
        assert mse.sum() < 0.97 * base.sum(), (fmt.key, float(mse.sum() / base.sum()))


def test_static_scale_minmax_takes_the_running_max_others_the_sample():
    sample = torch.linspace(-1, 1, 2001)[None]
    running = torch.tensor([7.0])
    fmt = TensorQuant(dtype="fp8_e4m3", granularity="tensor")
    assert Observer("minmax").static_scale(running, sample, fmt).item() == (running / 448).item()   # exact
    assert Observer("percentile", 99).static_scale(running, sample, fmt).item() == pytest.approx(0.99 / 448, rel=1e-3)


def test_bad_observers():
    with pytest.raises(ConfigError, match="unknown observer 'max'; known: minmax, percentile, mse"):
        Observer("max")
    with pytest.raises(ConfigError, match="percentile: must be in"):
        Observer("percentile", 40)
    with pytest.raises(ConfigError, match="chooses its own weight ranges"):
        quantize_checkpoint(STORIES, "/nonexistent/out", QuantRecipe(scheme=resolve_scheme("w4a16", group_size=32),
                                                                     algorithm="awq", weight_observer="mse"))


def _shards(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_observers_reach_the_checkpoint(tmp_path):
    """w4a16 RTN with the MSE weight observer: every layer's weights at least as close as minmax; an
    int8 KV cache with the percentile observer: per-head scales at or below the absmax ones."""
    def run(name, **kw):
        r = QuantRecipe(scheme=resolve_scheme("w4a16", group_size=32), calib_samples=8, calib_seqlen=128,
                        kv_cache=TensorQuant(dtype="int8"), **kw)
        res = quantize_checkpoint(STORIES, tmp_path / name, r)
        return res, _shards(tmp_path / name), json.loads((tmp_path / name / "config.json").read_text())
    base, base_t, _ = run("minmax", weight_observer="minmax")
    obs, obs_t, cfg = run("observed", weight_observer="mse", act_observer="percentile", percentile=99.0)
    recipe = cfg["quantization_config"]["recipe"]
    assert (recipe["weight_observer"], recipe["act_observer"], recipe["percentile"]) == ("mse", "percentile", 99.0)
    for a, b in zip(base.layers, obs.layers):
        if a.sqnr_db_mean is not None:
            assert b.sqnr_db_mean >= a.sqnr_db_mean - 1e-6, (a.layer, a.sqnr_db_mean, b.sqnr_db_mean)
    assert sum(b.sqnr_db_mean or 0 for b in obs.layers) > sum(a.sqnr_db_mean or 0 for a in base.layers)
    kv = [n for n in base_t if n.endswith(("k_scale", "v_scale"))]
    assert kv and all((obs_t[n] <= base_t[n]).all() for n in kv)
    assert any((obs_t[n] < base_t[n]).any() for n in kv)


def test_cli_observer_flags(tmp_path, capsys):
    from llmc.cli import main
    out = tmp_path / "fp8"
    main(["quantize", str(STORIES), "-o", str(out), "--scheme", "fp8", "--act-observer", "mse",
          "--calib-samples", "4", "--calib-seqlen", "64", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert r["recipe"]["act_observer"] == "mse" and r["recipe"]["weight_observer"] == "mse"      # the default
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(STORIES), "-o", str(tmp_path / "x"), "--scheme", "w8a16", "--observer", "biggest"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown observer 'biggest'" in err[0]
    assert not (tmp_path / "x").exists()


def test_calibration_sample_spreads_over_every_row():
    """Percentile/MSE observers and AWQ look at the sample: it must cover all calibration tokens,
    not the first sequence."""
    from llmc.passes.quant.algorithms import InputStats
    st, seen = InputStats.new(1, hessian=False), 0
    for n in (100, 300, 1000, 77, 5000):                  # uneven chunks
        st.add(torch.arange(seen, seen + n, dtype=torch.float32)[:, None])
        seen += n
    rows = st.rows.flatten()
    assert st.count == seen and st.SAMPLE_ROWS // 2 < len(rows) <= st.SAMPLE_ROWS
    assert torch.equal(rows, torch.arange(0, seen, st.stride, dtype=torch.float32))   # every stride-th row
    assert st.abs_max.item() == seen - 1 and st.absmean.item() == pytest.approx((seen - 1) / 2)


@pytest.mark.parametrize("fmt", FORMATS[:3], ids=lambda f: f.key)
def test_mse_least_squares_step_beats_the_grid_alone(fmt):
    """Besides the grid of shrink ratios, mse tries each grid point's least-squares scale (for the codes
    that point gives): never worse than the grid alone, and better on some rows."""
    import llmc.passes.quant.observers as obs
    w = heavy_tailed(64, 128, seed=5)

    def err(qw):
        return (dequantize(qw) - w).pow(2).sum(dim=1)
    with_lsq = err(quantize(w, fmt, observer=Observer("mse")))
    grid_only = []
    for row in w:                                   # the grid alone, row by row, as the search was before
        best = None
        for j in range(obs.MSE_GRID + 1):
            r = 1 - obs.MSE_MAX_SHRINK * j / obs.MSE_GRID
            lo, hi = obs._minmax(row[None], fmt, None)
            q = quantize(row[None], fmt, observer=_Fixed(lo * r, hi * r))
            e = float((dequantize(q) - row[None]).pow(2).sum())
            best = e if best is None else min(best, e)
        grid_only.append(best)
    grid_only = torch.tensor(grid_only)
    # the best grid point for the whole row bounds the per-group grid from above
    assert bool((with_lsq <= grid_only * (1 + 1e-6)).all())
    assert float(with_lsq.sum()) < float(grid_only.sum())


class _Fixed:
    """An observer with one given range for a whole row (the same for every group of it)."""

    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi

    def params(self, x, fmt, importance=None):
        from llmc.quantized.formats import params_from_range
        return params_from_range(self.lo.expand(x.shape[:-1]), self.hi.expand(x.shape[:-1]), fmt)


def test_importance_weighs_the_error_where_the_inputs_are_large():
    """With an importance per input column, mse trades error in unimportant columns for error in the
    important ones: their error drops, the importance-weighted error is never worse."""
    fmt = FORMATS[1]
    w = heavy_tailed(64, 128, seed=7)
    imp = torch.ones(128)
    imp[::16] = 100.0                                   # one column in each group of 16 meets large inputs
    plain = dequantize(quantize(w, fmt, observer=Observer("mse")))
    weighted = dequantize(quantize(w, fmt, observer=Observer("mse"), importance=imp))
    hot = (plain - w)[:, ::16].pow(2).sum(), (weighted - w)[:, ::16].pow(2).sum()
    assert hot[1] < 0.8 * hot[0]
    assert float(((weighted - w).pow(2) * imp).sum()) <= float(((plain - w).pow(2) * imp).sum()) * (1 + 1e-6)


def test_imatrix_calibrates_rtn_and_needs_mse(tmp_path, capsys):
    from llmc.cli import main
    from llmc.passes.quant.algorithms import calibrates_layers
    r = QuantRecipe(scheme=resolve_scheme("w4a16", group_size=32), weight_observer="mse", imatrix=True,
                    calib_samples=4, calib_seqlen=64)
    assert calibrates_layers(r)
    res = quantize_checkpoint(STORIES, tmp_path / "q", r)
    assert res.calibration is not None and res.recipe["imatrix"] is True
    try:
        rc = main(["quantize", str(STORIES), "-o", str(tmp_path / "x"), "--scheme", "w4a16", "--imatrix",
                   "--observer", "minmax"])
    except SystemExit as e:
        rc = e.code
    assert rc == 2 and "--imatrix: has no effect" in capsys.readouterr().err
