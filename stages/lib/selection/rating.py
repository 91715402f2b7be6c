"""Judge rating, AlpaGasus style (Chen et al. 2023, arXiv 2307.08701, Figure 3: the accuracy prompt).

The judge sees the instruction, the input and the response, and is asked for a score on a fixed
0-5 scale on the first line of its reply. AlpaGasus kept the 9K of Alpaca's 52K rated >= 4.5.
`parse_rating` reads the score from the reply however the judge phrased it ("Score: 4.5/5",
"**4**", "I'd give it a 3", "8/10" scaled to 4.0); a reply without a readable score in range is
None (unknown), never 0, so a judge that rambles does not silently reject data.
"""

from __future__ import annotations

import re

SCALE = 5
"""The fixed scale: 0 (worst) to 5 (best), as AlpaGasus."""

SYSTEM = ("We would like to request your feedback on the performance of AI assistant in response to the "
          "instruction and the given input displayed following.")
RATING_PROMPT = """{system}

Instruction: {instruction}

Input: {input}

Response: {output}

Please rate according to the accuracy of the response to the instruction and the input. Each assistant \
receives a score on a scale of 0 to 5, where a higher score indicates higher level of the accuracy. Please \
first output a single line containing value indicating the scores. In the subsequent line, please provide a \
comprehensive explanation of your evaluation, avoiding any potential bias."""
"""AlpaGasus's prompt; its system prompt leads the single user message (the teacher client sends one)."""


def rating_prompt(instruction: str, input: str, output: str) -> str:
    return RATING_PROMPT.format(system=SYSTEM, instruction=instruction.strip(), input=input.strip() or "(none)",
                                output=output.strip())


_NUM = r"(\d+(?:\.\d+)?)"
_SCALE_TALK = re.compile(r"(?:on\s+)?(?:a\s+)?scale\s+(?:of|from)\s+\d+\s*(?:to|-)\s*\d+|\(\s*\d+\s*(?:to|-)\s*\d+\s*\)"
                         r"|\b\d+\s*-\s*\d+\s+scale", re.I)
_FRACTION = re.compile(_NUM + r"\s*(?:/|out\s+of)\s*(\d+)", re.I)
_LABELLED = re.compile(r"(?:score|rating|rate|grade|mark)s?\b[^\d\n]{0,20}?" + _NUM, re.I)
_FIRST = re.compile(r"(?<![\w.])" + _NUM + r"(?![\w%])")


def parse_rating(text: str | None, scale: int = SCALE) -> float | None:
    """The score in a judge's reply, in [0, scale], or None when there is none.

    Tried in order: a fraction ("4.5/5", "8 out of 10": rescaled to the scale), a labelled
    number ("Score: 4", "rating of 3"), the first number. Markdown emphasis and mentions of
    the scale itself ("on a scale of 0 to 5") are ignored. Out of range: None.
    """
    if not text:
        return None
    t = _SCALE_TALK.sub(" ", text.replace("*", "").replace("_", " "))
    m = _FRACTION.search(t)
    if m:
        value, denom = float(m.group(1)), float(m.group(2))
        value = value if denom == scale else (value / denom * scale if denom > 0 else -1)
    else:
        m = _LABELLED.search(t) or _FIRST.search(t)
        if m is None:
            return None
        value = float(m.group(1))
    return round(value, 4) if 0 <= value <= scale else None
