"""Regenerate attnstab's bundled sample checkpoints (dev-time only).

Trains one byte-level BPE tokenizer and a few tiny transformers (GPT-2, BERT,
LLaMA, GPT-NeoX, Qwen3) on the bundled calibration corpus
(``attnstab_cli/calibration/corpus/*.txt``, sorted by name), on CPU with one
thread, fixed seeds and deterministic algorithms, so that a rerun on the same
software stack reproduces the saved files byte for byte.

Usage::

    python sample_checkpoints/generate.py                      # everything
    python sample_checkpoints/generate.py --only llama-tiny    # one checkpoint
    python sample_checkpoints/generate.py --out /tmp/ckpts

``transformers`` is imported here only; the attnstab tool never imports it.
"""
from __future__ import annotations

import os

# Single-threaded, deterministic CPU execution; must be set before torch loads.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ[_var] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO_ROOT / "attnstab_cli" / "calibration" / "corpus"
DEFAULT_OUT = Path(__file__).resolve().parent

SEED = 1234
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|endoftext|>", "[PAD]", "[CLS]", "[SEP]", "[MASK]"]
SEQ_LEN = 128
BATCH_SIZE = 16
EVAL_FRACTION = 0.1  # tail of every corpus file held out for the eval loss
MAX_POSITIONS = 256


# --------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Corpus:
    """The training text: one string per corpus file, in sorted-name order."""

    files: list[str]
    texts: list[str]
    word_count: int
    sha256: str  # == `cat $(LC_ALL=C ls corpus/*.txt) | sha256sum`


def load_corpus(corpus_dir: Path) -> Corpus:
    """Read every ``*.txt`` under ``corpus_dir`` (sorted by name)."""
    paths = sorted(corpus_dir.glob("*.txt"), key=lambda p: p.name)
    if not paths:
        sys.exit(f"error: no *.txt files under {corpus_dir}")
    digest = hashlib.sha256()
    texts: list[str] = []
    for path in paths:
        raw = path.read_bytes()
        digest.update(raw)
        texts.append(raw.decode("utf-8"))
    words = sum(len(t.split()) for t in texts)
    return Corpus([p.name for p in paths], texts, words, digest.hexdigest())


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(corpus: Corpus) -> Tokenizer:
    """Train a byte-level BPE tokenizer (``VOCAB_SIZE`` incl. specials) on the corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for text in corpus.texts for line in text.splitlines(keepends=True)]
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    return tok


@dataclass(frozen=True)
class TokenData:
    """Token streams (documents joined by ``<|endoftext|>``) and special ids."""

    train: torch.Tensor
    eval: torch.Tensor
    vocab_size: int
    ids: dict[str, int]
    unigram_entropy: float  # nats/token of the train stream


def tokenize(tok: Tokenizer, corpus: Corpus) -> TokenData:
    """Encode each file; its first 90% goes to train, its tail to eval."""
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    eot = ids["<|endoftext|>"]
    train: list[int] = []
    held: list[int] = []
    for text in corpus.texts:
        toks = tok.encode(text).ids
        cut = int(len(toks) * (1.0 - EVAL_FRACTION))
        train += toks[:cut] + [eot]
        held += toks[cut:] + [eot]
    counts = Counter(train)
    n = len(train)
    entropy = -sum(c / n * math.log(c / n) for c in counts.values())
    return TokenData(
        torch.tensor(train, dtype=torch.long),
        torch.tensor(held, dtype=torch.long),
        tok.get_vocab_size(),
        ids,
        entropy,
    )


# --------------------------------------------------------------------------- models


def build_gpt2(data: TokenData, dropout: float) -> PreTrainedModel:
    """Pre-LN GPT-2: 4 layers, d=64, 4 heads, tied embeddings."""
    eot = data.ids["<|endoftext|>"]
    cfg = GPT2Config(
        vocab_size=data.vocab_size, n_positions=MAX_POSITIONS, n_embd=64, n_layer=4, n_head=4,
        n_inner=256, activation_function="gelu_new", layer_norm_epsilon=1e-5,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, tie_word_embeddings=True,
        bos_token_id=eot, eos_token_id=eot, pad_token_id=data.ids["[PAD]"],
    )
    return GPT2LMHeadModel._from_config(cfg, attn_implementation="eager")


def build_bert(data: TokenData, dropout: float) -> PreTrainedModel:
    """Post-LN BERT masked LM: 4 layers, d=64, 4 heads, d_ff=256."""
    cfg = BertConfig(
        vocab_size=data.vocab_size, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=256, hidden_act="gelu", max_position_embeddings=MAX_POSITIONS,
        type_vocab_size=2, layer_norm_eps=1e-12, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout, tie_word_embeddings=True,
        pad_token_id=data.ids["[PAD]"],
    )
    return BertForMaskedLM._from_config(cfg, attn_implementation="eager")


def _llama_shape(data: TokenData, dropout: float) -> dict:
    """The decoder shape llama-tiny and qwen3-tiny share: GQA (4 q heads, 2 kv heads), head_dim 16, RoPE theta 1e4,
    RMSNorm, untied head, no attention biases."""
    eot = data.ids["<|endoftext|>"]
    return dict(
        vocab_size=data.vocab_size, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_act="silu",
        max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, attention_bias=False, attention_dropout=dropout,
        bos_token_id=eot, eos_token_id=eot, pad_token_id=data.ids["[PAD]"],
    )


def build_llama(data: TokenData, dropout: float) -> PreTrainedModel:
    """LLaMA with the shared decoder shape (``_llama_shape``)."""
    cfg = LlamaConfig(**_llama_shape(data, dropout), mlp_bias=False)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="eager")


def build_qwen3(data: TokenData, dropout: float) -> PreTrainedModel:
    """Qwen3: llama-tiny's shape plus per-head q/k RMSNorm."""
    cfg = Qwen3Config(**_llama_shape(data, dropout), use_sliding_window=False)
    return Qwen3ForCausalLM._from_config(cfg, attn_implementation="eager")


