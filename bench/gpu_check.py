"""One-GPU check of the loss and the trainer (issue #9): correctness, speed, throughput, MFU.

Parts, run in the order named, each writing ``<part>.json`` under ``--out``:

- ``env``: Python, PyTorch/CUDA, GPU, Triton, megatron-core and Transformer Engine versions,
  and the TFLOP/s of a large bf16 matmul (what MFU's nominal peak compares with).
- ``loss``: ``vocab_parallel_soft_q_loss`` on bf16 logits against the float64 reference
  (``loss/reference.py``) and Megatron's cross entropy; then forward+backward time and peak
  extra memory of the soft-Q loss vs Megatron's ``vocab_parallel_cross_entropy`` at 8192
  tokens x 131072 vocabulary, bf16 and fp32 logits (``tools/bench_loss.py``'s losses).
- ``train-bf16`` / ``train-fp8``: a ~1B Llama-style GPT (16 layers, hidden 2048, 16 heads in
  4 query groups, SwiGLU 5632, RoPE, RMSNorm, tied 128256 vocabulary, sequence 4096) built and
  stepped by the trainer (``build_trainable``, ``train_step``) on synthetic token ids, IRL
  (lambda 0.1), MLE (lambda 0) and Megatron's cross entropy round-robin (``tools/bench_step.py``).
  FP8 (``--fp8-format hybrid``) is skipped with the reason when Transformer Engine cannot run.
- ``gpu-path``: the GPU path's correctness (``bench/gpu_path_check.py``): model placement and
  dtype without TE, fusion flags, checkpoints across the local and TE specs, THD packed
  attention against the block mask, and each FP8 recipe run or refused with the reason.
- ``table``: every measurement against issue #9's targets in one table (``table.md``) and all
  parts' results in ``results.json``.

Model FLOPs per training step (stated in the table): tokens x (6 N + 6 L s d), N the parameters
that multiply activations (all but the input embedding lookup; a tied output layer counts), L
layers, s the sequence length, d = heads x head dim; 6 L s d is the causal half of attention's
12 L s d. MFU divides by the dense bf16 peak of the GPU (989 TFLOP/s on H100 SXM and H200).

    bash bench/gpu_check.sh                          # on a GPU machine: every part, timed out
    python bench/gpu_check.py --smoke --out /tmp/gc env loss train-bf16 train-fp8 table  # CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# The loss and step benchmarks are scripts in tools/ (not a package); this composes them.
sys.path[:0] = [str(REPO), str(REPO / "tools"), str(REPO / "bench")]

from gpu_path_check import part_gpu_path  # noqa: E402  (needs the path above)
from gpu_path_check import table_rows as gpu_path_table_rows  # noqa: E402

PARTS = ("env", "loss", "train-bf16", "train-fp8", "gpu-path", "table")
BF16_DENSE_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # SXM, without sparsity
FP32_RTOL, BF16_GRAD_RTOL = 1e-5, 2.0**-8  # as tests/test_loss.py argues them
TARGETS = {"loss_time_ratio": 1.05, "irl_mle_step_ratio": 1.02, "mfu_bf16": 0.40}

# Sizes: (GPU check, CPU smoke test).
LOSS_SIZES = {False: {"tokens": 8192, "vocab": 131072, "check_tokens": 2048, "repeats": 20},
              True: {"tokens": 64, "vocab": 512, "check_tokens": 64, "repeats": 2}}
MODEL_FLAGS = {
    False: ["--num-layers", "16", "--hidden-size", "2048", "--num-attention-heads", "16",
            "--num-query-groups", "4", "--ffn-hidden-size", "5632", "--seq-length", "4096",
            "--vocab", "128256", "--micro-batch-size", "1", "--micro-batches", "8",
            "--document-length", "512", "--repeats", "30"],
    True: ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
           "--num-query-groups", "2", "--ffn-hidden-size", "128", "--seq-length", "32",
           "--vocab", "512", "--micro-batch-size", "1", "--micro-batches", "2",
           "--document-length", "16", "--repeats", "2"],
}


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def scaled_error(actual, expected, scale=0.0) -> float:
    """max |actual - expected| / (|expected| + max |expected| + scale): the test suite's
    tolerance rule as a number (a check passes when it is <= the rtol)."""
    expected = expected.double()
    denominator = expected.abs() + expected.abs().max() + scale
    return float(((actual.double() - expected).abs() / denominator.clamp(min=1e-300)).max())


def part_env(args) -> dict:
    import megatron.core

    from megatron_irl.cpu_support import transformer_engine_problem

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "megatron_core": megatron.core.__version__,
            "device": "cpu", "transformer_engine": transformer_engine_problem(fp8_recipe="delayed")}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError as exc:
        info["triton"] = f"not importable ({exc})"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        info["device"] = f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})"
        info["bf16_matmul_tflops"] = round(matmul_tflops(), 1)
    if info["transformer_engine"] is None:
        import transformer_engine
        info["transformer_engine"] = transformer_engine.__version__
    return info


def matmul_tflops(n: int = 8192, repeats: int = 10) -> float:
    """Achieved TFLOP/s of an ``n`` x ``n`` x ``n`` bf16 matmul on random data (after three
    warm-ups): what this GPU gives a large dense GEMM, beside its nominal peak."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    _synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def check_against_reference(tokens: int, vocab: int, lam: float, gamma: float) -> dict:
    """Scaled errors of the soft-Q loss on bf16 logits ``[4, tokens/4, vocab]`` (outputs, and
    the gradient of the mean loss) and of Megatron's cross entropy, against float64."""
    from bench_loss import loss_inputs
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_irl.loss import soft_q_loss_reference, vocab_parallel_soft_q_loss

    shape = argparse.Namespace(tokens=tokens, vocab=vocab, real_vocab=None, dtype=torch.bfloat16)
    logits, labels, loss_mask, terminal = loss_inputs(shape, tp=1, device=_device())
    logits.requires_grad_()
    out = vocab_parallel_soft_q_loss(logits, labels, loss_mask, terminal, lam=lam, gamma=gamma)
    (out.loss.sum() / loss_mask.sum()).backward()
    exact = logits.detach().double().requires_grad_()
    ref = soft_q_loss_reference(exact, labels, loss_mask.double(), terminal, lam=lam, gamma=gamma)
    (ref.loss.sum() / loss_mask.double().sum()).backward()
    value_scale = float(ref.value.abs().max())
    errors = {name: scaled_error(a, e, value_scale) for name, a, e in zip(out._fields, out, ref)}
    errors["grad"] = scaled_error(logits.grad, exact.grad)
    megatron_nll = vocab_parallel_cross_entropy(logits.detach(), labels.clamp(min=0)) * loss_mask
    errors["megatron_nll"] = scaled_error(megatron_nll, ref.nll, value_scale)
    limits = {name: BF16_GRAD_RTOL if name == "grad" else FP32_RTOL for name in errors}
    return {"shape": list(logits.shape), "lam": lam, "gamma": gamma, "errors": errors,
            "limits": limits, "passed": all(errors[n] <= limits[n] for n in errors)}


