"""The tensorrt target: `compile --target tensorrt` builds a TensorRT plan (`model.plan`) from the
ONNX lowering (llmc.backends.onnx_graph) with the `tensorrt` Python API, on the GPU it will run on;
llmc runs it behind the paged KV cache as the onnx target runs its session.

A plan is tied to the TensorRT version and the GPU compute capability it was built with: both go into
the manifest, and loading on another version or capability is refused naming both. Compiling needs
TensorRT, onnx and an NVIDIA GPU (the `gpu` extra and the machine); without one of them compiling fails
with one line naming what is missing, before any work, and nothing is written.

The network is strongly typed where TensorRT has the flag (from 11 it always is): every tensor keeps
the type the ONNX graph gives it, so quantized layers run as their explicit Q/DQ nodes say and the rest
in fp32, with TF32 off (each scheme's definition: activations are fp32). The optimisation profile
(`Profile`) covers every dynamic input; the engine keeps `weights.safetensors` (the engine format
loads the graph and weights of every engine), and the ONNX files the plan was built from are removed.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from llmc.backends.onnx import KV_STATE, ONNX_DATA, ONNX_FILE, write_onnx
from llmc.errors import ConfigError, EngineError, UnsupportedModelError
from llmc.runtime.kv_cache import KVCacheSpec, PagedKVCache
from llmc.targets import Target, register_target

NAME = "tensorrt"
PLAN_FILE = "model.plan"
LOG = logging.getLogger("llmc.tensorrt")


# ---------------------------------------------------------------------------------------------
# What compiling and running need

@dataclass(frozen=True)
class Missing:
    what: str       # what the target needs: "TensorRT", "an NVIDIA GPU"
    why: str        # why this machine lacks it, as a clause
    hint: str       # how to get it


def _tensorrt() -> Missing | None:
    try:
        importlib.import_module("tensorrt")
    except (ImportError, OSError) as e:           # installed, but its libraries (libnvinfer, ...) may not load
        absent = isinstance(e, ModuleNotFoundError) and e.name == "tensorrt"
        why = "the tensorrt package is not installed" if absent else f"the tensorrt package does not import ({e})"
        return Missing("TensorRT", why, "pip install 'llmc[gpu]'")
    return None


def _onnx() -> Missing | None:
    try:
        importlib.import_module("onnx")
    except ImportError:
        return Missing("onnx", "the onnx package (the graph TensorRT parses) is not installed", "pip install 'llmc[gpu]'")
    return None


def _gpu() -> Missing | None:
    hint = "build and run the plan on the machine with the NVIDIA GPU it is for"
    if torch.version.cuda is None:
        return Missing("an NVIDIA GPU", f"this torch ({torch.__version__}) is built without CUDA, so no NVIDIA "
                       "GPU is usable", hint)
    if not torch.cuda.is_available():
        return Missing("an NVIDIA GPU", "no NVIDIA GPU is visible (torch.cuda.is_available() is False)", hint)
    return None


BUILD_CHECKS: tuple[Callable[[], Missing | None], ...] = (_tensorrt, _onnx, _gpu)
RUN_CHECKS: tuple[Callable[[], Missing | None], ...] = (_tensorrt, _gpu)


def requirements(checks=BUILD_CHECKS) -> list[Missing]:
    """What this machine lacks of what the target needs (empty: nothing)."""
    return [m for check in checks if (m := check()) is not None]


def requirement_error(missing: list[Missing]) -> ConfigError:
    """One line naming everything missing, e.g. "target tensorrt needs TensorRT and an NVIDIA GPU: the
    tensorrt package is not installed; no NVIDIA GPU is visible (...)"."""
    whats = [m.what for m in missing]
    needs = whats[0] if len(whats) == 1 else f"{', '.join(whats[:-1])} and {whats[-1]}"
    hints = list(dict.fromkeys(m.hint for m in missing))
    return ConfigError(f"target {NAME} needs {needs}: {'; '.join(m.why for m in missing)}", hint="; ".join(hints))


def require(checks=BUILD_CHECKS):
    """The tensorrt module, or a ConfigError naming what is missing."""
    missing = requirements(checks)
    if missing:
        raise requirement_error(missing)
    return importlib.import_module("tensorrt")


# ---------------------------------------------------------------------------------------------
# The optimisation profile and what a plan is tied to (pure Python: tested without TensorRT)

