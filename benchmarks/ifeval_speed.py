"""IFEval scoring speed: the 541 prompts, each with a real GPT-4 response, scored strict and loose.

The responses are the 42 real GPT-4 answers of tests/golden/ifeval/gpt4_verdicts.jsonl, the prompt at
position i (key order) getting answer i mod 42, so the lengths and styles are real ones and every one of the
541 prompts' 834 instructions is checked 1 (strict) + up to 8 (loose) times. Timed apart, in one process:
* import: the scorer's packages (NLTK, the reference checkers, the Punkt model, langdetect's profiles);
* first: the first response, when Punkt and langdetect build their tables;
* score: the 541 responses (`stages.lib.evals.ifeval.score`) plus the four accuracies, `--repeat` times
  (the best and the median are printed);
* the tool end to end: `python -m stages.tools.ifeval` on the same 541 answers in a fresh process.

    python -m benchmarks.ifeval_speed --repeat 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "ifeval" / "gpt4_verdicts.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", help="IFEval's input_data.jsonl (default: the reference data's)")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()

    t0 = time.perf_counter()
    from stages.lib.evals import ifeval

    ifeval.registry()
    t_import = time.perf_counter() - t0
    prompts_path = Path(a.prompts) if a.prompts else ifeval.default_prompts_path()
    prompts = sorted(ifeval.load_prompts(prompts_path), key=lambda p: p.key)
    answers = [json.loads(line)["response"] for line in GOLDEN.read_text(encoding="utf-8").splitlines()]
    pairs = [(p, answers[i % len(answers)]) for i, p in enumerate(prompts)]

    t0 = time.perf_counter()
    ifeval.check(*pairs[0])
    t_first = time.perf_counter() - t0
    times = []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        acc = ifeval.accuracies(ifeval.score(pairs))
        times.append(time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as tmp:
        answers_file = Path(tmp) / "answers.jsonl"
        answers_file.write_text("".join(json.dumps({"prompt": p.prompt, "response": r}) + "\n" for p, r in pairs),
                                encoding="utf-8")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "stages.tools.ifeval", str(answers_file), "--prompts",
                        str(prompts_path)], check=True, cwd=ROOT, capture_output=True)
        t_tool = time.perf_counter() - t0

    n_inst = sum(len(p.instruction_id_list) for p in prompts)
    print(f"{len(pairs)} responses, {n_inst} instructions")
    print(f"import {t_import:.2f} s, first response {t_first:.2f} s")
    print(f"score 541: best {min(times):.2f} s, median {statistics.median(times):.2f} s over {a.repeat} runs "
          f"({1000 * min(times) / len(pairs):.1f} ms per response)")
    print(f"tool end to end (fresh process): {t_tool:.2f} s")
    print("accuracies (these answers do not answer their prompts; only the speed means anything):",
          {k: round(v["accuracy"], 4) for k, v in acc.items()})


if __name__ == "__main__":
    main()