def time_losses(tokens: int, vocab: int, dtype: torch.dtype, repeats: int, lam: float,
                gamma: float) -> dict:
    """Median forward+backward seconds (round-robin, loss alone, inputs restored outside the
    timing) and peak allocated bytes above the inputs' (GPU only) of each loss."""
    from bench_loss import loss_inputs, run_loss

    shape = argparse.Namespace(tokens=tokens, vocab=vocab, real_vocab=None, dtype=dtype)
    pristine, labels, loss_mask, terminal = loss_inputs(shape, tp=1, device=_device())
    logits = torch.empty_like(pristine, requires_grad=True)
    names = ("megatron_cross_entropy", "soft_q")

    def step(name) -> float:
        with torch.no_grad():
            logits.copy_(pristine)  # fp32 logits are overwritten in place by both losses
        logits.grad = None
        _synchronize()
        start = time.perf_counter()
        run_loss(name, logits, labels, loss_mask, terminal, None, lam, gamma)
        _synchronize()
        return time.perf_counter() - start

    seconds = {name: [] for name in names}
    for repeat in range(repeats + 1):  # the first round warms up
        for name in names:
            elapsed = step(name)
            if repeat:
                seconds[name].append(elapsed)
    results = {name: {"median_s": statistics.median(seconds[name]), "peak_extra_bytes": None}
               for name in names}
    if torch.cuda.is_available():
        for name in names:
            logits.grad = None
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step(name)
            results[name]["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - before
    return {"shape": list(pristine.shape), "dtype": str(dtype).removeprefix("torch."),
            "repeats": repeats, "losses": results}


def part_loss(args) -> dict:
    from megatron_irl.config import ParallelConfig
    from megatron_irl.core.distributed import init_distributed, shutdown_distributed

    sizes = LOSS_SIZES[args.smoke]
    init_distributed(ParallelConfig(), seed=1234)  # Megatron's cross entropy needs its groups
    try:
        return {
            "reference": check_against_reference(sizes["check_tokens"], sizes["vocab"],
                                                  lam=0.1, gamma=1.0),
            "timing": [time_losses(sizes["tokens"], sizes["vocab"], dtype, sizes["repeats"],
                                   lam=0.1, gamma=1.0)
                       for dtype in (torch.bfloat16, torch.float32)],
        }
    finally:
        shutdown_distributed()


def model_flops_per_token(step_args, matmul_parameters: int) -> float:
    """6 N + 6 L s d (see the module docstring)."""
    d_attention = step_args.hidden_size  # heads x head dim: kv_channels is unset
    return 6 * matmul_parameters + 6 * step_args.num_layers * step_args.seq_length * d_attention


def part_train(args, precision: str) -> dict:
    from bench_step import build_parser, measure

    from megatron_irl.cpu_support import transformer_engine_problem

    flags = list(MODEL_FLAGS[args.smoke]) + ["--bf16"]
    if precision == "fp8":
        problem = transformer_engine_problem(fp8_recipe="delayed")
        if problem:
            return {"skipped": problem}
        flags += ["--fp8-format", "hybrid"]
    step_args = build_parser().parse_args(flags)
    measured = measure(step_args, deadline=args.deadline)
    flops_per_step = (measured["tokens_per_step"]
                      * model_flops_per_token(step_args, measured["matmul_parameters"]))
    peak = peak_tflops(args)
    for result in measured["objectives"].values():
        median = statistics.median(result["seconds"])
        tflops = flops_per_step / median / 1e12
        result.update(steps=len(result["seconds"]), median_s=median,
                      tokens_per_s=measured["tokens_per_step"] / median, model_tflops=tflops,
                      mfu=tflops / peak if peak else None)
    return {"flags": flags, "model": describe_model(step_args), "data": describe_data(step_args),
            "model_flops_per_step": flops_per_step, "peak_tflops": peak, **measured}


def describe_model(a) -> str:
    return (f"{a.num_layers} layers, hidden {a.hidden_size}, {a.num_attention_heads} heads in "
            f"{a.num_query_groups} query groups, SwiGLU {a.ffn_hidden_size}, RoPE, RMSNorm, "
            f"vocabulary {a.vocab} (tied), sequence {a.seq_length}, "
            f"{a.micro_batches} micro-batches of {a.micro_batch_size} per step, "
            + ("fp8 " + a.fp8_format if a.fp8_format else "bf16"))


def describe_data(a) -> str:
    return (f"synthetic token ids, uniform over the vocabulary; each {a.seq_length}-token row "
            f"packs {a.document_length}-token documents (block-causal mask), the first quarter "
            "of each untrained; the same micro-batches every step")


def peak_tflops(args) -> float | None:
    """--peak-tflops, else the dense bf16 peak of a known GPU, else None (no MFU)."""
    if args.peak_tflops or not torch.cuda.is_available():
        return args.peak_tflops
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in BF16_DENSE_PEAK_TFLOPS.items() if key in name), None)


