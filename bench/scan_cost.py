"""CPU cost of a whole ``attnstab scan`` against what a user would otherwise run, as ratios from ONE run on one machine.

Why: the issue sets budgets on what a scan costs relative to running the model at all (a real-size LLaMA-family
model on the CPU: at most 3x the wall time and 1.5x the peak RSS of a plain ``transformers`` forward pass over the
same tokens), relative to the plain θ script (transformers eager + ``output_attentions=True`` + sort-based θ: attnstab
at least 5x faster and at most 1/5 of its peak RSS), and in absolute terms (the README's first command within 20 s on
2 cores; an 8192-token scan under 4 GB). This script measures all of them in one run so each ratio compares figures
taken on the same machine, tokens and thread count.

Every measurement is a fresh subprocess timed from process start to exit (Python start, imports, loading and, for
the scan, the report written): peak RSS is that process's own ``ru_maxrss`` from ``os.wait4``, so it belongs to that
measurement alone. The scan runs through the venv's ``attnstab`` entry point with default options, except
``--tokens FILE`` and an explicit ``--batch-size`` (equal to the default, 4) so the plain baseline can run exactly
the same batches. Random-weight checkpoints are written by ``transformers`` into temporary directories (removed at
the end). A subprocess that runs past ``--timeout`` is killed and recorded as a failed figure.

Figures (``--only NAME``): ``real_size`` (SmolLM2-135M-shaped LLaMA, 8x256 and 1x2048 tokens), ``plain_theta``
(GPT-2-width 6-layer model, 2x1024), ``readme`` (the README's first command), ``memory`` (llama-tiny's architecture
at 1x8192), ``qwen3`` (Qwen3-0.6B-shaped model with per-head q/k norms, 4x256, the real-size budgets), ``mixtral``
(Mixtral-8x7B-shaped mixture of experts scaled down to d = 1024, 4 layers, 8 experts, top-2, 4x256, the real-size
budgets; ``--smoke`` shrinks it to check the harness, and its figures mean nothing), ``threads`` (the 8x256 scan
with 1 and all threads, idle and under load; ``--threads-study`` runs only this, ``--quick`` skips it).

``--distributed`` runs only the scaling figure: the real-size LLaMA at 8x256 (4 sequences per rank at 2 ranks) as
one process (T1), then under torchrun with 1 process (the launcher's own cost) and 2, the ``--threads`` total split
evenly between the ranks; with more than one GPU also one process and torchrun with 2..N on ``--device cuda``. Each
launch runs ``python -m attnstab_cli`` from this tree, and records speedup T1 / T_W, efficiency speedup / W, the
peak RSS of every rank, rank 0's stage timings (``ranks_wait_s``, ``merge_s``) and whether its report's counts,
extrema and percentiles are bit-identical to T1's (``scan_distributed.py``). It writes
bench/results/scan_cost_distributed_cpu.json and .md (``_gpu`` beside them) and, unless ``--smoke`` or
``--out-json``, the table into README.md between its markers.

Run:  python bench/scan_cost.py [--quick] [--only NAME] [--threads-study] [--distributed] [--smoke] [--timeout S]
      [--out-json PATH]
Writes bench/results/scan_cost_cpu.json and .md (the markdown table, also printed; ``--only NAME`` writes
scan_cost_cpu_NAME.json/.md instead) after every figure and, with the thread study, bench/results/scan_threads_cpu.json
and .md. The whole run takes about 30 min on 2 busy cores at the time of writing. Never run as a test. MB here means
MiB (2^20 bytes).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import scan_distributed as dist

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SCAN_BATCH_SIZE = 4  # attnstab scan's default --batch-size, passed explicitly so the baselines batch identically

# SmolLM2-135M's configuration (HuggingFaceTB/SmolLM2-135M config.json), random weights.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_act="silu",
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192,
                    bos_token_id=0, eos_token_id=0)
# The same architecture at toy size (the 3:1 grouped-query ratio kept), only to check a harness (``--smoke``).
SMOLLM2_SMOKE = {**SMOLLM2_135M, "vocab_size": 512, "hidden_size": 96, "intermediate_size": 256,
                 "num_hidden_layers": 4, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 16}
# Qwen3-0.6B's configuration (Qwen/Qwen3-0.6B config.json), random weights: per-head q/k RMSNorm.
QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, hidden_act="silu", rms_norm_eps=1e-6,
                 rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=40960,
                 attention_bias=False, bos_token_id=0, eos_token_id=0)
# Mixtral-8x7B (mistralai/Mixtral-8x7B-v0.1 config.json: d 4096, FFN 14336, 32 heads, 8 kv heads, 32 layers,
# 8 experts, top-2, vocab 32000, rope_theta 1e6) scaled down: d and the expert FFN width / 4 (FFN 3.5 d kept), head_dim
# 128 kept (8 heads), the 4:1 grouped-query ratio kept (2 kv heads), 4 layers, its vocabulary and routing kept.
# About 429M parameters (1.7 GB in float32), 88M of them per layer in the experts: the resident unit is one layer.
MIXTRAL_D1024 = dict(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=128, num_local_experts=8,
                     num_experts_per_tok=2, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=1000000.0,
                     max_position_embeddings=4096, sliding_window=None, tie_word_embeddings=False,
                     router_aux_loss_coef=0.0, bos_token_id=1, eos_token_id=2)
# The same architecture at toy size, only to check that the figure's harness runs (``--smoke``).
MIXTRAL_SMOKE = {**MIXTRAL_D1024, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 224,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16}
# GPT-2-small width, 6 layers, GPT-2's own vocabulary size.
GPT2_6L = dict(n_layer=6, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
LLAMA_TINY = ROOT / "sample_checkpoints" / "llama-tiny"
GPT2_TINY = ROOT / "sample_checkpoints" / "gpt2-tiny"


# ----------------------------------------------------------------------------------------------- child processes

def child_build(kind: str, directory: Path) -> dict:
    """Write a seeded random-weight checkpoint of ``kind`` to ``directory`` (safetensors)."""
    import torch
    import transformers

    torch.manual_seed(0)
    if kind in ("smollm2-135m", "smollm2-smoke"):
        cfg = SMOLLM2_135M if kind == "smollm2-135m" else SMOLLM2_SMOKE
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    elif kind == "qwen3-0.6b":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**QWEN3_06B))
    elif kind in ("mixtral-d1024", "mixtral-smoke"):
        cfg = MIXTRAL_D1024 if kind == "mixtral-d1024" else MIXTRAL_SMOKE
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**cfg))
    elif kind == "gpt2-6l":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_6L))
    elif kind == "llama-tiny-8k":
        cfg = transformers.LlamaConfig.from_pretrained(LLAMA_TINY)
        cfg.max_position_embeddings = 8192
        model = transformers.LlamaForCausalLM(cfg)
    else:
        raise ValueError(kind)
    model.save_pretrained(directory, safe_serialization=True)
    return {"kind": kind, "parameters": sum(p.numel() for p in model.parameters())}


def sorted_theta_head_means(p: Any) -> Any:
    """Sort-based θ estimate of every row of ``p`` [B, H, n, n], mean over batch and rows: [H]."""
    c = p.sort(dim=-1, descending=True).values.cumsum(-1)
    k = (c - 0.5).abs().argmin(dim=-1, keepdim=True)
    ck = c.gather(-1, k).squeeze(-1)
    return (4 * ck * (1 - ck)).mean(dim=(0, 2))


def child_plain(model_dir: Path, tokens: Path, batch_size: int, theta: bool) -> dict:
    """The baseline a user would write: a float32 ``transformers`` forward over the tokens in ``batch_size`` rows
    (SDPA), or with ``theta`` eager attention, ``output_attentions=True`` and the sort-based θ per head."""
    t0 = time.perf_counter()
    import numpy as np
    import torch
    import transformers

    t1 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="eager" if theta else "sdpa", dtype=torch.float32).eval()
    ids = torch.from_numpy(np.load(tokens, allow_pickle=False)).long()
    t2 = time.perf_counter()
    sums = None
    with torch.no_grad():
        for batch in ids.split(batch_size):
            out = model(batch, output_attentions=theta)
            if theta:
                means = torch.stack([sorted_theta_head_means(p) for p in out.attentions]) * batch.shape[0]
                sums = means if sums is None else sums + means
            del out
    t3 = time.perf_counter()
    res = {"import_s": t1 - t0, "load_s": t2 - t1, "forward_s": t3 - t2, "torch_threads": torch.get_num_threads(),
           "tokens": list(ids.shape), "attn_implementation": "eager" if theta else "sdpa",
           "experts_implementation": getattr(model.config, "_experts_implementation", None)}
    if theta:
        res["theta_sorted_head_means"] = [[round(float(v), 6) for v in row] for row in sums / ids.shape[0]]
    return res


def child_main(argv: list[str]) -> int:
    mode, *rest = argv
    if mode == "--_build":
        res = child_build(rest[0], Path(rest[1]))
    elif mode in ("--_plain", "--_plain-theta"):
        res = child_plain(Path(rest[0]), Path(rest[1]), int(rest[2]), theta=mode == "--_plain-theta")
    else:
        raise SystemExit(f"unknown child mode {mode}")
    print(json.dumps(res))
    return 0


# ------------------------------------------------------------------------------------------------- measurement

@dataclass
class Run:
    """One subprocess: wall time from start to exit, its own peak RSS, exit status."""

    cmd: list[str]
    wall_s: float
    peak_rss_mb: float
    rc: int | None
    timed_out: bool
    stdout: str = ""
    stderr_tail: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out

    def record(self) -> dict:
        rec = {"cmd": shlex.join(self.cmd), "wall_s": round(self.wall_s, 3), "peak_rss_mb": round(self.peak_rss_mb, 1),
               "rc": self.rc, "timed_out": self.timed_out, **self.extra}
        if not self.ok:
            rec["stderr_tail"] = self.stderr_tail
        return rec


def measure(cmd: list[str], env: dict[str, str], timeout: float,
            on_start: Callable[[int], None] | None = None) -> Run:
    """Run ``cmd`` in its own session; kill its process group and its descendants after ``timeout`` s. Peak RSS
    from ``os.wait4``: the largest of the process and the descendants it waited for. ``on_start`` hears the pid
    once the process runs."""
    fired = threading.Event()

    def kill() -> None:
        fired.set()
        orphans = dist.descendants(proc.pid)  # torchrun's workers: sessions of their own, listed before it dies
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    load = os.getloadavg()[0]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT, start_new_session=True)
        if on_start is not None:
            on_start(proc.pid)
        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            kill()
            proc.wait()
            raise
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    return Run(cmd, wall, usage.ru_maxrss / 1024, proc.returncode, fired.is_set(), stdout, stderr[-2000:],
               {"loadavg_1min_before": round(load, 2)})


@contextlib.contextmanager
def cpu_load(n: int) -> Iterator[list[int]]:
    """``n`` busy-loop Python processes (one per core) for the duration of the block, killed by pid afterwards."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(n)]
    time.sleep(1.0)  # let them reach the spin loop before the measurement starts
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()