def build_pythia(data: TokenData, dropout: float) -> PreTrainedModel:
    """GPT-NeoX (Pythia-style): partial rotary 0.25, parallel residual, untied head."""
    eot = data.ids["<|endoftext|>"]
    cfg = GPTNeoXConfig(
        vocab_size=data.vocab_size, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=256, hidden_act="gelu", max_position_embeddings=MAX_POSITIONS,
        layer_norm_eps=1e-5, use_parallel_residual=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        tie_word_embeddings=False, attention_bias=True,
        attention_dropout=dropout, hidden_dropout=dropout,
        bos_token_id=eot, eos_token_id=eot, pad_token_id=data.ids["[PAD]"],
    )
    return GPTNeoXForCausalLM._from_config(cfg, attn_implementation="eager")


@dataclass(frozen=True)
class Run:
    """One training run; ``saves`` maps a step to the checkpoint names written then."""

    build: Callable[[TokenData, float], PreTrainedModel]
    objective: str  # "clm" or "mlm"
    steps: int
    lr: float
    saves: dict[int, list[str]] = field(default_factory=dict)
    dropout: float = 0.1  # training-time only; irrelevant to the saved weights' use
    weight_decay: float = 0.1
    warmup: int = 50
    seed: int = SEED


RUNS: dict[str, Run] = {
    "gpt2": Run(build_gpt2, "clm", 800, 3e-3,
                {200: ["gpt2-tiny-step200"], 800: ["gpt2-tiny", "gpt2-tiny-step800"]}),
    "bert": Run(build_bert, "mlm", 600, 1e-3, {600: ["bert-tiny"]}),
    "llama": Run(build_llama, "clm", 500, 3e-3, {500: ["llama-tiny"]}),
    "pythia": Run(build_pythia, "clm", 500, 3e-3, {500: ["pythia-tiny"]}),
    "qwen3": Run(build_qwen3, "clm", 250, 3e-3, {250: ["qwen3-tiny"]}),   # longer runs overfit the corpus
}
ALL_NAMES = [n for run in RUNS.values() for names in run.saves.values() for n in names]


# --------------------------------------------------------------------------- training


