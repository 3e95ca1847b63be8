#!/usr/bin/env python
"""Prepare a German-English parallel corpus for fairseq: joint sentencepiece BPE + fairseq-preprocess.

Default input: Multi30k task 1 (Elliott et al. 2016) from ``../shared/data/multi30k`` (raw, cased
sentences; ``--variant lc`` uses the lowercased Moses-tokenized files instead). Any corpus laid out
as ``DIR/{split}.{lang}`` (plain or ``.gz``) works, e.g. IWSLT14 de-en as produced by fairseq's
``examples/translation/prepare-iwslt14.sh`` before its BPE step (see README.md)::

    python recipes/transformer/prepare_data.py --out .gpu/multi30k
    python recipes/transformer/prepare_data.py --data-dir iwslt14.tokenized.de-en/tmp \\
        --valid valid --test test --vocab-size 10000 --out data/iwslt14

Steps: (1) read the splits (optionally the first ``--max-sentences`` pairs of train and
``--max-eval-sentences`` of valid/test, for tests); (2) train ONE sentencepiece BPE model on the
source and target sides of the training split together (a joint vocabulary, so that fairseq can
use one dictionary); (3) encode every split; (4) ``fairseq-preprocess --joined-dictionary``.

Output in ``--out``: ``bin/`` (fairseq's binarized data and ``dict.{src,tgt}.txt``),
``ref/{valid,test}.{tgt}`` (the untouched reference sentences BLEU is computed against),
``spm.model``/``spm.vocab``, ``prepare.json`` (what was done), and ``text/`` (the encoded text,
only with ``--keep-text``).
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "multi30k"
SPLITS = ("train", "valid", "test")


def find_file(data_dir: Path, prefix: str, lang: str, variant: str) -> Path:
    """``DIR/prefix[.lc.norm.tok].lang[.gz]``; raises FileNotFoundError listing what was tried."""
    stem = f"{prefix}.lc.norm.tok.{lang}" if variant == "lc" else f"{prefix}.{lang}"
    tried = [data_dir / stem, data_dir / f"{stem}.gz"]
    for path in tried:
        if path.exists():
            return path
    raise FileNotFoundError(
        f"no {' or '.join(str(p) for p in tried)}: pass --data-dir (and --train/--valid/--test "
        "prefixes) for a corpus laid out as DIR/{split}.{lang}[.gz]"
    )


def read_lines(path: Path, limit: Optional[int]) -> List[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    lines = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(lines) >= limit:
                break
            lines.append(line.rstrip("\n").strip())
    return lines


def write_lines(path: Path, lines: List[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")


def train_sentencepiece(texts: List[Path], prefix: Path, vocab_size: int, seed_sentences: int) -> None:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=",".join(str(t) for t in texts),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,  # de/en: keep every character (umlauts, eszett)
        hard_vocab_limit=False,  # a small corpus (tests) may not support the full vocabulary
        input_sentence_size=seed_sentences,
        shuffle_input_sentence=True,
        # fairseq's dictionary adds its own <s>, <pad>, </s>, <unk>: keep sentencepiece's out of the text
        bos_id=-1,
        eos_id=-1,
        unk_id=0,
        minloglevel=2,
    )


def prepare(args: argparse.Namespace) -> Dict:
    data_dir = Path(args.data_dir).resolve()
    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()) and not args.force:
        raise SystemExit(f"{out} is not empty: pass --force to overwrite it")
    if out.exists() and args.force:
        shutil.rmtree(out)
    text = out / "text"
    prefixes = {"train": args.train, "valid": args.valid, "test": args.test}
    limits = {"train": args.max_sentences, "valid": args.max_eval_sentences, "test": args.max_eval_sentences}
    counts = {}
    started = time.time()
    for split in SPLITS:
        pair = {}
        for lang in (args.src, args.tgt):
            pair[lang] = read_lines(find_file(data_dir, prefixes[split], lang, args.variant), limits[split])
        if len(pair[args.src]) != len(pair[args.tgt]):
            raise SystemExit(f"{split}: {len(pair[args.src])} {args.src} lines but {len(pair[args.tgt])} {args.tgt} lines")
        counts[split] = len(pair[args.src])
        for lang, lines in pair.items():
            write_lines(text / f"raw.{split}.{lang}", lines)
            if split != "train":
                write_lines(out / "ref" / f"{split}.{lang}", lines)

    train_sentencepiece(
        [text / f"raw.train.{args.src}", text / f"raw.train.{args.tgt}"], out / "spm", args.vocab_size,
        seed_sentences=2 * counts["train"],
    )
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    for split in SPLITS:
        for lang in (args.src, args.tgt):
            lines = read_lines(text / f"raw.{split}.{lang}", None)
            pieces = sp.encode(lines, out_type=str)
            write_lines(text / f"{split}.{lang}", [" ".join(p) for p in pieces])

    cmd = [
        sys.executable, "-m", "fairseq_cli.preprocess",
        "--source-lang", args.src, "--target-lang", args.tgt,
        "--trainpref", str(text / "train"), "--validpref", str(text / "valid"), "--testpref", str(text / "test"),
        "--destdir", str(out / "bin"), "--joined-dictionary", "--workers", str(args.workers),
    ]
    log = out / "preprocess.log"
    with open(log, "w") as f:
        result = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"fairseq-preprocess failed (exit {result.returncode}); see {log}:\n" + log.read_text()[-3000:])
    if not args.keep_text:
        shutil.rmtree(text)
    info = {
        "data_dir": str(data_dir),
        "variant": args.variant,
        "src": args.src,
        "tgt": args.tgt,
        "splits": prefixes,
        "sentences": counts,
        "bpe": {"tool": "sentencepiece", "model_type": "bpe", "joint": True,
                "vocab_size_requested": args.vocab_size, "vocab_size": sp.get_piece_size()},
        "fairseq_dictionary_size": sum(1 for _ in open(out / "bin" / f"dict.{args.src}.txt", encoding="utf-8")),
        "seconds": round(time.time() - started, 1),
        "command": " ".join(cmd),
    }
    (out / "prepare.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="corpus folder (default: ../shared/data/multi30k)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--src", default="de")
    p.add_argument("--tgt", default="en")
    p.add_argument("--train", default="train", help="file prefix of the training split")
    p.add_argument("--valid", default="val", help="file prefix of the validation split (Multi30k: val)")
    p.add_argument("--test", default="test_2016_flickr", help="file prefix of the test split")
    p.add_argument("--variant", choices=("raw", "lc"), default="raw",
                   help="raw: the sentences as given (cased, untokenized; default); "
                        "lc: Multi30k's *.lc.norm.tok.* files (lowercased, Moses-tokenized)")
    p.add_argument("--vocab-size", type=int, default=8000, help="joint BPE vocabulary size (8000)")
    p.add_argument("--max-sentences", type=int, default=None, help="use only the first N training pairs")
    p.add_argument("--max-eval-sentences", type=int, default=None, help="use only the first N valid/test pairs")
    p.add_argument("--workers", type=int, default=2, help="fairseq-preprocess workers")
    p.add_argument("--keep-text", action="store_true", help="keep the raw and encoded text in OUT/text")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    return p


def main(argv=None) -> None:
    info = prepare(parser().parse_args(argv))
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
