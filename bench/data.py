"""The data stage at recipe scale against TRL's way (datasets.map + tokenizer.apply_chat_template).

    python bench/data.py --rows 10000,50000,200000

Rows are synthetic chats (1-3 user/assistant turns, 70-900 words each, made deterministically from
the row number) written once per size to --workdir as JSONL. Every configuration runs in its own
subprocess on the same rows with the same number of processes (--num-proc, default: the cores
available). Memory: `peak RSS` is the subprocess's own peak resident set when the build is done
(getrusage, before the bench's own checks: what a memory limit on the build's process sees);
`peak PSS tree` the largest sum of the proportional set
sizes of the subprocess and its children (psutil, polled every 50 ms), so tokenizing workers count
without counting the pages they share with the parent twice.

- mistral_tune: `mistral_tune.stages.data.run` on the rows (template --template, data.dedup=exact
  as in the zephyr recipe, max_length large enough to keep every row): validation, dedup,
  mistral-common-exact ids and assistant masks, report, rejects, histogram, save_to_disk.
  Afterwards --check rows picked at random are re-encoded with mistral-common's own
  encode_instruct check (`encode_chat(verify=True)`): `exact` counts the rows whose ids match.
- datasets.map: `load_dataset("json")` then `.map(apply_chat_template(messages, tokenize=True,
  return_dict=True), num_proc=N)` with mistral_tune's HF tokenizer for the same template (what
  TRL's SFTTrainer does to conversational rows), written to a fresh datasets cache.

Prints a markdown table and writes it to --out (default bench/results/data.md) with a JSON twin.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's mistral_tune, not another editable install


def _vocabulary() -> list[str]:
    """Whole-word pieces of Mistral's v3 tokenizer (one token each, most frequent first), so a word
    is about one token as in English text; fixed by the file that ships in mistral-common."""
    from mistral_tune.formats import templates

    sp = templates.mistral_tokenizer("mistral_v3").instruct_tokenizer.tokenizer._model
    pieces = (sp.id_to_piece(i) for i in range(sp.get_piece_size()))
    words = [p[1:] for p in pieces if p.startswith("\u2581") and p[1:].isascii() and p[1:].isalpha() and len(p) > 2]
    return words[:6000]


VOCABULARY = _vocabulary()


def synthetic_chat(i: int) -> dict:
    """Row i: 1-3 turns, 70-900 words in all, with punctuation and a few numbers."""
    rng = random.Random(i)
    n = rng.randint(70, 900)
    words = []
    for k in range(n):
        word = VOCABULARY[min(int(rng.paretovariate(0.6)) - 1, len(VOCABULARY) - 1)]  # Zipf-like
        if rng.random() < 0.03:
            word = str(rng.randint(0, 9999))
        words.append(word + ("." if rng.random() < 0.07 else "," if rng.random() < 0.05 else ""))
    turns = rng.randint(1, 3)
    cuts = sorted(rng.sample(range(1, n), 2 * turns - 1))
    parts = [" ".join(words[a:b]) for a, b in zip([0, *cuts], [*cuts, n])]
    return {"messages": [{"role": "user" if k % 2 == 0 else "assistant", "content": p} for k, p in enumerate(parts)]}


def write_rows(path: Path, n: int) -> Path:
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for i in range(n):
                f.write(json.dumps(synthetic_chat(i)) + "\n")
        tmp.rename(path)
    return path


# --------------------------------------------------------------------- workers (one per subprocess)

def worker_mistral_tune(rows: Path, out: Path, num_proc: int, template: str, check: int) -> dict:
    from mistral_tune.config import compose
    from mistral_tune.stages import data

    cfg = compose([f"run_dir={out}", "logger=none", f"template={template}", "stages=[sft]",
                   f"sft.data.files=[{rows}]", "dpo.data.files=[]", "orpo.data.files=[]", "sft.data.max_length=8192",
                   "data.dedup=exact", f"data.num_proc={num_proc}", "eval.split_fraction=0"])
    start = time.perf_counter()
    root = data.run(cfg)
    seconds = time.perf_counter() - start
    peak = _peak_rss_gb()  # the build's: the check below is the bench's own work
    report = json.loads((root / "sft" / "report.json").read_text())
    return {"seconds": seconds, "rows": report["read"], "tokens": report["tokens"], "peak_rss_gb": peak,
            "exact": _check_exact(root / "sft" / "dataset", rows, template, check)}


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def _check_exact(dataset_dir: Path, rows: Path, template: str, n: int) -> str:
    """n random built rows re-encoded with the reference self-check on, compared id for id."""
    from datasets import load_from_disk

    from mistral_tune.formats import templates

    dataset = load_from_disk(str(dataset_dir))
    picked = sorted(random.Random(0).sample(range(len(dataset)), min(n, len(dataset))))
    wanted, lines = set(picked), {}
    with open(rows, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i in wanted:
                lines[i] = line
    same = 0
    for i in picked:  # dedup=exact on distinct synthetic rows keeps them all, so row i is line i
        messages = json.loads(lines[i])["messages"]
        enc = templates.encode_chat(messages, template, verify=True)
        same += dataset[i]["input_ids"] == enc.input_ids and dataset[i]["assistant_masks"] == enc.assistant_masks
    return f"{same}/{len(picked)}"


def worker_datasets_map(rows: Path, out: Path, num_proc: int, template: str, check: int) -> dict:
    os.environ["HF_DATASETS_CACHE"] = str(out / "hf_cache")  # fresh: nothing reused
    import datasets

    from mistral_tune.formats.tokenizer import build_hf_tokenizer

    tokenizer = build_hf_tokenizer(template)
    start = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=str(rows), split="train")

    def tokenize(example):
        return tokenizer.apply_chat_template(example["messages"], tokenize=True, return_dict=True)

    dataset = dataset.map(tokenize, num_proc=num_proc if num_proc > 1 else None, remove_columns=["messages"])
    seconds = time.perf_counter() - start
    peak = _peak_rss_gb()
    tokens = sum(len(ids) for batch in dataset.iter(1000) for ids in batch["input_ids"])
    return {"seconds": seconds, "rows": len(dataset), "tokens": tokens, "peak_rss_gb": peak, "exact": "-"}


WORKERS = {"mistral_tune": worker_mistral_tune, "datasets.map": worker_datasets_map}


def run_one(name: str, rows: Path, num_proc: int, template: str, check: int) -> dict:
    """One configuration in a fresh subprocess; its peak RSS with its children, polled."""
    import psutil

    with tempfile.TemporaryDirectory(dir=rows.parent) as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", name, "--rows-file", str(rows), "--workdir", tmp,
               "--num-proc", str(num_proc), "--template", template, "--check", str(check)]
        log = open(Path(tmp) / "log.txt", "w")
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        parent, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                tree = [parent, *parent.children(recursive=True)]
                peak = max(peak, sum(p.memory_full_info().pss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)
        log.close()
        if proc.returncode:
            tail = (Path(tmp) / "log.txt").read_text()[-3000:]
            raise SystemExit(f"{tail}\n{name} on {rows.name} failed (exit {proc.returncode})")
        result = json.loads(result_file.read_text())
    return {**result, "peak_pss_tree_gb": peak / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="10000,50000,200000", help="comma-separated dataset sizes")
    parser.add_argument("--num-proc", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--template", default="mistral_v3")
    parser.add_argument("--check", type=int, default=200, help="rows compared with mistral-common's reference")
    parser.add_argument("--only", default=",".join(WORKERS), help="configurations to run")
    parser.add_argument("--workdir", default=str(REPO / "bench" / "work_data"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "data.md"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rows-file", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = WORKERS[args.worker](Path(args.rows_file), Path(args.workdir), args.num_proc, args.template, args.check)
        (Path(args.workdir) / "result.json").write_text(json.dumps(result))
        return

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lines = [f"Data stage, {args.num_proc} processes, template {args.template}, synthetic chats of 70-900 words "
             f"(bench/data.py)", "",
             "| rows | pipeline | tokens | seconds | rows/s | tokens/s | peak RSS (GB) | peak PSS tree (GB) "
             "| exact vs mistral-common |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    results = []
    print("\n".join(lines), flush=True)
    for n in (int(x) for x in args.rows.split(",")):
        rows = write_rows(workdir / f"chats_{n}.jsonl", n)
        for name in args.only.split(","):
            r = run_one(name, rows, args.num_proc, args.template, args.check)
            results.append({"rows": n, "pipeline": name, **r})
            line = (f"| {n} | {name} | {r['tokens']} | {r['seconds']:.1f} | {r['rows'] / r['seconds']:.0f} | "
                    f"{r['tokens'] / r['seconds']:.0f} | {r['peak_rss_gb']:.2f} | {r['peak_pss_tree_gb']:.2f} | {r['exact']} |")
            lines.append(line)
            print(line, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
