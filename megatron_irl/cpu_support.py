"""Run Megatron-Core on a CPU-only torch build (gloo backend).

Megatron-Core assumes a GPU in a few places: buffers placed on
``torch.cuda.current_device()``, literal ``device="cuda"`` tensors, the CUDA RNG
state tracker, ``torch.cuda.synchronize()``, ``Tensor.cuda()`` and asserts on
``Tensor.type() == "torch.cuda.FloatTensor"``. On a CPU-only build each of those
raises (or, for ``torch.cuda.manual_seed`` and ``torch.autocast("cuda")``, silently
does nothing). :func:`enable_cpu_support` redirects exactly those call sites to the
CPU and leaves everything else alone:

* ``torch.cuda.current_device`` is replaced globally (it is called as a device at
  about 175 sites across Megatron); on a CPU-only build the original can only raise,
  so no working caller changes behaviour.
* Everything else is redirected inside the Megatron module that needs it: such a
  module's global name ``torch`` (or ``torch.cuda``) is swapped for a view of the
  real module in which only the listed functions differ, or one of the module's own
  functions is replaced or wrapped.
* ``Tensor.cuda`` and ``Tensor.type`` are patched only for the duration of the few
  Megatron functions that call them (see :func:`_cpu_tensors_pass_as_cuda`).

Targets that a newer megatron-core release no longer has are skipped (logged at
DEBUG level), so enabling never breaks an import. No global ``TorchFunctionMode`` is
used: it would intercept every torch call and slows forward+backward by 25-40%.
"""

import contextlib
import functools
import importlib
import itertools
import logging
import types
from typing import Callable, Dict, Optional, Tuple

import torch

_log = logging.getLogger(__name__)
_active = False

# Bound before any patching so the replacements can delegate to the originals.
_TENSOR_TYPE = torch.Tensor.type
_TORCH_AUTOCAST = torch.autocast


def enable_cpu_support() -> bool:
    """Redirect Megatron-Core's CUDA-only call sites to the CPU; idempotent.

    Does nothing when ``torch.cuda.is_available()``: on a GPU machine Megatron runs
    unmodified. Mutates ``torch.cuda.current_device`` and attributes of the Megatron
    modules named in this file; imports ``megatron.core`` on first activation.

    Returns:
        Whether the CPU redirects are active in this process.
    """
    global _active
    if _active:
        return True
    if torch.cuda.is_available():
        return False
    # Megatron calls it as a device for buffers (rotary embeddings, DDP grad buffers,
    # global memory buffer, p2p receive buffers, ...).
    torch.cuda.current_device = _cpu_device
    for module_name, overrides in _torch_views().items():
        _replace(module_name, "torch", lambda real, o=overrides: _ModuleView(real, **o))
    for (module_name, attribute), replacement in _module_functions().items():
        _replace(module_name, attribute, lambda _original, r=replacement: r)
    for module_name, attribute in _CALLS_THAT_NEED_CPU_TENSORS_AS_CUDA:
        _replace(module_name, attribute, _run_with_cpu_tensors_as_cuda)
    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_drop_rng_fork_warning)
    _active = True
    return True


def transformer_engine_problem(fp8_recipe: str | None = None) -> str | None:
    """None when Transformer Engine (and FP8 with ``fp8_recipe``, if given) can run here;
    else what is missing.

    Imports transformer_engine.pytorch when CUDA is present (slow; call it once).
    """
    if not torch.cuda.is_available():
        return "Transformer Engine needs a CUDA GPU and none is visible"
    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # an ImportError, or the extension failing to load its library
        return (f"Transformer Engine's PyTorch extension does not import ({type(exc).__name__}: "
                f"{exc}); it ships only as source that builds against CUDA, and NGC PyTorch "
                "containers include it")
    if fp8_recipe is not None:
        return fp8_recipe_problem(fp8_recipe, torch.cuda.get_device_capability(),
                                  transformer_engine.__version__)
    return None


# What each FP8 recipe needs: (oldest GPU compute capability, its architecture, oldest TE).
FP8_RECIPE_NEEDS = {
    "delayed": ((8, 9), "Ada or Hopper", "1.0"),
    "tensorwise": ((8, 9), "Ada or Hopper", "2.2"),
    "blockwise": ((9, 0), "Hopper", "2.3"),
    "mxfp8": ((10, 0), "Blackwell", "2.1"),
}


