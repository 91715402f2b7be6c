"""How far to trust a judge: its verdicts against AlpacaEval's GPT-4 annotations.

Takes N pairs from AlpacaEval's `alpaca-7b_vs_text_davinci_003_gpt4_annotations.json`
(output 1: text-davinci-003, output 2: Alpaca-7B, with GPT-4's preference), asks the judge of
`stages/lib/judging/judge.py` in both orders through the same client and cache as `evaluate`, and reports
the judge's agreement with GPT-4 on the decided pairs, both win rates (the judge's and GPT-4's
on the same pairs), the position-flip rate and the longer-answer-wins rate. The baseline is
GPT-4's own figure on the same subset, measured in the same run.

    python -m benchmarks.judge_agreement \\
        --annotations ../shared/data/alpaca_eval/alpaca-7b_vs_text_davinci_003_gpt4_annotations.json \\
        --n 40 --backend local --model models/teacher
    OPENAI_API_KEY=... python -m benchmarks.judge_agreement --annotations ... --backend openai --model gpt-4o-mini
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile


def main() -> None:
    from stages.evaluate import judge_all
    from stages.lib.judging.judge import summarize
    from stages.lib.judging.winrate import student_score
    from stages.lib.llm.cache import ResponseCache
    from stages.lib.llm.client import open_client
    from stages.lib.llm.endpoint import EndpointParams
    from stages.lib.llm.types import Sampling

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--annotations", required=True)
    ap.add_argument("--n", type=int, default=40, help="pairs, sampled with --seed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="local")
    ap.add_argument("--model", default="models/teacher")
    ap.add_argument("--base-url", default=None)
    ap.add_argument("--max-chars", type=int, default=1500, help="cut each output to this many characters (0: no cut)")
    ap.add_argument("--cache", default=None, help="response cache folder (default: a temporary one)")
    a = ap.parse_args()

    ann = json.load(open(a.annotations, encoding="utf-8"))
    ann = [x for x in ann if x.get("preference") in (1, 2, 1.0, 2.0)]
    pairs = random.Random(a.seed).sample(ann, min(a.n, len(ann)))
    cut = (lambda t: t[: a.max_chars]) if a.max_chars else (lambda t: t)
    rows = [{"set": "alpaca_eval", "id": str(i), "question": x["instruction"], "reference": cut(x["output_1"]),
             "answer": cut(x["output_2"]), "gpt4": float(x["preference"]), "finish_reason": "stop", "answer_tokens": 0}
            for i, x in enumerate(pairs)]
    with tempfile.TemporaryDirectory() as tmp:
        session = open_client(EndpointParams(a.backend, a.model, a.base_url), ResponseCache(a.cache or tmp),
                              batch_size=4)
        judge_all(rows, lambda prompts: session.query(prompts, Sampling(16, 0.0, 1.0, (), a.seed)), "both", a.seed)
    ours = summarize(rows, "both")
    gpt4 = summarize([{**r, "preference": r["gpt4"]} for r in rows], "both")
    decided = [r for r in rows if r["preference"] != 1.5]
    agree = sum(student_score(r["preference"]) == student_score(r["gpt4"]) for r in decided)
    report = {
        "judge": f"{a.backend}:{a.model}", "pairs": len(rows),
        "agreement_with_gpt4_on_decided": round(agree / len(decided), 4) if decided else None,
        "decided": len(decided), "draws_from_disagreeing_orders": ours["draws"],
        "judge_unparsed": ours["judge_unparsed"],
        "position_flip_rate": ours["position_flip_rate"], "longer_wins_rate": ours["longer_wins_rate"],
        "alpaca7b_win_rate_by_this_judge": ours["win_rate"], "standard_error": ours["standard_error"],
        "alpaca7b_win_rate_by_gpt4_same_pairs": gpt4["win_rate"], "gpt4_longer_wins_rate": gpt4["longer_wins_rate"],
        "model_calls": session.stats.teacher_calls,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
