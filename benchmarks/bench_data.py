"""Data preparation at ultrachat_200k's size: read, render, tokenize, label, pack; time, peak RSS.

    python benchmarks/bench_data.py                       # 200,000 conversations, ~1,400 tokens
    python benchmarks/bench_data.py --conversations 20000 # a quicker look

Nothing is downloaded. The data is synthesised in ultrachat_200k's own layout (parquet shards
``data/train_sft-0000K-of-0000N.parquet`` with ``prompt``, ``prompt_id`` and ``messages``, a list of
``{content, role}`` structs; JSONL without pyarrow), 1 to 4 user/assistant exchanges each, sometimes
with a system turn, from the demo corpus's words, sized so that the average conversation is
``--tokens`` tokens with the demo checkpoint's tokenizer. Then, each in a fresh process so that the
peak RSS is its own:

1. a cold run: ``prepare_chat_data(DIR:train_sft, ..., cache_dir=...)`` from nothing;
2. a warm run: the same call, served by the cache (the time before training could start);
3. with ``--floor``, the Rust tokenizer alone: every conversation rendered (not timed), then only
   the batch calls timed, ``encode_batch`` (with offsets) and ``encode_batch_fast`` (without), 512
   texts a call as the pipeline does: what no preparation can beat on this machine.

Run it alone: ``flock /tmp/lora-heavy.lock python benchmarks/bench_data.py``. ``--keep`` keeps the
synthetic set and ``--reuse`` takes a kept one of the same size instead of writing it again (to
time another checkout's ``--_prepare DIR CACHE`` on the very same data).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import _common as C  # noqa: E402


def _tokenizer():
    from lora.data import Tokenizer
    from lora.demo import base_model_dir, ensure_assets

    ensure_assets(log=lambda *_: None)
    return Tokenizer.from_pretrained(base_model_dir()), base_model_dir()


def _conversation(rng: random.Random, words: list[str], scale: float) -> list[dict]:
    messages = []
    if rng.random() < 0.2:
        messages.append(
            {"role": "system", "content": " ".join(rng.choices(words, k=rng.randint(5, 20)))}
        )
    for _ in range(rng.choice((1, 2, 3, 3, 4))):
        messages.append(
            {
                "role": "user",
                "content": " ".join(
                    rng.choices(words, k=max(1, int(rng.randint(20, 120) * scale)))
                ),
            }
        )
        messages.append(
            {
                "role": "assistant",
                "content": " ".join(
                    rng.choices(words, k=max(1, int(rng.randint(80, 320) * scale)))
                ),
            }
        )
    return messages


def synthesise(directory: Path, n: int, tokens: int, shards: int, seed: int = 0) -> dict:
    """Write ``n`` conversations averaging ~``tokens`` tokens into ``directory``; returns facts."""
    tokenizer, _ = _tokenizer()
    words = (ROOT / "lora" / "demo" / "assets" / "corpus.txt").read_text(encoding="utf-8").split()
    rng = random.Random(seed)
    sample = [_conversation(rng, words, 1.0) for _ in range(300)]
    texts = [tokenizer.chat_template.render(m) for m in sample]
    per = sum(
        len(e.ids) for e in tokenizer.backend.encode_batch(texts, add_special_tokens=False)
    ) / len(texts)
    scale = tokens / per
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        pa = None
    data = directory / "data"
    if directory.exists():
        shutil.rmtree(directory)
    data.mkdir(parents=True)
    rng = random.Random(seed + 1)
    if pa is not None:
        schema = pa.schema(
            [
                ("prompt", pa.string()),
                ("prompt_id", pa.string()),
                (
                    "messages",
                    pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())])),
                ),
            ]
        )
    written = 0
    for k in range(shards):
        count = n // shards + (1 if k < n % shards else 0)
        name = f"train_sft-{k:05d}-of-{shards:05d}"
        if pa is not None:
            with pq.ParquetWriter(data / f"{name}.parquet", schema) as writer:
                for start in range(0, count, 5000):
                    rows = []
                    for _ in range(min(5000, count - start)):
                        m = _conversation(rng, words, scale)
                        rows.append(
                            {
                                "prompt": m[-2]["content"],
                                "prompt_id": f"{written:064x}",
                                "messages": m,
                            }
                        )
                        written += 1
                    writer.write_table(
                        pa.Table.from_pylist(rows, schema=schema), row_group_size=1000
                    )
        else:
            with open(data / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for _ in range(count):
                    f.write(json.dumps({"messages": _conversation(rng, words, scale)}) + "\n")
                    written += 1
    size = sum(p.stat().st_size for p in data.iterdir())
    return {
        "conversations": written,
        "format": "parquet" if pa is not None else "jsonl",
        "bytes": size,
    }


def _prepare(directory: str, cache: str, max_seq_length: int, packing: bool) -> None:
    """The measured part, in its own process: prints one JSON line."""
    t0 = time.perf_counter()
    tokenizer, _ = _tokenizer()
    from lora.data import prepare_chat_data

    lines: list[str] = []
    t1 = time.perf_counter()  # after the imports and the tokenizer
    data = prepare_chat_data(
        f"{directory}:train_sft",
        tokenizer,
        max_seq_length,
        packing=packing,
        cache_dir=cache,
        progress=True,
        log=lines.append,
    )
    batch = data.collate(data.train[:4])  # the first batch the trainer would take
    seconds = time.perf_counter() - t0
    rss = C.peak_rss_bytes() / 2**30
    print(
        json.dumps(
            {
                "seconds": seconds,
                "prepare_seconds": time.perf_counter() - t1,
                "peak_rss_gib": rss,
                "cache_hit": any("from the cache" in x for x in lines),
                "train": data.train_stats.__dict__
                | {"dropped_sources": len(data.train_stats.dropped_sources)},
                "first_batch": list(batch["input_ids"].shape),
            }
        )
    )


def _floor(directory: str) -> None:
    """The tokenizer's batch calls alone over the rendered conversations: prints one JSON line."""
    tokenizer, _ = _tokenizer()
    from lora.data.prepared import CONVERSATIONS_PER_BATCH
    from lora.data.records import RecordError, iter_conversations
    from lora.data.sources import resolve_data_files

    backend, template = tokenizer.backend, tokenizer.chat_template
    seconds = {"encode_batch": 0.0, "encode_batch_fast": 0.0}
    calls = {name: getattr(backend, name) for name in seconds if hasattr(backend, name)}
    tokens, texts = 0, []

    def run():
        nonlocal tokens
        for name, call in calls.items():
            t = time.perf_counter()
            encodings = call(texts, add_special_tokens=False)
            seconds[name] += time.perf_counter() - t
        tokens += sum(len(e.ids) for e in encodings)
        texts.clear()

    for item in iter_conversations(resolve_data_files(f"{directory}:train_sft")):
        if not isinstance(item, RecordError):
            texts.append(template.render(item.messages))
            if len(texts) >= CONVERSATIONS_PER_BATCH:
                run()
    run()
    out = {"tokens": tokens}
    for name in calls:
        out[name] = {"seconds": seconds[name], "tokens_per_s": tokens / seconds[name]}
    print(json.dumps(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conversations", type=int, default=200_000)
    ap.add_argument("--tokens", type=int, default=1400, help="average tokens per conversation")
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--max-seq-length", type=int, default=2048)
    ap.add_argument("--no-packing", action="store_true")
    ap.add_argument(
        "--dir", default="/tmp/lora-bench-data", help="where the synthetic set and the cache go"
    )
    ap.add_argument("--keep", action="store_true", help="keep the synthetic set and the cache")
    ap.add_argument("--reuse", action="store_true", help="take a kept synthetic set of this size")
    ap.add_argument("--floor", action="store_true", help="also time the tokenizer's batch calls")
    ap.add_argument("--_prepare", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_floor", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._prepare:
        _prepare(args._prepare[0], args._prepare[1], args.max_seq_length, not args.no_packing)
        return 0
    if args._floor:
        _floor(args._floor)
        return 0
    work = Path(args.dir)
    t = time.perf_counter()
    wanted = {"n": args.conversations, "tokens": args.tokens, "shards": args.shards}
    stamp = work / "synthetic-facts.json"
    kept = json.loads(stamp.read_text()) if args.reuse and stamp.is_file() else {}
    if kept.get("wanted") == wanted:
        facts = kept["facts"]
        print(f"reusing the synthetic set in {work / 'ultrachat_synthetic'}", flush=True)
    else:
        facts = synthesise(
            work / "ultrachat_synthetic", args.conversations, args.tokens, args.shards
        )
        stamp.write_text(json.dumps({"wanted": wanted, "facts": facts}))
        print(
            f"synthesised {facts['conversations']:,} conversations ({facts['format']}, "
            f"{facts['bytes'] / 2**20:.0f} MiB) in {time.perf_counter() - t:.0f} s",
            flush=True,
        )
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    results = {}
    for run in ("cold", "warm"):
        cmd = [
            sys.executable,
            __file__,
            "--max-seq-length",
            str(args.max_seq_length),
            "--_prepare",
            str(work / "ultrachat_synthetic"),
            str(cache),
        ] + (["--no-packing"] if args.no_packing else [])
        out = subprocess.run(
            cmd, check=True, stdout=subprocess.PIPE, text=True, env=os.environ
        ).stdout
        results[run] = json.loads(out.strip().splitlines()[-1])
        r = results[run]
        print(
            f"{run}: {r['seconds']:.1f} s (prepare {r['prepare_seconds']:.1f} s), "
            f"peak RSS {r['peak_rss_gib']:.2f} GiB, "
            f"cache hit {r['cache_hit']}",
            flush=True,
        )
    if args.floor:
        cmd = [sys.executable, __file__, "--_floor", str(work / "ultrachat_synthetic")]
        out = subprocess.run(
            cmd, check=True, stdout=subprocess.PIPE, text=True, env=os.environ
        ).stdout
        results["floor"] = json.loads(out.strip().splitlines()[-1])
        for name, r in results["floor"].items():
            if isinstance(r, dict):
                print(
                    f"floor, {name} alone: {r['seconds']:.1f} s "
                    f"({r['tokens_per_s'] / 1e6:.2f} M tokens/s)",
                    flush=True,
                )
    s = results["cold"]["train"]
    print(
        f"tokens {s['tokens']:,} ({s['tokens'] / max(s['conversations'], 1):.0f} per "
        f"conversation), labelled {s['labelled_tokens']:,}, truncated {s['truncated']}, "
        f"sequences {s['sequences']:,}"
    )
    print(json.dumps({"synthetic": facts, **results}))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