def fp8_recipe_problem(recipe: str, capability: tuple[int, int], te_version: str) -> str | None:
    """None when ``recipe`` runs on a GPU of compute ``capability`` with Transformer Engine
    ``te_version``; else why not (megatron-core's and TE's own requirements)."""
    minimum, architecture, oldest_te = FP8_RECIPE_NEEDS[recipe]
    if tuple(capability) < minimum:
        return (f"the {recipe} recipe needs a GPU of compute capability "
                f"{minimum[0]}.{minimum[1]} or newer ({architecture}); this one is "
                f"{capability[0]}.{capability[1]}"
                + ("; on Hopper use --fp8-recipe tensorwise, blockwise or delayed"
                   if recipe == "mxfp8" and tuple(capability) >= (9, 0) else ""))
    if _version_tuple(te_version) < _version_tuple(oldest_te):
        return (f"the {recipe} recipe needs Transformer Engine {oldest_te} or newer; "
                f"found {te_version}")
    return None


def _version_tuple(version: str) -> tuple[int, ...]:
    numbers = []
    for part in version.split("+")[0].split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, part))
        numbers.append(int(digits or 0))
    return tuple(numbers)


# Environment variables by which a launch asks for GPUs (values that mean "none" excluded).
_NO_GPU_VALUES = ("", "-1", "none", "NoDevFiles")