@dataclass
class Ctx:
    """What every figure needs: options, the thread count, the child environment, where to write."""

    timeout: float
    threads: int
    seed: int
    tmp: Path
    scan_cmd: list[str]
    threads_model: str = "smollm2-135m"
    smoke: bool = False

    def env(self, threads: int | None = None) -> dict[str, str]:
        n = str(threads or self.threads)
        return {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}


def attnstab_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "attnstab"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "attnstab_cli"]


def build(ctx: Ctx, kind: str) -> tuple[Path, dict]:
    """Write checkpoint ``kind`` under the run's temp dir (in a child, so this process stays small)."""
    path = ctx.tmp / kind
    out = subprocess.run([sys.executable, __file__, "--_build", kind, str(path)], env=ctx.env(), cwd=ROOT,
                         check=True, capture_output=True, text=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    info["config"] = json.loads((path / "config.json").read_text())
    return path, info


def make_tokens(ctx: Ctx, model_dir: Path, shape: tuple[int, int]) -> Path:
    import numpy as np

    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    ids = np.random.default_rng(ctx.seed).integers(0, vocab, size=shape, dtype=np.int64)
    path = ctx.tmp / f"tokens_{model_dir.name}_{shape[0]}x{shape[1]}.npy"
    np.save(path, ids)
    return path


def run_scan(ctx: Ctx, ckpt: Path, tokens: Path | None, threads: int | None = None,
             extra: tuple[str, ...] = ("--batch-size", str(SCAN_BATCH_SIZE)),
             on_start: Callable[[int], None] | None = None) -> Run:
    """``attnstab scan CKPT [--tokens FILE] --out OUT --force``; attaches the manifest's ``run.timings``."""
    out = ctx.tmp / f"report_{ckpt.name}_{time.monotonic_ns()}"
    cmd = [*ctx.scan_cmd, "scan", str(ckpt), *(["--tokens", str(tokens)] if tokens else []), "--out", str(out),
           "--force", *extra]
    run = measure(cmd, ctx.env(threads), ctx.timeout, on_start)
    manifest = out / "manifest.json"
    run.extra["out"] = str(out)
    run.extra["timings"] = json.loads(manifest.read_text())["run"].get("timings") if run.ok else None
    return run


def run_plain(ctx: Ctx, model_dir: Path, tokens: Path, theta: bool = False) -> Run:
    mode = "--_plain-theta" if theta else "--_plain"
    run = measure([sys.executable, __file__, mode, str(model_dir), str(tokens), str(SCAN_BATCH_SIZE)], ctx.env(),
                  ctx.timeout)
    if run.ok:
        run.extra["phases"] = json.loads(run.stdout.strip().splitlines()[-1])
    return run


def check(name: str, value: float | None, op: str, bound: float, unit: str = "") -> dict:
    ok = value is not None and (value <= bound if op == "<=" else value >= bound if op == ">=" else value < bound)
    return {"name": name, "value": None if value is None else round(value, 4), "budget": f"{op} {bound}{unit}",
            "pass": bool(ok)}


def ratio(a: Run, b: Run | None, attr: str) -> float | None:
    if b is None or not (a.ok and b.ok):
        return None
    return getattr(a, attr) / getattr(b, attr)


def record(name: str, what: str, shape: list[int] | None, measured: Run, baseline: Run | None, checks: list[dict],
           ctx: Ctx, **extra: Any) -> dict:
    return {"figure": name, "what": what, "tokens": shape, "threads": ctx.threads,
            "measured": measured.record(), "baseline": baseline.record() if baseline else None,
            "checks": checks, "pass": all(c["pass"] for c in checks) and measured.ok, **extra, "env": environment()}


# ------------------------------------------------------------------------------------------------------ figures

def fig_real_size(ctx: Ctx) -> list[dict]:
    """1. SmolLM2-135M-shaped LLaMA: scan <= 3x the wall and <= 1.5x the peak RSS of a plain SDPA forward."""
    model, info = build(ctx, "smollm2-135m")
    recs = []
    for shape in ((8, 256), (1, 2048)):
        tokens = make_tokens(ctx, model, shape)
        plain, scan = run_plain(ctx, model, tokens), run_scan(ctx, model, tokens)
        checks = [check("ratio_wall", ratio(scan, plain, "wall_s"), "<=", 3),
                  check("ratio_rss", ratio(scan, plain, "peak_rss_mb"), "<=", 1.5)]
        recs.append(record(f"real_size_{shape[0]}x{shape[1]}",
                           "attnstab scan (defaults) vs plain transformers SDPA float32 forward, whole processes",
                           list(shape), scan, plain, checks, ctx, model={"kind": "smollm2-135m (random weights)",
                                                                          "parameters": info["parameters"]}))
    return recs


def fig_qwen3(ctx: Ctx) -> list[dict]:
    """6. Qwen3-0.6B-shaped model (q/k norms) at 4x256: the real-size budgets of figure 1, for a q/k-norm family."""
    model, info = build(ctx, "qwen3-0.6b")
    tokens = make_tokens(ctx, model, (4, 256))
    plain, scan = run_plain(ctx, model, tokens), run_scan(ctx, model, tokens)
    checks = [check("ratio_wall", ratio(scan, plain, "wall_s"), "<=", 3),
              check("ratio_rss", ratio(scan, plain, "peak_rss_mb"), "<=", 1.5)]
    return [record("qwen3_0.6b_4x256", "attnstab scan (defaults) vs plain transformers SDPA float32 forward, whole "
                   "processes", [4, 256], scan, plain, checks, ctx,
                   model={"kind": "qwen3-0.6b (random weights)", "parameters": info["parameters"]})]


def fig_mixtral(ctx: Ctx) -> list[dict]:
    """7. Mixtral-shaped mixture of experts (MIXTRAL_D1024) at 4x256: the real-size budgets of figure 1, with one
    layer and all its experts resident in the scan and the whole model in the plain forward."""
    kind, shape = ("mixtral-smoke", (2, 32)) if ctx.smoke else ("mixtral-d1024", (4, 256))
    model, info = build(ctx, kind)
    tokens = make_tokens(ctx, model, shape)
    plain, scan = run_plain(ctx, model, tokens), run_scan(ctx, model, tokens)
    checks = [check("ratio_wall", ratio(scan, plain, "wall_s"), "<=", 3),
              check("ratio_rss", ratio(scan, plain, "peak_rss_mb"), "<=", 1.5)]
    resident = json.loads((Path(scan.extra["out"]) / "manifest.json").read_text())["checkpoint"]["resident"] \
        if scan.ok else None
    return [record(f"{kind}_{shape[0]}x{shape[1]}", "attnstab scan (defaults) vs plain transformers SDPA float32 "
                   "forward, whole processes" + (" (SMOKE: toy shapes, not the figure)" if ctx.smoke else ""),
                   list(shape), scan, plain, checks, ctx,
                   model={"kind": f"{kind} (random weights)", "parameters": info["parameters"],
                          "config": MIXTRAL_SMOKE if ctx.smoke else MIXTRAL_D1024},
                   info={"resident": resident})]


def fig_plain_theta(ctx: Ctx) -> list[dict]:
    """2. GPT-2-width 6 layers at 2x1024: attnstab >= 5x faster and <= 1/5 the peak RSS of the plain θ script."""
    model, info = build(ctx, "gpt2-6l")
    tokens = make_tokens(ctx, model, (2, 1024))
    plain, scan = run_plain(ctx, model, tokens, theta=True), run_scan(ctx, model, tokens)
    checks = [check("speedup_plain_over_scan", ratio(plain, scan, "wall_s"), ">=", 5),
              check("ratio_rss_scan_over_plain", ratio(scan, plain, "peak_rss_mb"), "<=", 0.2)]
    return [record("plain_theta_2x1024", "attnstab scan (defaults) vs transformers eager output_attentions=True + "
                   "sort-based θ per row, float32, whole processes", [2, 1024], scan, plain, checks, ctx,
                   model={"kind": "gpt2 6-layer, n_embd 768, 12 heads, vocab 50257 (random weights)",
                          "parameters": info["parameters"]})]


def fig_readme(ctx: Ctx) -> list[dict]:
    """3. The README's first command (bundled corpus, all defaults) within 20 s, Python start included."""
    scan = run_scan(ctx, GPT2_TINY, None, extra=())
    plain = run_plain(ctx, GPT2_TINY, Path(scan.extra["out"]) / "tokens.npy") if scan.ok else None
    checks = [check("wall_s", scan.wall_s if scan.ok else None, "<=", 20, " s")]
    shape = list(plain.extra["phases"]["tokens"]) if plain and plain.ok else None
    return [record("readme", "attnstab scan sample_checkpoints/gpt2-tiny --out DIR --force (absolute budget; the "
                   "baseline, a plain SDPA forward on the scan's tokens.npy, is for context)", shape, scan, plain,
                   checks, ctx, info={"ratio_wall_vs_plain": ratio(scan, plain, "wall_s")})]


def fig_memory(ctx: Ctx) -> list[dict]:
    """4. llama-tiny's architecture at 1x8192 tokens: the scan completes with peak RSS < 4 GB."""
    model, info = build(ctx, "llama-tiny-8k")
    tokens = make_tokens(ctx, model, (1, 8192))
    scan = run_scan(ctx, model, tokens)
    plain = run_plain(ctx, model, tokens)
    checks = [check("peak_rss_mb", scan.peak_rss_mb if scan.ok else None, "<", 4096, " MB")]
    return [record("memory_1x8192", "attnstab scan (defaults) of llama-tiny's architecture (random weights, "
                   "max_position_embeddings 8192); absolute budget, plain SDPA forward for context", [1, 8192],
                   scan, plain, checks, ctx, model={"kind": "llama-tiny-8k", "parameters": info["parameters"]},
                   info={"ratio_rss_vs_plain": ratio(scan, plain, "peak_rss_mb")})]


def fig_threads(ctx: Ctx) -> list[dict]:
    """5. The 8x256 scan of ``--threads-model`` with 1 and ``--threads`` threads, idle and with a busy loop per core
    (no budget: how much the default thread count loses when other work holds the cores)."""
    model, info = build(ctx, ctx.threads_model)
    tokens = make_tokens(ctx, model, (8, 256))
    runs: dict[tuple[int, bool], Run] = {}
    for load in (False, True):
        for threads in (1, ctx.threads):
            with cpu_load(os.cpu_count() or 1) if load else contextlib.nullcontext():
                runs[(threads, load)] = run_scan(ctx, model, tokens, threads)
    base = runs[(ctx.threads, False)]
    what = (f"attnstab scan (defaults) of {ctx.threads_model} (random weights) on 8x256 tokens with OMP_NUM_THREADS="
            f"MKL_NUM_THREADS=threads; load: {os.cpu_count()} busy-loop processes; baseline: {ctx.threads} threads, "
            "idle")
    recs = []
    for (threads, load), run in runs.items():
        ctx_t = replace(ctx, threads=threads)
        recs.append(record(f"threads_{threads}_{'load' if load else 'idle'}", what, [8, 256], run, base, [], ctx_t,
                           load=load, model={"kind": ctx.threads_model, "parameters": info["parameters"]},
                           info={"ratio_wall_vs_default_idle": ratio(run, base, "wall_s")}))
    return recs


def launch_scan(ctx: Ctx, model: Path, tokens: Path, device: str, world: int, torchrun: bool) -> tuple[Run, dict]:
    """One whole scan of ``tokens``: ``python -m attnstab_cli scan`` in one process, or ``world`` ranks of it
    under torchrun, each rank with ``ctx.threads // world`` threads (at least 1). Returns the run and the peak RSS
    of each of its processes."""
    prefix = dist.torchrun_prefix(world) if torchrun else [sys.executable, "-m", "attnstab_cli"]
    peaks = dist.RankPeaks()
    run = run_scan(replace(ctx, scan_cmd=prefix), model, tokens, max(1, ctx.threads // world),
                   extra=("--batch-size", str(SCAN_BATCH_SIZE), "--device", device), on_start=peaks.start)
    return run, peaks.stop()


def scaling_series(ctx: Ctx, model: Path, tokens: Path, device: str, launches: list[tuple[int, bool]],
                   about: dict) -> list[dict]:
    """The scan at each (world size, torchrun?) of ``launches``; the first is the one-process baseline T1, and
    every record has speedup T1 / T_W, efficiency speedup / W and its report checked against T1's."""
    recs, base = [], None
    for world, torchrun in launches:
        print(f"[scan_cost]   {device} world size {world} ({'torchrun' if torchrun else 'one process'}) ...",
              file=sys.stderr, flush=True)
        run, peaks = launch_scan(ctx, model, tokens, device, world, torchrun)
        if base is None:
            base = run
        speedup = ratio(base, run, "wall_s")
        check = dist.compare_reports(Path(base.extra["out"]), Path(run.extra["out"])) \
            if run is not base and run.ok and base.ok else None
        manifest = Path(run.extra["out"]) / "manifest.json"
        per_rank = max(1, ctx.threads // world)
        recs.append({"figure": f"distributed_{device}_w{world}_{'torchrun' if torchrun else 'process'}",
                     "device": device, "world_size": world, "launcher": "torchrun" if torchrun else "one process",
                     "tokens": about["tokens"], "threads_per_rank": per_rank, "threads_total": per_rank * world,
                     "measured": run.record(),
                     "distributed": json.loads(manifest.read_text())["run"]["distributed"] if run.ok else None,
                     "speedup": speedup, "efficiency": None if speedup is None else speedup / world,
                     "peak_rss_mb_per_process": peaks,
                     "peak_rss_mb_ranks_sum": sum(v for k, v in peaks.items() if k != "launcher") or None,
                     "report_check": check, "pass": run.ok and (check is None or check["pass"]),
                     "model": about["model"], "env": environment()})
    return recs


def fig_distributed(ctx: Ctx) -> tuple[list[dict], list[dict]]:
    """8. The real-size LLaMA (8x256) sharded over world sizes: on the CPU one process, then torchrun with 1
    (the launcher's overhead) and 2 processes, ``ctx.threads`` threads in all; with more than one GPU, one
    process and torchrun with 2..N GPUs. Returns the CPU and the GPU records."""
    kind, shape = ("smollm2-smoke", (8, 32)) if ctx.smoke else ("smollm2-135m", (8, 256))
    model, info = build(ctx, kind)
    tokens = make_tokens(ctx, model, shape)
    about = {"tokens": list(shape), "model": {"kind": f"{kind} (random weights)", "parameters": info["parameters"]}}
    cpu = scaling_series(ctx, model, tokens, "cpu", [(1, False), (1, True), (2, True)], about)
    n_gpus = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                                env=ctx.env(), capture_output=True, text=True, check=True).stdout)
    gpu = scaling_series(ctx, model, tokens, "cuda", [(1, False)] + [(w, True) for w in range(2, n_gpus + 1)],
                         about) if n_gpus > 1 else []
    return cpu, gpu


FIGURES: dict[str, Callable[[Ctx], list[dict]]] = {
    "readme": fig_readme, "memory": fig_memory, "plain_theta": fig_plain_theta, "real_size": fig_real_size,
    "qwen3": fig_qwen3, "mixtral": fig_mixtral, "threads": fig_threads}


# ------------------------------------------------------------------------------------------------------- output

def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.rstrip("\n")
    except (OSError, subprocess.CalledProcessError):
        return None


def environment() -> dict:
    """Versions, machine and date; the commit plus the files then modified (others may be editing the tree)."""
    dirty = _git("status", "--porcelain", "--", "attnstab_cli", "kernels")
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": _git("rev-parse", "--short", "HEAD"),
            "git_modified": None if dirty is None else [line[3:] for line in dirty.splitlines()],
            "python": platform.python_version(), "torch": _version("torch"), "transformers": _version("transformers"),
            "attnstab": _version("attnstab"), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "machine": platform.processor() or platform.machine()}