def _read(out: Path, part: str) -> dict:
    path = out / f"{part.replace('-', '_')}.json"
    if not path.exists():
        return {"error": f"{path.name} missing: the part did not finish (see log.txt)"}
    return json.loads(path.read_text())


def _status(value: float | None, limit: float, *, at_most: bool) -> str:
    if value is None:
        return "n/a"
    return "met" if (value <= limit if at_most else value >= limit) else "NOT met"


def table_rows(out: Path) -> list[tuple[str, str, str, str]]:
    """(measurement, value, target, status) for every part's results under ``out``."""
    loss = _read(out, "loss")
    rows = [("loss", _last_line(loss["error"]), "", "error")] if "error" in loss else [
        *_reference_rows(loss["reference"]),
        *(row for timing in loss["timing"] for row in _loss_timing_rows(timing)),
    ]
    for precision in ("bf16", "fp8"):
        rows.extend(_train_rows(_read(out, f"train-{precision}"), precision))
    gpu_path = _read(out, "gpu-path")
    rows.extend([("gpu path", _last_line(gpu_path["error"]), "", "error")] if "error" in gpu_path
                else gpu_path_table_rows(gpu_path))
    return rows


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def _reference_rows(ref: dict) -> list[tuple[str, str, str, str]]:
    errors = ", ".join(f"{name} {error:.1e}" for name, error in ref["errors"].items())
    limits = f"<= {FP32_RTOL:.0e} (grad {BF16_GRAD_RTOL:.1e})"
    return [(f"loss vs float64 reference, bf16 {ref['shape']} (scaled error)", errors, limits,
             "pass" if ref["passed"] else "FAIL")]