def lr_factor(step: int, run: Run) -> float:
    """Linear warmup then cosine decay to 10% of the peak (``step`` is 0-based)."""
    if step < run.warmup:
        return (step + 1) / run.warmup
    progress = (step - run.warmup) / max(1, run.steps - run.warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def mlm_mask(tokens: torch.Tensor, data: TokenData, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: 15% of non-special positions; 80% [MASK], 10% random, 10% kept."""
    special = torch.zeros_like(tokens, dtype=torch.bool)
    for tid in data.ids.values():
        special |= tokens == tid
    chosen = (torch.rand(tokens.shape, generator=gen) < 0.15) & ~special
    labels = torch.where(chosen, tokens, torch.full_like(tokens, -100))
    roll = torch.rand(tokens.shape, generator=gen)
    random_ids = torch.randint(len(SPECIAL_TOKENS), data.vocab_size, tokens.shape, generator=gen)
    inputs = tokens.clone()
    inputs = torch.where(chosen & (roll < 0.8), torch.full_like(tokens, data.ids["[MASK]"]), inputs)
    inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, inputs)
    return inputs, labels


def make_batch(stream: torch.Tensor, run: Run, data: TokenData, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random windows of the train stream, as model kwargs (incl. labels)."""
    body = SEQ_LEN - 2 if run.objective == "mlm" else SEQ_LEN
    starts = torch.randint(0, len(stream) - body, (BATCH_SIZE,), generator=gen)
    windows = torch.stack([stream[s : s + body] for s in starts.tolist()])
    if run.objective == "clm":
        return {"input_ids": windows, "labels": windows}
    cls = torch.full((BATCH_SIZE, 1), data.ids["[CLS]"])
    sep = torch.full((BATCH_SIZE, 1), data.ids["[SEP]"])
    inputs, labels = mlm_mask(torch.cat([cls, windows, sep], dim=1), data, gen)
    return {"input_ids": inputs, "labels": labels}


@torch.no_grad()
def eval_loss(model: PreTrainedModel, run: Run, data: TokenData) -> float:
    """Mean token loss on the held-out stream (fixed masking seed for MLM)."""
    model.eval()
    stream = data.eval
    body = SEQ_LEN - 2 if run.objective == "mlm" else SEQ_LEN
    gen = torch.Generator().manual_seed(run.seed + 1)
    total, count = 0.0, 0
    for start in range(0, max(1, len(stream) - 1), body):
        window = stream[start : start + body].unsqueeze(0)
        if window.shape[1] < 2:
            break
        if run.objective == "clm":
            out = model(input_ids=window, labels=window)
            n = window.shape[1] - 1
        else:
            seq = torch.cat([torch.tensor([[data.ids["[CLS]"]]]), window, torch.tensor([[data.ids["[SEP]"]]])], 1)
            inputs, labels = mlm_mask(seq, data, gen)
            n = int((labels != -100).sum())
            if n == 0:
                continue
            out = model(input_ids=inputs, labels=labels)
        total += float(out.loss) * n
        count += n
    model.train()
    return total / max(1, count)


def save_checkpoint(
    model: PreTrainedModel, out_dir: Path, tok_json: str, log: dict[str, object]
) -> None:
    """Write config.json + model.safetensors (fp32), tokenizer.json and training_log.json."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir)
    (out_dir / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    (out_dir / "training_log.json").write_text(json.dumps(log, indent=2) + "\n", encoding="utf-8")


def verify_reload(out_dir: Path, model: PreTrainedModel, data: TokenData) -> None:
    """Reload the saved directory and check the logits match the in-memory model."""
    cls = type(model)
    reloaded = cls.from_pretrained(out_dir, attn_implementation="eager").eval()
    model.eval()
    x = data.eval[:64].unsqueeze(0)
    with torch.no_grad():
        diff = (reloaded(input_ids=x).logits - model(input_ids=x).logits).abs().max().item()
    model.train()
    if diff > 1e-5:
        raise RuntimeError(f"{out_dir.name}: reloaded logits differ by {diff}")


def train_run(
    key: str, run: Run, data: TokenData, corpus: Corpus, tok_json: str, out: Path, wanted: set[str]
) -> None:
    """Train one run and save the wanted checkpoints at their steps."""
    torch.manual_seed(run.seed)
    model = run.build(data, run.dropout)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    matrices = [p for p in model.parameters() if p.dim() >= 2]  # norms and biases: no decay
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": run.weight_decay}, {"params": others, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=run.lr, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, run))
    gen = torch.Generator().manual_seed(run.seed)
    last_save = max(s for s, names in run.saves.items() if wanted.intersection(names))
    curve: list[list[float]] = []
    recent: list[float] = []
    initial = float("nan")
    t0 = time.perf_counter()
    for step in range(1, last_save + 1):
        batch = make_batch(data.train, run, data, gen)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        value = loss.item()
        if step == 1:
            initial = value
            print(f"[{key}] {n_params} params, step 1 loss {value:.4f} "
                  f"(unigram entropy {data.unigram_entropy:.4f} nats)", flush=True)
        recent = (recent + [value])[-20:]
        if step % 50 == 0 or step == 1:
            curve.append([step, round(value, 4)])
        names = [n for n in run.saves.get(step, []) if n in wanted]
        if names:
            final = sum(recent) / len(recent)
            ev = eval_loss(model, run, data)
            print(f"[{key}] step {step} train loss {final:.4f} (mean of last {len(recent)}), "
                  f"eval loss {ev:.4f}, {time.perf_counter() - t0:.1f}s", flush=True)
            log: dict[str, object] = {
                "architecture": type(model).__name__,
                "objective": "causal LM" if run.objective == "clm" else "masked LM (15%, 80/10/10)",
                "step": step,
                "run_total_steps": run.steps,
                "seed": run.seed,
                "batch_size": BATCH_SIZE,
                "seq_len": SEQ_LEN,
                "optimizer": {"name": "AdamW", "peak_lr": run.lr, "betas": [0.9, 0.95],
                              "weight_decay": run.weight_decay, "weight_decay_on": "matrices (dim >= 2)",
                              "dropout": run.dropout, "warmup_steps": run.warmup,
                              "schedule": "linear warmup, cosine to 10%", "grad_clip": 1.0},
                "parameters": n_params,
                "initial_loss": round(initial, 4),
                "final_loss": round(final, 4),
                "final_loss_note": f"mean train loss over the last {len(recent)} steps (nats/token)",
                "eval_loss": round(ev, 4),
                "eval_note": f"held-out last {EVAL_FRACTION:.0%} of each corpus file (nats/token)",
                "unigram_entropy": round(data.unigram_entropy, 4),
                "loss_curve": curve,
                "corpus_files": corpus.files,
                "corpus_word_count": corpus.word_count,
                "corpus_sha256": corpus.sha256,
                "train_tokens": len(data.train),
                "eval_tokens": len(data.eval),
                "tokenizer_vocab_size": data.vocab_size,
                "tokenizer_sha256": hashlib.sha256(tok_json.encode("utf-8")).hexdigest(),
                "torch_version": torch.__version__,
                "transformers_version": transformers.__version__,
            }
            for name in names:
                target = out / name
                save_checkpoint(model, target, tok_json, {"name": name, **log})
                verify_reload(target, model, data)
                size = sum(f.stat().st_size for f in target.iterdir())
                print(f"[{key}] wrote {target} ({size / 1e6:.2f} MB)", flush=True)


# --------------------------------------------------------------------------- main


def _one_thread() -> None:
    """Worker start-up: the same single-threaded, deterministic settings as the parent."""
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train the tokenizer, then train and save the requested runs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: sample_checkpoints/)")
    parser.add_argument("--only", action="append", choices=ALL_NAMES, metavar="NAME",
                        help=f"checkpoint to (re)generate; repeatable. One of: {', '.join(ALL_NAMES)}")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="directory of *.txt training text")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                        help="training runs in parallel, one process and one thread each (default: min(4, CPUs)); "
                             "the output does not depend on it")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()

    corpus = load_corpus(args.corpus)
    print(f"corpus: {len(corpus.files)} files, {corpus.word_count} words, sha256 {corpus.sha256}", flush=True)
    tok = train_tokenizer(corpus)
    tok_json = tok.to_str(pretty=True)
    data = tokenize(tok, corpus)
    print(f"tokenizer: vocab {data.vocab_size}, {len(data.train)} train / {len(data.eval)} eval tokens", flush=True)

    wanted = set(args.only or ALL_NAMES)
    args.out.mkdir(parents=True, exist_ok=True)
    todo = [key for key, run in RUNS.items() if any(wanted.intersection(names) for names in run.saves.values())]
    jobs = [(key, RUNS[key], data, corpus, tok_json, args.out, wanted) for key in todo]
    if args.jobs <= 1 or len(jobs) <= 1:
        for job in jobs:
            train_run(*job)
    else:  # each run is seeded on its own and single-threaded: running them side by side changes nothing
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_one_thread) as pool:
            for future in [pool.submit(train_run, *job) for job in jobs]:
                future.result()
    print(f"done in {time.perf_counter() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
