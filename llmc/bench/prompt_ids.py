"""The token ids random benchmark prompts are drawn from (bench throughput, bench serve): every id of
the vocabulary from FIRST_PROMPT_ID up, less the tokenizer's BOS and EOS ids, so a prompt neither
ends early nor carries a second start of sequence."""
from __future__ import annotations

FIRST_PROMPT_ID = 3               # below it: the usual <unk>/<s>/</s> slots of a vocabulary


def prompt_ids(vocab: int, info) -> tuple[list[int], str]:
    """The allowed ids for a vocabulary of `vocab` and TokenizerInfo `info`, and their description
    (as the result files record it)."""
    special = {*info.eos_token_ids, *([info.bos_token_id] if info.bos_token_id is not None else [])}
    allowed = [i for i in range(FIRST_PROMPT_ID, vocab) if i not in special]
    return allowed, f"uniform over [{FIRST_PROMPT_ID}, {vocab}) minus BOS/EOS {sorted(special)}"