def _loss_timing_rows(timing: dict) -> list[tuple[str, str, str, str]]:
    ce, soft_q = timing["losses"]["megatron_cross_entropy"], timing["losses"]["soft_q"]
    ratio = soft_q["median_s"] / ce["median_s"]
    has_target = timing["dtype"] == "bfloat16"  # the trainer's logits under --bf16
    limit = TARGETS["loss_time_ratio"]
    rows = [(f"loss fwd+bwd {timing['dtype']} {timing['shape']}: soft-Q / Megatron CE",
             f"{soft_q['median_s'] * 1e3:.2f} / {ce['median_s'] * 1e3:.2f} ms = {ratio:.3f}x",
             f"<= {limit}x" if has_target else "",
             _status(ratio, limit, at_most=True) if has_target else "")]
    if ce["peak_extra_bytes"]:
        soft_q_mib, ce_mib = soft_q["peak_extra_bytes"] / 2**20, ce["peak_extra_bytes"] / 2**20
        rows.append((f"loss peak extra memory {timing['dtype']}: soft-Q / Megatron CE",
                     f"{soft_q_mib:.0f} / {ce_mib:.0f} MiB = {soft_q_mib / ce_mib:.3f}x", "", ""))
    return rows


def _train_rows(train: dict, precision: str) -> list[tuple[str, str, str, str]]:
    prefix = f"train {precision}"
    if "skipped" in train:
        return [(prefix, train["skipped"], "", "skipped")]
    if "error" in train:
        return [(prefix, _last_line(train["error"]), "", "error")]
    objectives = train["objectives"]
    model = (f"{train['model']}; {train['matmul_parameters']:,} matmul parameters, "
             f"{train['tokens_per_step']:,} tokens/step, attention "
             f"{_attention_note(train['core_attention'])}")
    rows = [(f"{prefix}: model", model, "", "")]
    for name, result in objectives.items():
        mfu = result["mfu"]
        value = (f"{result['median_s'] * 1e3:.1f} ms/step, {result['tokens_per_s']:,.0f} "
                 f"tokens/s, {result['model_tflops']:.1f} TFLOP/s, MFU "
                 + (f"{mfu:.1%}" if mfu is not None else "n/a")
                 + (f", peak {result['peak_bytes'] / 2**30:.1f} GiB"
                    if result["peak_bytes"] else "")
                 + f", loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}")
        has_target = precision == "bf16" and name == "irl"
        rows.append((f"{prefix}: {name} ({result['steps']} steps)", value,
                     f"MFU >= {TARGETS['mfu_bf16']:.0%}" if has_target else "",
                     _status(mfu, TARGETS["mfu_bf16"], at_most=False) if has_target else ""))
    ratio = objectives["irl"]["median_s"] / objectives["mle"]["median_s"]
    limit = TARGETS["irl_mle_step_ratio"]
    rows.append((f"{prefix}: step time IRL / MLE", f"{ratio:.3f}", f"<= {limit}",
                 _status(ratio, limit, at_most=True)))
    return rows