def _fmt(v: float | None, nd: int = 2) -> str:
    return "—" if v is None else f"{v:.{nd}f}"


def _status(m: dict) -> str:
    return " (timeout)" if m["timed_out"] else f" (error rc={m['rc']})" if m["rc"] != 0 else ""


def markdown(records: list[dict]) -> str:
    """One table row per budget check (a figure without a budget gets one row with its ratio to the baseline)."""
    lines = ["| figure | tokens | threads | scan s | baseline s | scan peak MB | baseline peak MB | check | value | "
             "budget | pass |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        m, b = r["measured"], r["baseline"] or {}
        checks = r["checks"] or [{"name": "wall / baseline wall", "value": r.get("info", {}).get(
            "ratio_wall_vs_default_idle"), "budget": "—", "pass": None}]
        for c in checks:
            verdict = "—" if c["pass"] is None else ("PASS" if c["pass"] else "FAIL")
            lines.append(f"| {r['figure']} | {'x'.join(map(str, r['tokens'] or []))} | {r['threads']} | "
                         f"{_fmt(m['wall_s'], 1)}{_status(m)} | {_fmt(b.get('wall_s'), 1)} | "
                         f"{_fmt(m['peak_rss_mb'], 0)} | {_fmt(b.get('peak_rss_mb'), 0)} | {c['name']} | "
                         f"{_fmt(c['value'], 2)} | {c['budget']} | {verdict} |")
    return "\n".join(lines) + "\n"


def write_outputs(path: Path, records: list[dict], options: dict,
                  render: Callable[[list[dict]], str] = markdown) -> None:
    doc = {"benchmark": "bench/scan_cost.py", "about": __doc__.splitlines()[0], "env": environment(),
           "options": options, "all_pass": all(r["pass"] for r in records), "figures": records}
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, text in ((path, json.dumps(doc, indent=2) + "\n"), (path.with_suffix(".md"), render(records))):
        tmp = target.with_name(f".{target.name}.partial")
        tmp.write_text(text)
        os.replace(tmp, target)  # readers (and a concurrent run) never see a half-written file


def run_distributed(ctx: Ctx, out_json: Path, options: dict, readme: bool) -> None:
    """Figure 8: write the CPU records to ``out_json`` (the GPU ones, when any, beside it with ``_gpu``) and, with
    ``readme``, its table into README.md between the distributed-figure markers."""
    print("[scan_cost] distributed ...", file=sys.stderr, flush=True)
    cpu, gpu = fig_distributed(ctx)
    write_outputs(out_json, cpu, options, dist.markdown)
    tables = dist.markdown(cpu)
    print(f"{out_json}:\n\n{tables}")
    if gpu:
        gpu_json = out_json.with_name(out_json.stem.removesuffix("_cpu") + "_gpu.json")
        write_outputs(gpu_json, gpu, options, dist.markdown)
        shown = gpu_json.relative_to(ROOT) if gpu_json.is_relative_to(ROOT) else gpu_json
        tables += f"\nGPUs (`{shown}`):\n\n{dist.markdown(gpu)}"
        print(f"{gpu_json}:\n\n{dist.markdown(gpu)}")
    if readme:
        env = environment()
        heading = (f"`python bench/scan_cost.py --distributed`, {env['date'][:10]}, commit {env['git_commit']}, "
                   f"torch {env['torch']}, {env['cpu_count']} cores, {ctx.threads} threads in all, "
                   f"{'x'.join(map(str, cpu[0]['tokens']))} tokens (`{out_json.relative_to(ROOT)}`; load average "
                   f"before each launch: {', '.join(str(r['measured']['loadavg_1min_before']) for r in cpu + gpu)}):")
        if not dist.update_readme(ROOT / "README.md", heading, tables):
            print("[scan_cost] README.md has no distributed-figure markers: left as it was", file=sys.stderr)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds: the running child's group is killed, temp dirs removed


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1].startswith("--_"):
        return child_main(sys.argv[1:])
    signal.signal(signal.SIGTERM, _terminate)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(FIGURES), help="run one figure")
    ap.add_argument("--quick", action="store_true", help="skip the thread study")
    ap.add_argument("--threads-study", action="store_true", help="run only the thread study")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every figure and baseline")
    ap.add_argument("--threads-model", choices=["smollm2-135m", "gpt2-6l"], default="smollm2-135m",
                    help="model of the thread study (gpt2-6l: figure 2's, when the real-size scan is too slow)")
    ap.add_argument("--distributed", action="store_true", help="run only the scaling figure: the real-size LLaMA "
                    "scan on 1 and 2 CPU processes (torchrun) and, with more than one GPU, on 1..N GPUs; writes "
                    "bench/results/scan_cost_distributed_cpu.json/.md and, unless --smoke or --out-json, the "
                    "README table")
    ap.add_argument("--smoke", action="store_true", help="toy shapes for the mixtral and distributed figures: "
                    "checks the harness runs; its numbers are not the figure")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess before it is killed")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    ap.add_argument("--out-json", type=Path, help="default bench/results/scan_cost_cpu.json; with --only NAME, "
                    "bench/results/scan_cost_cpu_NAME.json (a partial run leaves the full run's file alone); with "
                    "--distributed, bench/results/scan_cost_distributed_cpu.json")
    ap.add_argument("--threads-json", type=Path, default=RESULTS / "scan_threads_cpu.json")
    args = ap.parse_args()
    names = [args.only] if args.only else ["threads"] if args.threads_study else [
        n for n in FIGURES if not (args.quick and n == "threads")]
    default_json = "scan_cost_distributed_cpu.json" if args.distributed else \
        f"scan_cost_cpu_{args.only}.json" if args.only else "scan_cost_cpu.json"
    readme = args.distributed and not args.smoke and args.out_json is None
    args.out_json = args.out_json or RESULTS / default_json
    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    records: list[dict] = []
    threads_recs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="scan_cost_") as tmp:
        ctx = Ctx(args.timeout, args.threads, args.seed, Path(tmp), attnstab_cmd(), args.threads_model, args.smoke)
        if args.distributed:
            run_distributed(ctx, args.out_json, options, readme)
            return 0
        for name in names:
            print(f"[scan_cost] {name} ...", file=sys.stderr, flush=True)
            recs = FIGURES[name](ctx)
            if name == "threads":
                threads_recs = recs
                write_outputs(args.threads_json, recs, options)
            else:
                records += recs
                write_outputs(args.out_json, records, options)
            print(markdown(recs), file=sys.stderr, flush=True)
    for recs_all, label in ((records, args.out_json), (threads_recs, args.threads_json)):
        if recs_all:
            print(f"{label}:\n\n{markdown(recs_all)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