def current_device() -> torch.device:
    """The device this rank computes on: its GPU (``torch.cuda.set_device`` by
    ``init_distributed``), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def requested_gpus(env) -> str | None:
    """The first environment variable in ``env`` by which the launch asked for GPUs, as
    ``NAME=value``; None when it asked for none.

    Slurm sets SLURM_GPUS_ON_NODE / SLURM_JOB_GPUS / SLURM_STEP_GPUS for a job or step with
    a GPU allocation (--gpus, --gpus-per-node, --gres=gpu); CUDA_VISIBLE_DEVICES names the
    devices a launcher or container runtime gave this process.
    """
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES"):
        value = env.get(name)
        if value is None or value.strip() in _NO_GPU_VALUES:
            continue
        if name == "SLURM_GPUS_ON_NODE" and value.strip() == "0":  # a count, not a device
            continue
        return f"{name}={value}"
    return None


def device_problem(device: str, env, cuda_available: bool) -> str | None:
    """None when the run may go ahead on ``device`` (--device auto | cuda | cpu); else why
    not: no silent CPU run where the launch asked for GPUs and CUDA is missing."""
    if cuda_available:
        if device == "cpu":
            return ("--device cpu: CUDA is available, and megatron-irl runs on the GPUs it sees; "
                    "hide them with CUDA_VISIBLE_DEVICES= to run on the CPU")
        return None
    missing = ("torch.cuda.is_available() is False (a CPU-only torch build, a container "
               "started without GPUs, or a driver problem: check nvidia-smi in the job)")
    if device == "cuda":
        return f"--device cuda: {missing}"
    asked = requested_gpus(env)
    if device == "auto" and asked:
        return (f"the launch asked for GPUs ({asked}) but {missing}; pass --device cpu to "
                "train on the CPU anyway")
    return None


def _torch_views() -> Dict[str, Dict[str, object]]:
    """Per Megatron module: the attributes of ``torch`` that the module sees replaced."""
    on_cpu = _factory_on_cpu
    return {
        # forward_backward_{no_pipelining,pipelining_*}: `total_num_tokens` counter;
        # forward_step: torch.autocast("cuda") would silently disable autocast.
        "megatron.core.pipeline_parallel.schedules": {
            "zeros": on_cpu(torch.zeros),
            "autocast": _autocast_on_cpu,
        },
        # MixedPrecisionOptimizer.__init__ (found_inf, _dummy_overflow_buf, _scale_one)
        # and FP32Optimizer.__init__ (_scale).
        "megatron.core.optimizer.optimizer": {"tensor": on_cpu(torch.tensor)},
        # get_grad_norm_fp32, clip_grad_by_total_norm_fp32, count_zeros_fp32.
        "megatron.core.optimizer.clip_grads": {
            "tensor": on_cpu(torch.tensor),
            "zeros": on_cpu(torch.zeros),
        },
        # ConstantGradScaler / DynamicGradScaler (fp16 loss scale tensors).
        "megatron.core.optimizer.grad_scaler": {"tensor": on_cpu(torch.tensor)},
        # local_multi_tensor_l2_norm, the grad-norm kernel used without Apex/TE.
        "megatron.core.utils": {"tensor": on_cpu(torch.tensor)},
        # get_default_causal_mask / get_sliding_window_causal_mask (attention_mask=None).
        "megatron.core.transformer.utils": {"ones": on_cpu(torch.ones)},
        # _build_key_size_numel_dictionaries, called by broadcast_data.
        "megatron.core.tensor_parallel.data": {"tensor": on_cpu(torch.tensor)},
        # _communicate_shapes / _communicate: a guard after batch_isend_irecv; gloo
        # requests on CPU tensors are complete once waited on.
        "megatron.core.pipeline_parallel.p2p_communication": {
            "cuda": _ModuleView(torch.cuda, synchronize=_do_nothing)
        },
        # FileSystemWriterAsync.preload_tensors: waits for device-to-host copies that
        # are plain CPU copies here (dist_checkpointing.save with torch_dist).
        "megatron.core.dist_checkpointing.strategies.filesystem_async": {
            "cuda": _ModuleView(torch.cuda, synchronize=_do_nothing)
        },
        # TemporalAsyncCaller.schedule_async_call (--async-save): waits for the same copies
        # before forking the background writer.
        "megatron.core.dist_checkpointing.strategies.async_utils": {
            "cuda": _ModuleView(torch.cuda, synchronize=_do_nothing)
        },
        # CudaRNGStatesTracker.add and model_parallel_cuda_manual_seed: the CPU
        # generator plays the role of the CUDA default generator.
        "megatron.core.tensor_parallel.random": {
            "cuda": _ModuleView(
                torch.cuda, get_rng_state=_get_cpu_rng_state, manual_seed=_seed_cpu_rng
            )
        },
    }


def _module_functions() -> Dict[Tuple[str, str], Callable]:
    """Megatron module functions replaced outright, keyed by (module, name)."""
    random_module = "megatron.core.tensor_parallel.random"
    return {
        # CudaRNGStatesTracker.fork/add, _get_all_rng_states (activation recompute).
        (random_module, "_get_cuda_rng_state"): _get_cpu_rng_state,
        (random_module, "_set_cuda_rng_state"): _set_cpu_rng_state,
    }


# Megatron callables (module, dotted attribute) that run with CPU tensors passing as
# CUDA tensors (see _cpu_tensors_pass_as_cuda).
_CALLS_THAT_NEED_CPU_TENSORS_AS_CUDA = (
    # `weight.data.cuda()` before the all-reduce that ties the first and last
    # pipeline stage's embedding weights.
    ("megatron.core.models.common.language_module.language_module",
     "LanguageModule.setup_embeddings_and_output_layer"),
    # `data[key].cuda()` on the source rank; the package re-exports the function.
    ("megatron.core.tensor_parallel.data", "broadcast_data"),
    ("megatron.core.tensor_parallel", "broadcast_data"),
    # asserts `param.grad.type() == 'torch.cuda.FloatTensor'` when clip_grad > 0;
    # optimizer.py holds its own reference to the function.
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),
    # sorts params into fp32 / bf16 / fp16 groups by `param.type()` names
    # (bf16 or fp16 params without the distributed optimizer).
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
    # the same sorting for the distributed optimizer (any precision).
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"),
    # `send_tensor.cuda()` before gathering optimizer state shards (the
    # "fully_reshardable" distributed-optimizer checkpoint format).
    ("megatron.core.optimizer.distrib_optimizer",
     "DistributedOptimizer.get_parameter_state_dp_zero"),
)


class _ModuleView(types.ModuleType):
    """A module as one Megatron module sees it: the real one with a few names replaced.

    Names not given as overrides resolve to the real module at every look-up, so
    later changes to the real module (e.g. monkeypatching in tests) stay visible.
    """

    def __init__(self, real: types.ModuleType, **overrides):
        super().__init__(real.__name__, real.__doc__)
        self.__dict__.update(overrides)
        self.__dict__["_real_module"] = real

    def __getattr__(self, name):
        return getattr(self._real_module, name)


def _replace(module_name: str, attribute: str, make_replacement: Callable) -> None:
    """Set ``module.<attribute>`` (dotted, e.g. ``Class.method``) to
    ``make_replacement(original)``; skip a module or attribute that does not exist."""
    try:
        owner = importlib.import_module(module_name)
    except ImportError as error:
        _log.debug("CPU redirect skipped: cannot import %s (%s)", module_name, error)
        return
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part, None)
    original = getattr(owner, name, None)
    if original is None:
        _log.debug("CPU redirect skipped: %s has no %s", module_name, attribute)
        return
    setattr(owner, name, make_replacement(original))


def _is_cuda_device(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    # A bare index means a CUDA device to torch (there is no other accelerator here).
    return isinstance(device, int)


def _factory_on_cpu(factory: Callable) -> Callable:
    """Wrap a torch factory so that a CUDA ``device=`` argument creates a CPU tensor."""

    @functools.wraps(factory)
    def factory_on_cpu(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return factory_on_cpu


def _autocast_on_cpu(device_type: str, *args, **kwargs):
    """torch.autocast with "cuda" mapped to "cpu" (CUDA autocast is a silent no-op here)."""
    return _TORCH_AUTOCAST("cpu" if device_type == "cuda" else device_type, *args, **kwargs)


def _cpu_device() -> torch.device:
    """Stands in for torch.cuda.current_device(), which Megatron uses as a device."""
    return torch.device("cpu")


def _do_nothing(*_args, **_kwargs) -> None:
    return None


def _get_cpu_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False):
    """Stands in for ``_get_cuda_rng_state`` / ``torch.cuda.get_rng_state``.

    Returns a fresh copy of the CPU generator state (so ``clone`` is implied);
    ``device`` and ``graph_safe`` (CUDA graphs) have no CPU meaning.
    """
    del device, clone, graph_safe
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device=-1, graph_safe: bool = False) -> None:
    """Stands in for ``_set_cuda_rng_state``: sets the CPU generator state."""
    del device, graph_safe
    torch.set_rng_state(new_state)


def _seed_cpu_rng(seed: int) -> None:
    """Stands in for ``torch.cuda.manual_seed``: seeds the CPU default generator."""
    torch.default_generator.manual_seed(int(seed))


def _drop_rng_fork_warning(record: logging.LogRecord) -> bool:
    """Logging filter for CudaRNGStatesTracker.fork's check that the CPU generator is
    untouched inside a fork: on CPU the forked generator *is* the CPU generator, so
    every dropout or initialisation inside a fork would warn."""
    return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _tensor_type_naming_cuda(self, dtype=None, non_blocking=False, **kwargs):
    """Tensor.type() that names a CPU tensor's type as its CUDA counterpart
    ("torch.FloatTensor" -> "torch.cuda.FloatTensor"); conversions are unchanged."""
    if dtype is None and self.device.type == "cpu":
        return _TENSOR_TYPE(self).replace("torch.", "torch.cuda.", 1)
    return _TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


def _tensor_cuda_staying_on_cpu(self, device=None, non_blocking=False, **kwargs):
    """Tensor.cuda() for a machine whose only device is the CPU: the tensor itself."""
    del device, non_blocking, kwargs
    return self


@contextlib.contextmanager
def _cpu_tensors_pass_as_cuda():
    """While active, ``Tensor.cuda()`` returns the tensor itself and ``Tensor.type()``
    names CPU tensors ``torch.cuda.*``. Mutates the ``torch.Tensor`` class (restored on
    exit), so it is used only around the Megatron calls listed above."""
    saved: Dict[str, Optional[object]] = {
        name: torch.Tensor.__dict__.get(name) for name in ("cuda", "type")
    }
    torch.Tensor.cuda = _tensor_cuda_staying_on_cpu
    torch.Tensor.type = _tensor_type_naming_cuda
    try:
        yield
    finally:
        for name, previous in saved.items():
            if previous is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, previous)


def _run_with_cpu_tensors_as_cuda(function: Callable) -> Callable:
    @functools.wraps(function)
    def with_cpu_tensors_as_cuda(*args, **kwargs):
        with _cpu_tensors_pass_as_cuda():
            return function(*args, **kwargs)

    return with_cpu_tensors_as_cuda
