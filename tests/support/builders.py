"""Builders several test modules share: tokenized splits of a few Alpaca rows, the shape of a real
Llama-3-8B for the memory plan, and a free loopback port."""

from __future__ import annotations

import numpy as np

from stages.lib.io import write_json
from stages.lib.tokens.arrays import tokenizer_id, write_split
from stages.lib.tokens.templates import encode_conversation, user_message
from stages.tokenize import example_texts

ROWS = [{"instruction": f"write the list {i}", "input": "a b" if i % 2 else "", "output": "three words " * (1 + i % 3)}
        for i in range(6)]


def make_data(folder, tok, rows=ROWS, max_seq_len=1024):
    folder.mkdir(parents=True, exist_ok=True)
    enc = []
    for i, r in enumerate(rows):
        msgs = [{"role": "user", "content": user_message(r["instruction"], r["input"])},
                {"role": "assistant", "content": r["output"]}]
        enc.append(({"id": str(i), "source": "t", **example_texts(msgs, "alpaca", tok)},
                    *encode_conversation(msgs, "alpaca", tok)))
    write_split(folder, "train", enc, np.uint16)
    write_split(folder, "val", enc[:2], np.uint16)
    write_json(folder / "meta.json", {"dtype": "uint16", "tokenizer_id": tokenizer_id(tok), "tokenizer": "tiny",
                                      "max_seq_len": max_seq_len})
    return folder

ROWS8 = [{"instruction": f"write the list {i}", "input": "a b" if i % 2 else "", "output": "three words " * (1 + i % 4)}
         for i in range(8)]

# meta-llama/Llama-3.1-8B config.json, the fields the memory plan reads
LLAMA_8B = {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336, "vocab_size": 128256,
            "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
