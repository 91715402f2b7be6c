"""The public reference data the tests read (`../shared/data`, or the folder `STILLHOUSE_SHARED_DATA`
names): every file's source, pinned revision, size and sha256 in one table, and a command that
fetches and verifies it. See docs/reference-data.md.

    python -m tests.support.reference_data fetch ../shared/data     # download what is missing or wrong, verify
    python -m tests.support.reference_data verify ../shared/data    # offline: every file present, sha256 equal
    python -m tests.support.reference_data list                     # the table

Each file is a byte-exact copy of `source` in the GitHub repository `repo` at commit `commit`,
downloaded from raw.githubusercontent.com (`--base-url` for a mirror). A download is written to a
temporary file, checked against its sha256 and only then renamed into place, so a bad or
interrupted download never leaves a file that looks like the real one.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import NamedTuple

BASE_URL = "https://raw.githubusercontent.com"


class Ref(NamedTuple):
    path: str  # where it lies under the data folder
    repo: str  # GitHub owner/name
    commit: str  # pinned revision
    source: str  # path in that repository
    size: int  # bytes
    sha256: str
    licence: str  # short; read the source's terms before using a file beyond local tests

    def url(self, base_url: str = BASE_URL) -> str:
        return f"{base_url.rstrip('/')}/{self.repo}/{self.commit}/{self.source}"


FILES: tuple[Ref, ...] = (
    Ref("self-instruct/seed_tasks.jsonl", "yizhongw/self-instruct", "0b26ccaa415992100fa32df62d41b994cf928e23",
        "data/seed_tasks.jsonl", 110934,
        "7779004fa198fdf27cf70a159363879d8a26c53329e11b436af17b3941875f48", "Apache-2.0"),
    Ref("self-instruct/user_oriented_instructions.jsonl", "yizhongw/self-instruct",
        "0b26ccaa415992100fa32df62d41b994cf928e23",
        "human_eval/user_oriented_instructions.jsonl", 170193,
        "81d60a117db495cecedecd9193504fd07c5b5a42f6699ef6b0f9da10fc22f42e", "Apache-2.0, eval only"),
    Ref("self-instruct/predictions/text-davinci-003_predictions.jsonl", "yizhongw/self-instruct",
        "0b26ccaa415992100fa32df62d41b994cf928e23",
        "human_eval/predictions/text-davinci-003_predictions.jsonl", 310102,
        "9fbf9229c917f2c832399e4d474f0ed1a4f367fae61e5eee814f3db687e0d584", "Apache-2.0"),
    Ref("self-instruct/predictions/text-davinci-002_predictions.jsonl", "yizhongw/self-instruct",
        "0b26ccaa415992100fa32df62d41b994cf928e23",
        "human_eval/predictions/text-davinci-002_predictions.jsonl", 277659,
        "30e448059bb2c3aaf2926c93f97d967aa7523acdcaec08b2bbd36ea6b4e1e9f7", "Apache-2.0"),
    Ref("self-instruct/predictions/text-davinci-001_predictions.jsonl", "yizhongw/self-instruct",
        "0b26ccaa415992100fa32df62d41b994cf928e23",
        "human_eval/predictions/text-davinci-001_predictions.jsonl", 283249,
        "0e5486cb74260ed10dfc43d6c26343c4bb98251401003b46ae3fca498305a94d", "Apache-2.0"),
    Ref("self-instruct/predictions/davinci-self-instruct_predictions.jsonl", "yizhongw/self-instruct",
        "0b26ccaa415992100fa32df62d41b994cf928e23",
        "human_eval/predictions/davinci-self-instruct_predictions.jsonl", 316734,
        "d454d989d16567ba9ed2898940beb3bfced2887b8014a5b6f5fa7955e499a4b8", "Apache-2.0"),
    Ref("alpaca/alpaca_data_first1727_flashmodels.json", "AlibabaPAI/FlashModels",
        "98b276bac369788c11c95821f1493434edcf2803",
        "data/alpaca_data_sample.json", 716015,
        "b77cbdd6bdee1783344161d1721f53e8eb30e34d41eba82b9ce9ae176254a91b", "CC-BY-NC-4.0 (Alpaca data)"),
    Ref("alpaca/alpaca_gpt4_en_demo_llamafactory.json", "hiyouga/LLaMA-Factory",
        "ff6d4d12eeb035d6ce06805a5733dd7b29f2ac30",
        "data/alpaca_en_demo.json", 859893,
        "bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318", "CC-BY-NC-4.0 (Alpaca-GPT4 data)"),
    Ref("alpaca/prompt.txt", "tatsu-lab/stanford_alpaca", "761dc5bfbdeeffa89b8bff5d038781a4055f796a",
        "prompt.txt", 1749,
        "c042d2a46d3bdc4fa4406deeed5951dc2dcd4ebf29ebf8237210c384f09b5b2d", "Apache-2.0"),
    Ref("alpaca-libre/alpaca_libre_tasks_v1.jsonl", "mobarski/alpaca-libre", "9024e0cb3b24d8857861b694df643d0bbb765e69",
        "data/output/work/alpaca_libre_tasks_v1.jsonl", 723829,
        "f4dd029df94a1d4ec097a3301733b7f21c413bfdb2167ba33405940bfc7194e4", "MIT"),
    Ref("alpaca_eval/text_davinci_003_outputs.json", "tatsu-lab/alpaca_eval",
        "cd543a149df89434d8a54582c0151c0b945c3d20",
        "results/text_davinci_003/model_outputs.json", 474865,
        "af0bc112f08c88bf589bbfe6fc1036806d0a0f6fec9c4d5a4db860f5afe73b4b", "CC-BY-NC-4.0"),
    Ref("alpaca_eval/alpaca-7b_outputs.json", "tatsu-lab/alpaca_eval", "cd543a149df89434d8a54582c0151c0b945c3d20",
        "results/alpaca-7b/model_outputs.json", 539271,
        "21048628f20187affc7d9c9e756d9618e08c4991fc8a48184612eb484565c5db", "CC-BY-NC-4.0"),
    Ref("alpaca_eval/alpaca-7b_vs_text_davinci_003_gpt4_annotations.json", "tatsu-lab/alpaca_eval",
        "cd543a149df89434d8a54582c0151c0b945c3d20",
        "results/alpaca-7b/alpaca_eval_gpt4/annotations.json", 1085344,
        "d44ea50f1a81f6ae6a95e8ac1dd08b7eca82cc0a9058a2923b1c70cec1e9eaa5", "CC-BY-NC-4.0"),
    Ref("sharegpt/dialogstudio_original_example.json", "salesforce/DialogStudio",
        "3e54576b4db71c56468ae4591a94ce9e419ed01c",
        "open-domain-dialogues/ShareGPT/original_example.json", 26532,
        "50499be188c1e1501fcda6f4980fee63382f72ff01aa84ba0c0a7e8068045124", "ShareGPT/OpenAI terms"),
    Ref("sharegpt/ShareGPT_V3_filtered_500.json", "ml-energy/leaderboard-v2",
        "c3af7f31e231a2a7021c5f8e2a54dd712d02e6e2",
        "benchmark/llm_text_generation/chat/sharegpt/ShareGPT_V3_filtered_500.json", 216075,
        "1dfcb9e6a6b794145128a3d2dd2f3c83aff8f11c806654e77aede2b0cda30e0e", "ShareGPT/OpenAI terms"),
    Ref("sharegpt/fastchat_dummy_conversation.json", "lm-sys/FastChat", "0e6d3e4beaab66f4d3f93db72541a4abab8af28d",
        "data/dummy_conversation.json", 234166,
        "534c5a1079f2eb61ff96633330ce87c4743f5b6d5b1691b44a65920473540470", "Apache-2.0"),
    Ref("koala/koala_test_set.jsonl", "arnav-gudibande/koala-test-set", "2d4396aee3cff495382e9b0ad2521d70b177763b",
        "koala_test_set.jsonl", 142203,
        "c8cda5c53810dc30aad34fabbb828fe3eba0957119e00916650c971905d19886", "Apache-2.0, eval only"),
    Ref("fastchat/mt_bench/question.jsonl", "lm-sys/FastChat", "0e6d3e4beaab66f4d3f93db72541a4abab8af28d",
        "fastchat/llm_judge/data/mt_bench/question.jsonl", 48929,
        "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7", "Apache-2.0"),
    Ref("fastchat/mt_bench/reference_answer_gpt-4.jsonl", "lm-sys/FastChat", "0e6d3e4beaab66f4d3f93db72541a4abab8af28d",
        "fastchat/llm_judge/data/mt_bench/reference_answer/gpt-4.jsonl", 51109,
        "f957a5bc977badb66885ec970e6cd08527845780313f0995764260e5777b9b3f", "Apache-2.0"),
    Ref("fastchat/vicuna_bench/question.jsonl", "lm-sys/FastChat", "0e6d3e4beaab66f4d3f93db72541a4abab8af28d",
        "fastchat/llm_judge/data/vicuna_bench/question.jsonl", 13125,
        "c248c5c98ba45bb0c2aadae2f270e643bd32679c6c306a3b2a503ac4254cdaa5", "Apache-2.0"),
    Ref("fastchat/vicuna_bench/reference_answer_gpt-4.jsonl", "lm-sys/FastChat",
        "0e6d3e4beaab66f4d3f93db72541a4abab8af28d",
        "fastchat/llm_judge/data/vicuna_bench/reference_answer/gpt-4.jsonl", 11301,
        "f7542dc25a5a869b32197486f5699a14eb5682ab3c7264518402399ec09ab470", "Apache-2.0"),
    Ref("fastchat/judge_prompts.jsonl", "lm-sys/FastChat", "0e6d3e4beaab66f4d3f93db72541a4abab8af28d",
        "fastchat/llm_judge/data/judge_prompts.jsonl", 10449,
        "fd283293406d024f44c174b094ef48031d0687a4682fd3a56b29b138f80281b6", "Apache-2.0"),
    Ref("fastchat/vicuna_eval_2023-03/question.jsonl", "lm-sys/FastChat", "69d085eadab8e9fcf831a97e17e132658c3d2272",
        "fastchat/eval/table/question.jsonl", 12885,
        "590c39157bc561eadd7f03cad4be18c2b597f93029780af65f86718f39eafa87", "Apache-2.0"),
    Ref("fastchat/vicuna_eval_2023-03/answer/answer_alpaca-13b.jsonl", "lm-sys/FastChat",
        "69d085eadab8e9fcf831a97e17e132658c3d2272",
        "fastchat/eval/table/answer/answer_alpaca-13b.jsonl", 57071,
        "50a6a9274da00cc74e8b3a8e3e92be2ba23ed6f2bf6ae9bbcc3082424acea540", "Apache-2.0"),
    Ref("fastchat/vicuna_eval_2023-03/answer/answer_gpt35.jsonl", "lm-sys/FastChat",
        "69d085eadab8e9fcf831a97e17e132658c3d2272",
        "fastchat/eval/table/answer/answer_gpt35.jsonl", 107603,
        "c6545739b0738eba5f9348e77f680031aec076a72ecba71b3014e7b1b0dfe099", "Apache-2.0"),
    Ref("fastchat/vicuna_eval_2023-03/answer/answer_llama-13b.jsonl", "lm-sys/FastChat",
        "69d085eadab8e9fcf831a97e17e132658c3d2272",
        "fastchat/eval/table/answer/answer_llama-13b.jsonl", 76353,
        "cbe933439a8a70107761929d72731979ece34e1df0bcdba11af8817ce9975f40", "Apache-2.0"),
    Ref("fastchat/vicuna_eval_2023-03/answer/answer_vicuna-13b.jsonl", "lm-sys/FastChat",
        "69d085eadab8e9fcf831a97e17e132658c3d2272",
        "fastchat/eval/table/answer/answer_vicuna-13b.jsonl", 131904,
        "d1a4b3a5d2e3ca90d2d55084ee25d4d90e63e65ac647bf50359da8633e16d0b8", "Apache-2.0"),
    Ref("fastchat/vicuna_eval_2023-03/review_alpaca-13b_vicuna-13b.jsonl", "lm-sys/FastChat",
        "69d085eadab8e9fcf831a97e17e132658c3d2272",
        "fastchat/eval/table/review/vicuna-13b_20230322-clean-lang/review_alpaca-13b_vicuna-13b.jsonl", 73131,
        "c8fd15e3e128684e6096adc2c93ded78bff5b6c9052c4ec59526c50eee474a6d", "Apache-2.0"),
    Ref("ifeval/input_data.jsonl", "Podtech-AI/IFEval", "5bdf377eb9cc20f16d377dc5c38413cee22550a6",
        "data/input_data.jsonl", 207111,
        "67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49", "Apache-2.0, eval only"),
    Ref("math/gsm8k_test.jsonl", "openai/grade-school-math", "3101c7d5072418e28b9008a6636bde82a006892c",
        "grade_school_math/data/test.jsonl", 749738,
        "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14", "MIT, eval only"),
    Ref("math/math500_test.jsonl", "MobileLLM/BudgetThinker", "f0466b9d37595f46603387baa5930e312fefb7f5",
        "evaluation/data/math500/test_ori.jsonl", 446564,
        "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132", "MIT (MATH dataset), eval only"),
)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def problems(root: Path, files: tuple[Ref, ...] = FILES) -> list[str]:
    """One line per file that is missing or whose sha256 differs; empty when all are good."""
    out = []
    for ref in files:
        path = root / ref.path
        if not path.is_file():
            out.append(f"{path}: missing")
        elif (got := sha256(path)) != ref.sha256:
            out.append(f"{path}: sha256 {got}, expected {ref.sha256} ({ref.url()})")
    return out


def fetch(root: Path, base_url: str = BASE_URL, files: tuple[Ref, ...] = FILES, timeout_s: float = 60.0) -> list[str]:
    """Download every file of `files` that is missing or wrong under `root`; returns the paths fetched.
    Raises ValueError naming the file and both digests when a download does not match its sha256."""
    fetched = []
    for ref in files:
        dest = root / ref.path
        if dest.is_file() and sha256(dest) == ref.sha256:
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(ref.url(base_url), timeout=timeout_s) as r:
                while block := r.read(1 << 20):
                    out.write(block)
            if (got := sha256(Path(tmp))) != ref.sha256:
                raise ValueError(f"{ref.url(base_url)}: sha256 {got}, expected {ref.sha256}; {dest} not written")
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        fetched.append(ref.path)
    return fetched


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.support.reference_data", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download what is missing or wrong, then verify")
    f.add_argument("dir", type=Path)
    f.add_argument("--base-url", default=BASE_URL,
                   help=f"where {{repo}}/{{commit}}/{{source}} is served (default {BASE_URL})")
    v = sub.add_parser("verify", help="check that every file is there with its sha256 (offline)")
    v.add_argument("dir", type=Path)
    sub.add_parser("list", help="print the table: path, repository, commit, source path, sha256")
    args = ap.parse_args(argv)
    if args.cmd == "list":
        for ref in FILES:
            print(f"{ref.path}\t{ref.repo}\t{ref.commit}\t{ref.source}\t{ref.sha256}\t{ref.licence}")
        return 0
    if args.cmd == "fetch":
        try:
            for path in fetch(args.dir, args.base_url):
                print(f"fetched {path}")
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    bad = problems(args.dir)
    for line in bad:
        print(line, file=sys.stderr)
    print(f"{len(FILES) - len(bad)} of {len(FILES)} reference files verified in {args.dir}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
