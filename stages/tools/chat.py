"""Talk to the student (or any checkpoint the pipeline made), streaming its answers.

    python -m stages.tools.chat                      # interactive, models/student
    python -m stages.tools.chat --model models/teacher --file prompts.txt
    python -m stages.tools.chat --file prompts.jsonl --out answers.jsonl

The prompt is rendered with the checkpoint's chat template: `train` embeds the template it
trained with (Alpaca's or the model's own), so the student sees exactly its training format.
Interactive mode keeps the conversation (`/reset` clears it, `/help` lists the commands, `/quit` or EOF
ends; a line starting with `/` is never sent to the model). A file
holds one prompt per line (.txt) or JSONL with an instruction/prompt/question/text field; each
prompt starts a fresh conversation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stages.lib import paths
from stages.lib.io import refuse_nonempty_out
from stages.lib.training.batches import pad_id


def load(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.lib.errors import StageError

    try:
        paths.local_model(model_dir, "--model")
    except StageError as e:
        raise SystemExit(f"ERROR: {e}") from None
    tok = AutoTokenizer.from_pretrained(model_dir)
    if not tok.chat_template:
        raise SystemExit(f"{model_dir}: the tokenizer has no chat template "
                         "(train a student first, or pick a chat model)")
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return model, tok


def reply(model, tok, messages: list[dict], max_new_tokens: int, temperature: float, stream=None) -> str:
    """Generate the assistant's answer to `messages`; tokens are written to `stream` as they come."""
    import torch
    from transformers import TextStreamer

    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").to(model.device)
    kw = {"max_new_tokens": max_new_tokens, "pad_token_id": pad_id(tok),
          "eos_token_id": tok.eos_token_id, "do_sample": temperature > 0}
    if temperature > 0:
        kw["temperature"] = temperature
    if stream is not None:
        kw["streamer"] = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        out = model.generate(**ids, **kw)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def read_file(path: Path) -> list[str]:
    if path.suffix in (".jsonl", ".json"):
        from stages.lib.formats import read_prompts
        from stages.lib.tokens.templates import user_message

        return [user_message(p["instruction"], p["input"]) for p in read_prompts(path)]
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.tools.chat", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=paths.STUDENT, help="a model dir or hub id (default: models/student)")
    ap.add_argument("--file", type=Path, help="prompts to answer, one conversation each")
    ap.add_argument("--out", type=Path, help="with --file: write {prompt, answer} JSONL here")
    ap.add_argument("--system", default=None, help="a system message for every conversation")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="answer length budget (default: 256)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding (default)")
    ap.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    args = ap.parse_args(argv)
    if args.out:
        try:
            refuse_nonempty_out(args.out, args.force)
        except ValueError as e:
            raise SystemExit(f"ERROR: {e}") from None
    model, tok = load(args.model)
    head = [{"role": "system", "content": args.system}] if args.system else []
    if args.file:
        rows = []
        for prompt in read_file(args.file):
            print(f">>> {prompt}", flush=True)
            answer = reply(model, tok, head + [{"role": "user", "content": prompt}], args.max_new_tokens,
                           args.temperature, stream=sys.stdout)
            rows.append({"prompt": prompt, "answer": answer})
        if args.out:
            tmp = args.out.with_name(args.out.name + ".tmp")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            tmp.replace(args.out)
        return
    print(f"{args.model}: type a message ({HELP})", flush=True)
    converse(lambda history: reply(model, tok, history, args.max_new_tokens, args.temperature, stream=sys.stdout),
             head)


HELP = "/reset clears the conversation, /help shows this, /quit ends"
PROMPT = "> "


def converse(answer, head: list[dict], read=input, write=print) -> None:
    """The interactive loop: `read(PROMPT)` each line (EOF ends); a line starting with `/` is a command, never
    sent to the model; any other line goes to `answer(history)`, which returns the reply (streamed as it comes)."""
    history = list(head)
    while True:
        try:
            line = read(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            write("")
            return
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            history = list(head)
            write("(conversation cleared)")
        elif line in ("/help", "/?"):
            write(HELP)
        elif line.startswith("/"):
            write(f"unknown command {line.split()[0]} ({HELP})")
        elif line:
            history.append({"role": "user", "content": line})
            history.append({"role": "assistant", "content": answer(list(history))})


if __name__ == "__main__":
    main()