def _attention_note(module_class: str) -> str:
    if module_class.startswith("megatron.core.transformer.dot_product_attention."):
        return "Megatron-Core's unfused DotProductAttention ([b, heads, s, s] scores in memory)"
    if "TEDotProductAttention" in module_class:
        return "Transformer Engine's (its backend choice: 'Selected backend' in log.txt)"
    return module_class


def part_table(args) -> dict:
    env = _read(args.out, "env")
    rows = table_rows(args.out)
    header = [
        "# GPU check (issue #9)",
        "",
        "environment: " + ", ".join(f"{k} {v}" for k, v in env.items()),
        "",
        "training data: " + _read(args.out, "train-bf16").get("data", "n/a"),
        ("model FLOPs/step = tokens x (6 N + 6 L s d): N matmul parameters (tied output layer "
         "counted, input lookup not), L layers, s sequence, d = heads x head dim (causal half "
         "of attention); MFU against the dense bf16 peak."),
        "",
        "| measurement | value | target | status |",
        "|---|---|---|---|",
    ]
    text = "\n".join(header + [f"| {' | '.join(row)} |" for row in rows]) + "\n"
    (args.out / "table.md").write_text(text)
    print(text)
    results = {part.replace("-", "_"): _read(args.out, part) for part in PARTS[:-1]}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    return {"rows": len(rows)}


def run_part(args, part: str) -> bool:
    """Run one part, write its JSON (the error's traceback if it raised); True if it ran."""
    runners = {"env": part_env, "loss": part_loss, "table": part_table,
               "gpu-path": part_gpu_path,
               "train-bf16": lambda a: part_train(a, "bf16"),
               "train-fp8": lambda a: part_train(a, "fp8")}
    print(f"== {part}", flush=True)
    try:
        result, ok = runners[part](args), True
    except Exception:  # report and go on: the other parts' results are still wanted
        result, ok = {"error": traceback.format_exc()}, False
        print(result["error"], file=sys.stderr, flush=True)
    if part != "table":
        path = args.out / f"{part.replace('-', '_')}.json"
        path.write_text(json.dumps(result, indent=1))
        print(json.dumps(result)[:2000], flush=True)
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("parts", nargs="+", choices=PARTS)
    parser.add_argument("--out", type=Path, required=True, help="directory for the results")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes; runs on a CPU (the test suite's check of this script)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="training parts start no timed round that would end more "
                             "than this many seconds after the parts start")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak for MFU; unset: known H100/H200 value")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible: pass --smoke for the tiny CPU run")
    args.deadline = time.monotonic() + args.budget_s if args.budget_s else None
    args.out.mkdir(parents=True, exist_ok=True)
    failed = [part for part in args.parts if not run_part(args, part)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