@dataclass(frozen=True)
class ProfileLimits:
    """The largest shapes a plan is built for. TensorRT sizes its activation memory for the largest,
    so they stay modest: the backend runs one sequence per call (batch 1; callers of the plan may
    batch up to max_batch), a longer prompt runs in pieces of max_seq tokens, and the context is the
    model's max_position_embeddings capped at max_context."""
    max_batch: int = 8
    max_seq: int = 256
    max_context: int = 4096


LIMITS = ProfileLimits()
Range = tuple[int, int, int]                       # (min, opt, max)


@dataclass(frozen=True)
class Profile:
    """Each dynamic dimension's (min, opt, max). TensorRT tunes its kernels at opt (a decode step at
    half the context) and runs any shape between min and max. The attention mask's length is past +
    seq at each of the three, so each is a consistent set of shapes."""
    batch: Range
    seq: Range                                     # new tokens per call
    past: Range                                    # cached tokens before them

    @property
    def total(self) -> Range:
        return tuple(p + s for p, s in zip(self.past, self.seq))

    @property
    def context(self) -> int:
        """The longest sequence the plan runs (its last token has context - 1 tokens before it)."""
        return self.past[2] + 1

    def shapes(self, arch) -> dict[str, tuple[tuple[int, ...], ...]]:
        """Every dynamic input of the ONNX graph: its (min, opt, max) shapes."""
        b, s, t, p = self.batch, self.seq, self.total, self.past
        out = {"input_ids": tuple((b[k], s[k]) for k in range(3)),
               "attention_mask": tuple((b[k], t[k]) for k in range(3)),
               "position_ids": tuple((b[k], s[k]) for k in range(3))}
        for i in range(arch.num_layers):
            for part in ("key", "value"):
                out[f"past_key_values.{i}.{part}"] = tuple((b[k], arch.num_kv_heads, p[k], arch.head_dim)
                                                           for k in range(3))
        return out

    def to_dict(self) -> dict[str, list[int]]:
        return {"batch": list(self.batch), "seq": list(self.seq), "past": list(self.past)}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Profile:
        ok = isinstance(d, dict) and all(
            isinstance(d.get(k), list) and len(d[k]) == 3 and all(type(v) is int for v in d[k])
            and lo <= d[k][0] <= d[k][1] <= d[k][2] for k, lo in (("batch", 1), ("seq", 1), ("past", 0)))
        if not ok:
            raise EngineError(f"{where}: backend.profile is malformed (not as llmc writes it)", hint="recompile the engine")
        return cls(tuple(d["batch"]), tuple(d["seq"]), tuple(d["past"]))


def profile_for(arch, limits: ProfileLimits = LIMITS) -> Profile:
    """The profile of a plan for `arch`: contexts up to min(max_position_embeddings, limits.max_context)."""
    context = min(arch.max_position_embeddings, limits.max_context)
    return Profile(batch=(1, 1, limits.max_batch), seq=(1, 1, min(limits.max_seq, context)),
                   past=(0, (context - 1) // 2, context - 1))


@dataclass(frozen=True)
class Platform:
    """What a plan is tied to: TensorRT's version and the GPU's compute capability ("8.9"); the GPU's
    name is for messages (plans run on any GPU of the capability they were built for)."""
    tensorrt: str
    compute_capability: str
    gpu: str


def check_portable(built: Platform, here: Platform) -> None:
    """Refuses a plan built with another TensorRT version or for another compute capability."""
    if (built.tensorrt, built.compute_capability) != (here.tensorrt, here.compute_capability):
        raise EngineError(f"engine was built for TensorRT {built.tensorrt} on compute capability "
                          f"{built.compute_capability} ({built.gpu}); this machine has TensorRT {here.tensorrt} "
                          f"and compute capability {here.compute_capability} ({here.gpu})",
                          hint=f"recompile it on this machine with --target {NAME}")


def backend_section(platform: Platform, profile: Profile, ops, opset: int) -> dict[str, Any]:
    """The manifest's backend section of a tensorrt engine."""
    return {"device": "cuda", "kernels": NAME, "ops": {op: NAME for op in ops}, "artifact": PLAN_FILE,
            "opset": opset, **asdict(platform), "profile": profile.to_dict(),
            "requires": f"llmc[gpu] with TensorRT {platform.tensorrt}, and an NVIDIA GPU of compute capability "
                        f"{platform.compute_capability}"}


def platform_of(section: dict[str, Any], where: str) -> Platform:
    """The Platform a backend section records."""
    values = [section.get(k) for k in ("tensorrt", "compute_capability", "gpu")]
    if not all(isinstance(v, str) for v in values):
        raise EngineError(f"{where}: backend lacks the TensorRT version, compute capability or GPU it was built for",
                          hint="recompile the engine")
    return Platform(*values)


def current_platform(trt, device: torch.device) -> Platform:
    major, minor = torch.cuda.get_device_capability(device)
    return Platform(trt.__version__, f"{major}.{minor}", torch.cuda.get_device_name(device))


# ---------------------------------------------------------------------------------------------
# Building the plan

def _logger(trt):
    class Log(trt.ILogger):
        """TensorRT's messages: errors kept (the last one explains a failure), warnings logged."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            elif severity == trt.ILogger.Severity.WARNING:
                LOG.warning("%s", msg)

        def why(self, otherwise: str) -> str:
            return self.errors[-1] if self.errors else otherwise
    return Log()


def make_builder(trt, log):
    """A TensorRT builder; TensorRT initialises CUDA here, so this is where a missing GPU shows."""
    try:
        builder = trt.Builder(log)
    except TypeError as e:                        # pybind11: "factory function returned nullptr"
        builder, error = None, str(e)
    else:
        error = "trt.Builder returned nothing"
    if builder is None:
        raise ConfigError(f"target {NAME} needs an NVIDIA GPU: TensorRT cannot initialise CUDA ({log.why(error)})",
                          hint="build the plan on the machine with the NVIDIA GPU it is for")
    return builder


def parse_network(trt, builder, onnx_path: Path, log):
    """The network TensorRT's ONNX parser builds from `onnx_path` (its external data beside it), strongly
    typed where TensorRT has the flag. Returns (network, parser): the parser owns the weights until the
    plan is built."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UnsupportedModelError(f"TensorRT's ONNX parser rejects the graph: "
                                    f"{errors[0] if errors else log.why('no reason given')}")
    return network, parser


def builder_config(trt, builder, shapes: dict[str, tuple[tuple[int, ...], ...]]):
    """The builder config: one optimisation profile over `shapes`, TF32 off (fp32 stays fp32)."""
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None:
        config.clear_flag(tf32)
    return config


def lower(model, directory: Path) -> dict[str, Any]:
    """The engine's weights and model.plan, built on this machine's GPU from the ONNX lowering."""
    from llmc.backends.onnx_graph import OPSET
    from llmc.engine import write_weights
    trt = require()
    log = _logger(trt)
    builder = make_builder(trt, log)
    platform = current_platform(trt, torch.device("cuda", torch.cuda.current_device()))
    profile = profile_for(model.arch)
    write_weights(model, directory)
    onnx_path = write_onnx(model, directory)
    network, _parser = parse_network(trt, builder, onnx_path, log)     # the parser owns the weights meanwhile
    plan = builder.build_serialized_network(network, builder_config(trt, builder, profile.shapes(model.arch)))
    if plan is None:
        raise UnsupportedModelError(f"TensorRT could not build a plan of this model ({log.why('no reason given')})")
    with open(directory / PLAN_FILE, "wb") as f:
        f.write(plan)
    for name in (ONNX_FILE, ONNX_DATA):
        (directory / name).unlink()
    return backend_section(platform, profile, (n.op for n in model.graph.nodes), OPSET)


# ---------------------------------------------------------------------------------------------
# Running it

def load(model, runtime):
    return TensorRTBackend(model, runtime.device)


class TensorRTBackend:
    """The plan run behind the paged KV cache, as OnnxBackend runs its session: for each sequence the
    past keys and values are gathered from its blocks into the past_key_values inputs, the plan runs its
    new tokens (in pieces of the profile's max seq), and the new rows of present go back to their slots.
    Torch CUDA tensors are the bindings; the plan runs on its own stream, ordered after and before the
    current one.

    Not yet run on a GPU: written against the TensorRT 10 Python API; on a machine without TensorRT or a
    GPU only its refusals are exercised (tests/onnx/test_tensorrt_target.py)."""
    target = NAME
    kernels = NAME

    def __init__(self, model, device: str) -> None:
        from llmc.engine import ENGINE_FILE
        trt = require(RUN_CHECKS)
        path = Path(model.path)
        where = str(path / ENGINE_FILE)
        if model.kind != "engine" or not (path / PLAN_FILE).is_file():
            raise ConfigError(f"{model.path}: not a tensorrt engine", hint=f"compile it with --target {NAME}")
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        section = model.manifest["backend"]
        check_portable(platform_of(section, where), current_platform(trt, self.device))
        self.profile = Profile.from_dict(section.get("profile"), where)
        a = model.arch
        self.arch, self.calls = a, 0
        self.kv_spec = KVCacheSpec(a.num_layers, a.num_kv_heads, a.head_dim,
                                   model.kv_dtype if model.kv_dtype in KV_STATE else torch.float32)
        self.log = _logger(trt)
        self.runtime = trt.Runtime(self.log)
        with torch.cuda.device(self.device):
            self.engine = self.runtime.deserialize_cuda_engine((path / PLAN_FILE).read_bytes())
            if self.engine is None:
                raise EngineError(f"{path / PLAN_FILE}: TensorRT cannot load the plan ({self.log.why('no reason')})")
            self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)      # TensorRT syncs more on the default stream
        self.empty = torch.empty(256, dtype=torch.uint8, device=self.device)   # the address of empty tensors

    def allocate_kv(self, num_blocks: int, block_size: int) -> PagedKVCache:
        return PagedKVCache(self.kv_spec, num_blocks, block_size, self.device)

    def forward(self, batch, kv: PagedKVCache) -> torch.Tensor:
        rows, at, step = [], 0, self.profile.seq[2]
        for n, ctx, table in zip(batch.query_lens, batch.context_lens, batch.block_tables):
            if ctx > self.profile.context:
                raise ConfigError(f"a sequence of {ctx} tokens is longer than the {self.profile.context} tokens "
                                  "this TensorRT plan was built for (its optimisation profile's context)")
            tokens, start = batch.token_ids[at:at + n], ctx - n
            at += n
            logits = torch.cat([self._run(tokens[p - start:p - start + step], p, table, kv)
                                for p in range(start, ctx, step)])
            rows.append(logits if batch.all_logits else logits[-1:])
        return torch.cat(rows)

    def _run(self, tokens: list[int], past: int, table: list[int], kv: PagedKVCache) -> torch.Tensor:
        """One call of the plan: `tokens` at positions past.. of one sequence; their keys and values are
        written to the cache and their logits [len(tokens), vocab] returned."""
        a, bs, dev = self.arch, kv.block_size, self.device
        ctx = past + len(tokens)
        blocks = torch.tensor(table, dtype=torch.long, device=dev)
        inputs = {"input_ids": torch.tensor([tokens], dtype=torch.long, device=dev),
                  "attention_mask": torch.ones((1, ctx), dtype=torch.long, device=dev),
                  "position_ids": torch.arange(past, ctx, dtype=torch.long, device=dev)[None]}
        outputs = {"logits": torch.empty((1, len(tokens), a.vocab_size), dtype=torch.float32, device=dev)}
        for i in range(a.num_layers):
            for part, cache in (("key", kv.k[i]), ("value", kv.v[i])):
                seq = cache[blocks].reshape(-1, a.num_kv_heads, a.head_dim)[:past]          # [past, KV, d]
                inputs[f"past_key_values.{i}.{part}"] = seq.permute(1, 0, 2)[None].contiguous()
                outputs[f"present.{i}.{part}"] = torch.empty((1, a.num_kv_heads, ctx, a.head_dim),
                                                             dtype=cache.dtype, device=dev)
        for name, t in inputs.items():
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise RuntimeError(f"TensorRT refuses {name} of shape {tuple(t.shape)} ({self.log.why('no reason')})")
        for name, t in {**inputs, **outputs}.items():
            self.context.set_tensor_address(name, t.data_ptr() if t.numel() else self.empty.data_ptr())
        current = torch.cuda.current_stream(dev)
        self.stream.wait_stream(current)                   # the inputs are written on the current stream
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run the plan ({self.log.why('no reason given')})")
        current.wait_stream(self.stream)                   # what reads the outputs or reuses the buffers waits
        self.calls += 1
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(past, ctx)], dtype=torch.long, device=dev)
        for i in range(a.num_layers):
            for part, cache in (("key", kv.k[i]), ("value", kv.v[i])):
                new = outputs[f"present.{i}.{part}"][0, :, past:ctx].permute(1, 0, 2)
                cache.view(-1, a.num_kv_heads, a.head_dim)[slots] = new.to(cache.dtype)
        return outputs["logits"][0]

    def report(self) -> dict[str, Any]:
        return {"target": NAME, "device": str(self.device), "kernels": self.kernels, "plan_calls": self.calls}


register_target(Target(NAME, "a TensorRT plan built from the ONNX lowering for this machine's NVIDIA GPU (needs the "
                       "gpu extra)", devices=("cuda",), kernel_sets=(NAME,), lower=lower, load=load, check=require))
